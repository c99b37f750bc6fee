"""A real, throw-away Kubernetes 1.20 control plane for the test suite: etcd + kube-apiserver + kube-controller-manager.

Alone it has no nodes: Pods stay Pending, but everything the API server and the controllers do is real
(validation, admission, RBAC, ServiceAccount token Secrets, garbage collection of owned objects).
tests/k8s/realnode.py adds a real node (kubelet, containerd, kube-proxy, kube-scheduler) beside it.

The binaries come from `tests/k8s/build-k8s.sh` (`make k8s-binaries`); `etcd` is Debian's `etcd-server`.

    with ControlPlane(tmp_path / "k8s", build_controlplane()) as cp:
        cp.kubectl("get", "ns")
        kubeconfig = cp.token_kubeconfig("default", "default")  # exactly that ServiceAccount's RBAC
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from pier.core.process import die_with_parent

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

K8S_VERSION = "1.20.2"
BUILD_SCRIPT = Path(__file__).resolve().parent / "build-k8s.sh"
SERVICE_CIDR = "10.0.0.0/24"
SERVICE_IP = "10.0.0.1"  # the first address of SERVICE_CIDR: the `kubernetes` Service, so it must be in the cert
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
BINARIES = ("kube-apiserver", "kube-controller-manager", "kubectl")

# A minimal OpenSSL config: the system one would add its own default extensions to our certificates.
# {address}: the API server's own address (loopback, or a real node's address: pods must reach it).
_OPENSSL_CNF = f"""\
[req]
distinguished_name = dn
[dn]
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign,digitalSignature
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
authorityKeyIdentifier = keyid
subjectAltName = IP:127.0.0.1,IP:{{address}},DNS:localhost,IP:{SERVICE_IP},DNS:kubernetes,DNS:kubernetes.default,\
DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
authorityKeyIdentifier = keyid
"""


def cache_root() -> Path:
    """What the test cluster's scripts build and keep: `$PIER_K8S_CACHE` or ~/.cache/pier (tests/k8s/lib.sh)."""
    return Path(os.environ.get("PIER_K8S_CACHE") or Path.home() / ".cache" / "pier")


def default_bin_dir() -> Path:
    """Where `build-k8s.sh` puts the binaries."""
    return cache_root() / f"k8s-{K8S_VERSION}" / "bin"


def build_k8s(binaries: tuple[str, ...] = BINARIES) -> Path:
    """Build the binaries if they are missing (minutes, once per machine; instant afterwards); return the bin dir."""
    bin_dir = default_bin_dir()
    if all(os.access(bin_dir / name, os.X_OK) for name in binaries):
        return bin_dir  # skip even the shell: this is the path every test session takes
    out = subprocess.run([str(BUILD_SCRIPT), *binaries], check=True, stdout=subprocess.PIPE, text=True).stdout
    return Path(out.strip().splitlines()[-1])  # the script's last stdout line is the bin dir


def build_controlplane() -> Path:
    """The control plane's binaries (`build_k8s` of the three); return the bin dir."""
    return build_k8s(BINARIES)


def free_port() -> int:
    """An unused loopback TCP port (the kernel's choice; released before the caller binds it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class KubectlError(subprocess.CalledProcessError):
    """A failed kubectl call whose message carries kubectl's stderr (CalledProcessError's does not)."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout: {self.output}\nstderr: {self.stderr}"


@dataclass
class Process:
    """A daemon of the test cluster: its own process group, its output in a log file, killed if we die."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    log_file: IO[bytes] = field(repr=False)

    @classmethod
    def spawn(cls, name: str, argv: list[str], log_dir: Path, cwd: Path, env: dict[str, str] | None = None) -> Process:
        log = log_dir / f"{name}.log"
        log_file = log.open("ab")
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            # Own process group, so stop() can signal the whole tree; and killed by the kernel if we die.
            start_new_session=True,
            preexec_fn=die_with_parent,  # noqa: PLW1509 — a prctl only, and the tests start no threads that fork
        )
        return cls(name, popen, log, log_file)

    def tail(self, lines: int = 40) -> str:
        """The end of the log, to put in error messages."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)  # pid == pgid: start_new_session made it the group leader

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`; then whatever else is left of its process group."""
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.popen.wait()
        # The group may still hold children of the leader; they must not outlive us either.
        self.signal(signal.SIGKILL)
        self.log_file.close()

    def check_alive(self) -> None:
        code = self.popen.poll()
        if code is not None:
            raise RuntimeError(f"{self.name} exited with code {code}; log {self.log}:\n{self.tail()}")


class ControlPlane:
    """etcd, kube-apiserver and kube-controller-manager on loopback, all state under `work_dir`.

    `start()` returns once the API server is ready and the controllers have created the `default`
    ServiceAccount's token Secret in `default`. Logs: `work_dir/logs/<process>.log`.
    """

    def __init__(
        self,
        work_dir: Path,
        bin_dir: Path | None = None,
        *,
        etcd: str | None = None,
        start_timeout: float = 120.0,
        verbosity: int = 1,
        address: str = "127.0.0.1",
    ) -> None:
        """`address`: where the API server listens and what it advertises (the `kubernetes` Service's endpoint):
        loopback by default; a real node's pods need an address of this machine they can reach."""
        self.work_dir = Path(work_dir).resolve()
        self.address = address
        self.bin_dir = Path(bin_dir).resolve() if bin_dir is not None else default_bin_dir()
        self.etcd_binary = etcd or shutil.which("etcd") or "/usr/bin/etcd"
        self.start_timeout = start_timeout
        self.verbosity = verbosity
        self.pki = self.work_dir / "pki"
        self.logs = self.work_dir / "logs"
        self.etcd_port = 0
        self.apiserver_port = 0
        self._etcd_peer_port = 0
        # Seconds from start() to each milestone, for reports: etcd, apiserver_ready, default_token.
        self.timings: dict[str, float] = {}
        self._processes: list[Process] = []
        self._ssl: ssl.SSLContext | None = None

    # -- public API -------------------------------------------------------------------------------------

    @property
    def server(self) -> str:
        """The API server URL (https on loopback)."""
        return f"https://{self.address}:{self.apiserver_port}"

    @property
    def ca_file(self) -> Path:
        """The cluster CA certificate (signs the API server's serving cert and all client certs)."""
        return self.pki / "ca.crt"

    @property
    def kubeconfig(self) -> Path:
        """A kubeconfig for the cluster admin (client cert in group system:masters: bypasses RBAC)."""
        return self.work_dir / "admin.kubeconfig"

    @property
    def pids(self) -> dict[str, int]:
        """Process id (= process group id) of each running process, by name."""
        return {proc.name: proc.popen.pid for proc in self._processes}

    @classmethod
    def running(cls, work_dir: Path, bin_dir: Path) -> ControlPlane:
        """A handle on a control plane another process started in `work_dir` (kubectl, api(); not stop())."""
        plane = cls(work_dir, bin_dir)
        server = json.loads(plane.kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
        host, port = server.removeprefix("https://").rsplit(":", 1)
        plane.address, plane.apiserver_port = host, int(port)
        return plane

    def start(self) -> ControlPlane:
        """Generate certs, start the three processes, wait until the cluster is usable. Stops all on failure."""
        for name in BINARIES:
            if not os.access(self.bin_dir / name, os.X_OK):
                raise RuntimeError(f"{self.bin_dir / name} is missing: run `make k8s-binaries`")
        if not os.access(self.etcd_binary, os.X_OK):
            raise RuntimeError(f"{self.etcd_binary} is missing: apt-get install etcd-server")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        t0 = time.monotonic()
        # Ports first: the kubeconfigs written with the certs name the API server's.
        self.etcd_port, self._etcd_peer_port, self.apiserver_port = free_port(), free_port(), free_port()
        try:
            self._make_pki()
            self._start_etcd()
            self._wait(self._etcd_healthy, "etcd", "etcd /health")
            self.timings["etcd"] = time.monotonic() - t0
            self._start_apiserver()
            self._wait(lambda: self._get("/readyz", raw=True) == b"ok", "kube-apiserver", "kube-apiserver /readyz")
            self.timings["apiserver_ready"] = time.monotonic() - t0
            self._start_controller_manager()
            self.service_account_token("default", "default", timeout=self.start_timeout)
            self.timings["default_token"] = time.monotonic() - t0
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Terminate every process (whole process groups), newest first; SIGKILL what ignores SIGTERM for 10s.

        One at a time, so the API server shuts down while etcd still answers (quiet logs, clean etcd).
        """
        for proc in reversed(self._processes):
            proc.stop()
        self._processes.clear()

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def apply_crds(self, path: Path) -> None:
        """Install CRDs and make kubectl see them at once (its discovery cache would hide them for minutes)."""
        self.kubectl("apply", "-f", str(path))
        self.kubectl("wait", "--for=condition=established", "crd", "--all", "--timeout=60s")
        shutil.rmtree(self.work_dir / "kubectl-cache", ignore_errors=True)

    def kubectl(
        self,
        *args: str,
        check: bool = True,
        input: str | None = None,
        timeout: float = 60.0,
        kubeconfig: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl (admin kubeconfig unless `kubeconfig` is given); text output. Raises KubectlError if `check`."""
        cmd = [
            str(self.bin_dir / "kubectl"),
            f"--kubeconfig={kubeconfig or self.kubeconfig}",
            # kubectl caches discovery under ~/.kube by default: keep it with the cluster it describes.
            f"--cache-dir={self.work_dir / 'kubectl-cache'}",
            *args,
        ]
        result = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise KubectlError(result.returncode, cmd, result.stdout, result.stderr)
        return result

    def service_account_token(self, namespace: str, service_account: str = "default", timeout: float = 60.0) -> str:
        """The ServiceAccount's token, waiting for the controllers to create the SA (for `default`) and its Secret.

        Kubernetes 1.20 creates one `kubernetes.io/service-account-token` Secret per ServiceAccount. Until it exists
        the ServiceAccount admission plugin rejects Pods that use the account, so this doubles as "ready for Pods".
        """
        base = f"/api/v1/namespaces/{namespace}"
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            try:
                sa = self._get(f"{base}/serviceaccounts/{service_account}")
                for ref in sa.get("secrets") or []:
                    secret = self._get(f"{base}/secrets/{ref['name']}")
                    token = (secret.get("data") or {}).get("token")
                    if secret.get("type") == "kubernetes.io/service-account-token" and token:
                        return base64.b64decode(token).decode()
            except urllib.error.HTTPError as err:
                if err.code != 404:
                    raise
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no token Secret for ServiceAccount {namespace}/{service_account} after {timeout:.0f}s\n"
                    f"kube-controller-manager log:\n{self._tail('kube-controller-manager')}"
                )
            time.sleep(0.2)

    def token_kubeconfig(self, namespace: str, service_account: str, timeout: float = 60.0) -> Path:
        """Write a kubeconfig that authenticates as the ServiceAccount (bearer token), default namespace set.

        Components run with it get exactly that ServiceAccount's RBAC permissions.
        """
        token = self.service_account_token(namespace, service_account, timeout)
        path = self.work_dir / "kubeconfigs" / f"{namespace}.{service_account}.kubeconfig"
        path.parent.mkdir(exist_ok=True)
        user = f"system:serviceaccount:{namespace}:{service_account}"
        self._write_kubeconfig(path, user, {"token": token}, namespace)
        return path

    def api_client(self, kubeconfig: Path | None = None) -> ApiClient:
        """A `kubernetes` Python client for this cluster (admin unless `kubeconfig` is given)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(kubeconfig or self.kubeconfig))

    def log_tail(self, name: str, lines: int = 40) -> str:
        """The end of a process's log ("etcd", "kube-apiserver", "kube-controller-manager")."""
        return self._tail(name, lines)

    # -- certificates ------------------------------------------------------------------------------------

    def _openssl(self, *args: str) -> None:
        result = subprocess.run(["openssl", *args], capture_output=True, text=True, cwd=self.pki, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"openssl {' '.join(args)} failed:\n{result.stderr}")

    def _make_pki(self) -> None:
        """CA, API server serving cert, ServiceAccount signing keypair, admin and controller-manager client certs."""
        self.pki.mkdir(exist_ok=True)
        (self.pki / "openssl.cnf").write_text(_OPENSSL_CNF.format(address=self.address))
        # P-256 keys are generated instantly (RSA takes noticeable time); Go and Python accept them for TLS.
        ec = ("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out")
        self._openssl(*ec, "ca.key")
        self._openssl(
            "req", "-x509", "-new", "-config", "openssl.cnf", "-extensions", "ca", "-key", "ca.key",
            "-subj", "/CN=pier-test-ca", "-days", "3650", "-out", "ca.crt",
        )  # fmt: skip
        for name, subject, profile in (
            ("apiserver", "/CN=kube-apiserver", "server"),
            ("admin", "/O=system:masters/CN=pier-admin", "client"),
            # The RBAC bootstrap policy binds this user name to the controller-manager's role.
            ("controller-manager", "/CN=system:kube-controller-manager", "client"),
            # How the API server authenticates to kubelets (logs, exec): an admin, as kubeadm's is.
            ("apiserver-kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client", "client"),
        ):
            self._issue(name, subject, profile)
        # ServiceAccount tokens: the controller-manager signs with the private key, the API server verifies
        # with the public one. RSA (RS256) is what every token consumer expects.
        self._openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "sa.key")
        self._openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub")

        self._write_kubeconfig(
            self.kubeconfig,
            "pier-admin",
            {"client-certificate": str(self.pki / "admin.crt"), "client-key": str(self.pki / "admin.key")},
        )
        self._write_kubeconfig(
            self.work_dir / "controller-manager.kubeconfig",
            "system:kube-controller-manager",
            {
                "client-certificate": str(self.pki / "controller-manager.crt"),
                "client-key": str(self.pki / "controller-manager.key"),
            },
        )

    def _issue(self, name: str, subject: str, profile: str) -> None:
        """A key and a certificate signed by the cluster CA: pki/<name>.key, pki/<name>.crt."""
        ec = ("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out")
        self._openssl(*ec, f"{name}.key")
        self._openssl("req", "-new", "-config", "openssl.cnf", "-key", f"{name}.key", "-subj", subject,
                      "-out", f"{name}.csr")  # fmt: skip
        self._openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-set_serial", str(secrets.randbits(63)), "-days", "3650",
            "-extfile", "openssl.cnf", "-extensions", profile, "-out", f"{name}.crt",
        )  # fmt: skip

    def client_kubeconfig(self, name: str, user: str, group: str | None = None) -> Path:
        """A kubeconfig with a client certificate for `user` (in `group`): how node components authenticate.

        The RBAC bootstrap policy knows system:kube-scheduler and system:kube-proxy; a kubelet is
        system:node:<name> in group system:nodes (the Node authorizer).
        """
        subject = (f"/O={group}" if group else "") + f"/CN={user}"
        self._issue(name, subject, "client")
        path = self.work_dir / f"{name}.kubeconfig"
        credentials = {"client-certificate": str(self.pki / f"{name}.crt"), "client-key": str(self.pki / f"{name}.key")}
        self._write_kubeconfig(path, user, credentials)
        return path

    def _write_kubeconfig(self, path: Path, user: str, credentials: dict[str, str], namespace: str = "") -> None:
        # JSON is YAML: kubectl, client-go and the Python client all read it, and we need no YAML writer.
        context: dict[str, str] = {"cluster": "pier-test", "user": user}
        if namespace:
            context["namespace"] = namespace
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "pier-test", "cluster": {"server": self.server, "certificate-authority": str(self.ca_file)}}
            ],
            "users": [{"name": user, "user": credentials}],
            "contexts": [{"name": "pier-test", "context": context}],
            "current-context": "pier-test",
        }
        path.write_text(json.dumps(config, indent=2))
        path.chmod(0o600)  # it may hold a token

    # -- processes ---------------------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str]) -> None:
        self._processes.append(Process.spawn(name, argv, self.logs, self.work_dir))

    def _start_etcd(self) -> None:
        client_url, peer_url = f"http://127.0.0.1:{self.etcd_port}", f"http://127.0.0.1:{self._etcd_peer_port}"
        self._spawn(
            "etcd",
            [
                self.etcd_binary,
                "--name=pier-test",
                f"--data-dir={self.work_dir / 'etcd'}",
                # Plain http on loopback: nothing but the API server talks to it, and TLS would only add setup.
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=pier-test={peer_url}",
                "--logger=zap",  # the 3.4 default (capnslog) prints a deprecation warning
                "--log-level=warn",
            ],
        )

    def _start_apiserver(self) -> None:
        pki = self.pki
        self._spawn(
            "kube-apiserver",
            [
                str(self.bin_dir / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
                f"--bind-address={self.address}",
                f"--advertise-address={self.address}",
                f"--secure-port={self.apiserver_port}",
                "--insecure-port=0",  # 1.20 still has the unauthenticated port; make sure it is off
                f"--cert-dir={self.work_dir / 'apiserver-certs'}",  # default is /var/run/kubernetes
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                # Node: what a kubelet may read (only its own pods' secrets...), as in any cluster; RBAC for the rest.
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
                f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
                # A node's hostname is no DNS name here: reach kubelets at their InternalIP.
                "--kubelet-preferred-address-types=InternalIP",
                # Required since 1.20 (TokenRequest API); the legacy Secret tokens are verified with the same key.
                f"--service-account-issuer={SA_ISSUER}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true",
                "--profiling=false",
                f"--v={self.verbosity}",
            ],
        )

    def _start_controller_manager(self) -> None:
        pki = self.pki
        self._spawn(
            "kube-controller-manager",
            [
                str(self.bin_dir / "kube-controller-manager"),
                f"--kubeconfig={self.work_dir / 'controller-manager.kubeconfig'}",
                # Fixed ports 10252/10257 by default; off, so several control planes can run side by side.
                "--port=0",
                "--secure-port=0",
                "--leader-elect=false",
                "--controllers=*",  # all default controllers, among them garbagecollector and serviceaccount-token
                "--use-service-account-credentials=true",  # each controller acts with its own SA and RBAC role
                f"--service-account-private-key-file={pki / 'sa.key'}",  # enables the token Secret controller
                f"--root-ca-file={pki / 'ca.crt'}",  # goes into each token Secret as ca.crt
                # Lets the CSR signer run too (CertificateSigningRequests get certificates, as in a real cluster).
                f"--cluster-signing-cert-file={pki / 'ca.crt'}",
                f"--cluster-signing-key-file={pki / 'ca.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                f"--v={self.verbosity}",
            ],
        )

    def start_scheduler(self, log_dir: Path | None = None, env: dict[str, str] | None = None) -> Process:
        """kube-scheduler for this control plane (its own identity; no fixed ports: several may run side by side).

        The caller stops it (`Process.stop`) before the control plane."""
        kubeconfig = self.client_kubeconfig("kube-scheduler", "system:kube-scheduler")
        argv = [
            str(self.bin_dir / "kube-scheduler"),
            f"--kubeconfig={kubeconfig}",
            # Its fixed ports (10251, 10259) off: nothing here needs its health or metrics endpoints.
            "--port=0",
            "--secure-port=0",
            "--leader-elect=false",
            "--v=1",
        ]
        return Process.spawn("kube-scheduler", argv, log_dir or self.logs, self.work_dir, env=env)

    def _check_alive(self) -> None:
        for proc in self._processes:
            proc.check_alive()

    def _tail(self, name: str, lines: int = 40) -> str:
        for proc in self._processes:
            if proc.name == name:
                return proc.tail(lines)
        log = self.logs / f"{name}.log"
        return log.read_text(errors="replace")[-4000:] if log.exists() else "(no log)"

    def _wait(self, ready: Callable[[], bool], name: str, what: str) -> None:
        """Poll `ready()` (exceptions count as not ready) until it is true, the timeout, or a process dies."""
        deadline = time.monotonic() + self.start_timeout
        error: Exception | None = None
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                if ready():
                    return
            except (OSError, ValueError, urllib.error.URLError) as err:
                error = err
            time.sleep(0.1)
        raise TimeoutError(
            f"{what} not ready after {self.start_timeout:.0f}s ({error}); {name} log:\n{self._tail(name)}"
        )

    # -- HTTP ---------------------------------------------------------------------------------------------

    def _etcd_healthy(self) -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.etcd_port}/health", timeout=2) as resp:
            return json.load(resp).get("health") == "true"

    def ssl_context(self) -> ssl.SSLContext:
        """TLS as the cluster admin (client certificate), trusting the cluster CA."""
        if self._ssl is None:
            ctx = ssl.create_default_context(cafile=str(self.ca_file))
            ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
            self._ssl = ctx
        return self._ssl

    def api(self, method: str, path: str, body: Any = None, timeout: float = 10.0) -> Any:
        """One API request as admin, JSON in and out; None for a 404. Raises urllib.error.HTTPError otherwise."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        request = urllib.request.Request(self.server + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=self.ssl_context()) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as err:
            err.close()  # it holds the response's connection: a ResourceWarning (an error here) if left to the GC
            if err.code == 404:
                return None
            raise

    def _get(self, path: str, raw: bool = False) -> Any:
        """GET from the API server as admin (client cert); JSON-decoded unless `raw`."""
        try:
            with urllib.request.urlopen(self.server + path, timeout=5, context=self.ssl_context()) as resp:
                body = resp.read()
        except urllib.error.HTTPError as err:
            err.close()  # (as in `api`)
            raise
        return body if raw else json.loads(body)
