"""Simulated nodes for a test control plane: kubemark's hollow nodes, Kubernetes' own scale-test tool.

A hollow node is the real kubelet (v1.20.2, built from Debian's source with the others: `build-k8s.sh kubemark`)
on a fake container runtime: it registers its Node, heartbeats, is scheduled pods, runs their (fake) sandboxes and
containers, reports their status, probes them, and obeys the node lifecycle (taints, eviction, deletion) — all
the API traffic of a real node, with no container behind it. Each one here has its own identity (a client
certificate as `system:node:<name>`), root directory, runtime socket and kubelet port on loopback
(tests/k8s/kubemark-on-one-host.patch), so a hundred run side by side on one machine.

What a hollow node cannot show: there is no process in a pod. Every pod of these nodes gets one address,
`pod_ip` (a loopback address: nothing leaves the machine); `SharedBridge` puts one real bridge (`pier sidecar`
with the demo server) there, so the kubelets' probes, the operator's status requests and the router's calls
reach a real bridge, the same for every session. Per-session state in the bridge (its activity, its crashes)
is therefore shared by all sessions.

    nodes = HollowNodes(control_plane, work_dir, count=100).start()
    nodes.silence("hollow-7")      # SIGSTOP: the node stops heartbeating, as if unreachable
    nodes.stop()
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.k8s.cluster import ControlPlane, Process, build_k8s, free_port

POD_IP = "127.0.83.1"  # every hollow pod's address; loopback, so probes and calls stay on this machine
BRIDGE_PORT = 8080  # the port pods' bridges listen on (pier.operator.pods.BRIDGE_PORT)
HOLLOW_LABEL = "pier.dev/hollow"


def build_kubemark() -> Path:
    """The kubemark binary (built once with the cluster's other binaries' source: ~5 minutes on 2 cores)."""
    return build_k8s(("kubemark",)) / "kubemark"


class HollowNodes:
    """`count` hollow nodes named `<prefix>-<i>`, labelled `pier.dev/hollow=true` (and `labels`), with `taints`."""

    def __init__(
        self,
        cp: ControlPlane,
        work_dir: Path,
        count: int,
        *,
        prefix: str = "hollow",
        pod_ip: str = POD_IP,
        labels: dict[str, str] | None = None,
        taints: list[str] | None = None,
        start_timeout: float = 300.0,
    ) -> None:
        self.cp = cp
        self.work = Path(work_dir).resolve()
        self.count = count
        self.prefix = prefix
        self.pod_ip = pod_ip
        self.labels = {HOLLOW_LABEL: "true", **(labels or {})}
        self.taints = taints or []
        self.start_timeout = start_timeout
        self.binary = build_kubemark()
        self.processes: dict[str, Process] = {}

    @property
    def names(self) -> list[str]:
        return [f"{self.prefix}-{i}" for i in range(self.count)]

    def start(self) -> HollowNodes:
        """Start every node, then wait until all are Ready."""
        self.work.mkdir(parents=True, exist_ok=True)
        try:
            for name in self.names:
                self._spawn(name)
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str) -> None:
        root = self.work / name
        root.mkdir(exist_ok=True)
        kubeconfig = self.cp.client_kubeconfig(f"node-{name}", f"system:node:{name}", "system:nodes")
        argv = [
            str(self.binary),
            "--morph=kubelet",
            f"--name={name}",
            f"--kubeconfig={kubeconfig}",
            f"--kubelet-port={free_port()}",
            "--kubelet-read-only-port=0",
            "--kubelet-address=127.0.0.1",
            "--healthz-port=0",
            f"--root-dir={root}",
            f"--runtime-endpoint=unix://{root}/runtime.sock",
            f"--fake-pod-ip={self.pod_ip}",
            "--node-labels=" + ",".join(f"{k}={v}" for k, v in self.labels.items()),
            "--v=0",
        ]
        if self.taints:
            argv.append("--register-with-taints=" + ",".join(self.taints))
        # Its own (empty) environment: no proxy settings, no credentials of ours.
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TMPDIR": str(root)}
        self.processes[name] = Process.spawn(name, argv, self.work, self.work, env=env)

    def ready(self) -> set[str]:
        """The names of this set's nodes whose Ready condition is True now."""
        listing = self.cp.api("GET", f"/api/v1/nodes?labelSelector={HOLLOW_LABEL}%3Dtrue") or {"items": []}
        ready = set()
        for node in listing["items"]:
            conditions = {c["type"]: c["status"] for c in node["status"].get("conditions") or []}
            if node["metadata"]["name"] in self.processes and conditions.get("Ready") == "True":
                ready.add(node["metadata"]["name"])
        return ready

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            for proc in self.processes.values():
                proc.check_alive()
            with contextlib.suppress(OSError, urllib.error.URLError):
                if len(self.ready()) == self.count:
                    return
            if time.monotonic() > deadline:
                waiting = sorted(set(self.processes) - self.ready())
                raise TimeoutError(f"hollow nodes not Ready after {self.start_timeout:.0f}s: {waiting[:10]}; "
                                   f"{waiting[0]} log:\n{self.processes[waiting[0]].tail()}")  # fmt: skip
            time.sleep(1)

    def silence(self, name: str) -> None:
        """The node stops heartbeating and answering (SIGSTOP): to the cluster it is unreachable."""
        self.processes[name].signal(signal.SIGSTOP)

    def revive(self, name: str) -> None:
        self.processes[name].signal(signal.SIGCONT)

    def pids(self) -> list[int]:
        return [proc.popen.pid for proc in self.processes.values() if proc.popen.poll() is None]

    def stop(self, delete_nodes: bool = True) -> None:
        """Stop every node (a silenced one is woken to die), and delete their Node objects."""
        for proc in self.processes.values():
            proc.signal(signal.SIGCONT)
            proc.signal(signal.SIGTERM)
        for proc in self.processes.values():
            proc.stop(timeout=10)
        if delete_nodes:
            for name in self.processes:
                with contextlib.suppress(OSError, urllib.error.URLError):
                    self.cp.api("DELETE", f"/api/v1/nodes/{name}")
        self.processes.clear()


class SharedBridge:
    """The one real bridge every hollow pod's address leads to: `pier sidecar` with the demo server on
    `host:8080` (what the kubelets probe, the operator asks and the router calls, for every session)."""

    def __init__(self, work_dir: Path, host: str = POD_IP, port: int = BRIDGE_PORT) -> None:
        self.work = Path(work_dir)
        self.host, self.port = host, port
        self.process: Process | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> SharedBridge:
        with socket.socket() as probe:
            try:
                probe.bind((self.host, self.port))
            except OSError as exc:
                raise RuntimeError(
                    f"{self.host}:{self.port} is taken ({exc}): the hollow pods' bridge needs it"
                ) from exc
        self.work.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "pier.cli", "sidecar", "--host", self.host, "--port", str(self.port), "--",
                sys.executable, "-m", "pier.examples.demo_server"]  # fmt: skip
        env = {**os.environ, "PIER_LOG_LEVEL": "WARNING"}
        self.process = Process.spawn("shared-bridge", argv, self.work, self.work, env=env)
        deadline = time.monotonic() + timeout
        while not self._ready():
            self.process.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"the shared bridge did not get ready:\n{self.process.tail()}")
            time.sleep(0.2)
        return self

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def pids(self) -> list[int]:
        """The bridge and its server."""
        if self.process is None:
            return []
        pid = self.process.popen.pid
        children = Path(f"/proc/{pid}/task/{pid}/children")
        return [pid, *(int(p) for p in children.read_text().split())] if children.exists() else [pid]

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None
