"""A real Kubernetes node beside the test control plane: containerd, kubelet, kube-proxy and kube-scheduler.

    with RealCluster(tmp_path / "cluster") as cluster:     # control plane + node, images imported
        cluster.control_plane.kubectl("get", "nodes")       # pier-node   Ready   ...   containerd://1.6.20~ds1

What runs (all v1.20.2 from Debian's source, tests/k8s/build-k8s.sh; Debian's containerd 1.6, runc, CNI plugins):
- containerd with its own config, root (in the cache, so imported images survive) and socket; runc (crun fails
  on this kernel's cgroup v1 setup), cgroupfs, `restrict_oom_score_adj` (root here lacks CAP_SYS_RESOURCE: runc
  could not lower a container's oom_score_adj below containerd's, and every sandbox would fail);
- the kubelet (cgroupfs driver, swap allowed, no iptables chains of its own, the pause image built here), always
  started with AWS_EC2_METADATA_DISABLED=true: its built-in AWS credential provider otherwise connects to the
  cloud metadata address at start-up, and no traffic may leave this machine;
- CNI: one bridge (`piercni0`, 10.244.0.0/24) with host-local IPAM, no masquerading;
- kube-proxy (iptables mode): Services' ClusterIPs, among them the in-cluster API address the operator and the
  router use; kube-scheduler; a cluster DNS (dnsmasq serving <service>.<namespace>.svc.cluster.local from the API,
  nothing else: it has no upstream); a StorageClass `pier-local` (default) whose claims get a host directory.

The node's address (10.244.255.1) sits on a veth interface this module creates and removes, its peer left down
(this kernel has no dummy devices): the kubelet refuses a loopback address, and what is sent into that link goes
nowhere, so it is no way off the machine either. The API server binds there too,
so pods reach it through the `kubernetes` Service. What leaves the machine: nothing. Pods' default route ends
at this host, whose FORWARD chain refuses anything from the pod bridge that is not for the pod bridge; the
Service range routes to that dead-end link; DNS has no upstream; containerd's registry hosts point at a closed
local port; `EgressWatch` records every connection the cluster's daemons make (tests assert it stays local).

One such node per machine: containerd 1.6 and kubelet 1.20 use a few fixed host paths (/run/containerd/s,
/var/log/pods, /var/log/containers, /var/lib/cni) and ports (10250, kube-proxy's 10249/10256). A machine-wide
lock serialises nodes (a second test run waits). `stop()` removes every container, mount, network namespace,
interface, iptables rule, cgroup and host path the node made, and restores the sysctls the kubelet, kube-proxy
and the bridge plugin changed; `start()` first clears what a crashed run left (its record is in /run/pier-node).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import shlex
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.k8s.cluster import SERVICE_CIDR, ControlPlane, Process, build_k8s, cache_root

NODE_NAME = "pier-node"
NODE_IP = "10.244.255.1"
POD_CIDR = "10.244.0.0/24"
POD_GATEWAY = "10.244.0.1"
BRIDGE = "piercni0"
NODE_LINK = "piernode0"  # a veth whose peer (piernode1) stays down: sending into it drops the packet
CLUSTER_DOMAIN = "cluster.local"
STORAGE_CLASS = "pier-local"
PROVISIONER = "pier.dev/hostpath"
NODE_BINARIES = (
    "kube-apiserver", "kube-controller-manager", "kubectl", "kubelet", "kube-scheduler", "kube-proxy",
    "kubemark",  # the simulated nodes beside the real one (tests/k8s/test_hollow_nodes.py)
)  # fmt: skip
IMAGES_SCRIPT = Path(__file__).resolve().parent / "build-images.sh"
PACKAGES_SCRIPT = Path(__file__).resolve().parent / "install-packages.sh"

RUN_DIR = Path("/run/pier-node")  # containerd's socket and state, runc's root, and the record of host changes
HOST_RECORD = RUN_DIR / "host.json"
LOCK_PATH = Path("/run/lock/pier-node.lock")
SOCKET = RUN_DIR / "containerd.sock"
# Fixed paths of containerd 1.6 / kubelet 1.20: made by start() if absent (and then removed by stop()), or emptied
# again if they were there, empty. (No marker file inside: the kubelet deletes what it does not know there.)
FIXED_DIRS = (Path("/run/containerd"), Path("/var/log/pods"), Path("/var/log/containers"))
CNI_CACHE = Path("/var/lib/cni")  # libcni's result cache (results/<network>-<container>-<ifname>); shared, so
CNI_NETWORK = "pier"  # only our network's entries go (and containerd's loopback's, "cni-loopback")
IPTABLES = (("iptables", "filter"), ("iptables", "nat"), ("iptables", "mangle"), ("ip6tables", "filter"),
            ("ip6tables", "nat"), ("ip6tables", "mangle"))  # fmt: skip
FORWARD_CHAIN = "PIER-NODE-FORWARD"
# What the kubelet (kernel tunables), kube-proxy (route_localnet) and the bridge plugin (ip_forward) change.
SYSCTLS = (
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/route_localnet",
    "net/bridge/bridge-nf-call-iptables",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/netfilter/nf_conntrack_max",
    "net/netfilter/nf_conntrack_tcp_timeout_established",
    "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
)
# The environment of every node daemon: nothing of ours (keys, proxies), and the one setting that keeps the
# kubelet's AWS credential provider off the network.
DAEMON_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "AWS_EC2_METADATA_DISABLED": "true",
}


# -- images ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    name: str
    ref: str
    id: str
    archive: Path
    size: int

    @property
    def repository(self) -> str:
        return self.ref.rsplit(":", 1)[0]

    @property
    def tag(self) -> str:
        return self.ref.rsplit(":", 1)[1]


def build_images() -> dict[str, Image]:
    """Build (or find cached) every image the node runs: tests/k8s/build-images.sh; name → Image."""
    out = subprocess.run([str(IMAGES_SCRIPT)], check=True, stdout=subprocess.PIPE, text=True).stdout
    manifest = json.loads(Path(out.strip().splitlines()[-1]).read_text())
    return {
        name: Image(name, entry["ref"], entry["id"], Path(entry["archive"]), entry["size"])
        for name, entry in manifest.items()
    }


def chart_image_values(images: dict[str, Image], image: str = "pier") -> dict[str, Any]:
    """Chart values for the locally built images: no registry, so `Never` pull (they are imported on the node)."""
    pier, redis = images[image], images["redis"]
    return {
        "image": {"repository": pier.repository, "tag": pier.tag, "pullPolicy": "Never"},
        "redis": {"image": {"repository": redis.repository, "tag": redis.tag, "pullPolicy": "Never"}},
    }


# -- host commands -------------------------------------------------------------------------------------------------


def _run(*argv: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, input=input, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name


def _read_sysctls() -> dict[str, str]:
    values = {}
    for name in SYSCTLS:
        with contextlib.suppress(OSError):
            values[name] = _sysctl_path(name).read_text().strip()
    return values


def _iptables_rules() -> list[str]:
    """The rules of every table the node touches (IPv4 and IPv6), as iptables-save prints them, without counters and
    comments: comparable."""
    lines = []
    for command, table in IPTABLES:
        for line in _run(f"{command}-save", "-t", table, check=False).stdout.splitlines():
            if not line.startswith("#"):
                lines.append(f"{command} {line.split(' [', 1)[0] if line.startswith(':') else line}")
    return lines


def _mounts_under(*roots: Path) -> list[str]:
    """Mount points under any of `roots`, deepest first (the order to unmount them)."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if any(point == str(root) or point.startswith(f"{root}/") for root in roots):
            points.append(point)
    return sorted(set(points), key=lambda p: -p.count("/"))


def _pids_matching(predicate: Callable[[list[str]], bool]) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if predicate([a.decode(errors="replace") for a in argv if a]):
                pids.append(int(entry.name))
    return pids


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _cgroup_dirs(name: str) -> list[Path]:
    """`name` (e.g. kubepods) in every cgroup v1 hierarchy."""
    root = Path("/sys/fs/cgroup")
    return [path for path in (root.glob(f"*/{name}")) if path.is_dir()]


def _processes_in(cgroup: Path) -> list[int]:
    pids: list[int] = []
    for dirpath, _, files in os.walk(cgroup):
        if "cgroup.procs" in files:
            with contextlib.suppress(OSError):
                pids += [int(p) for p in (Path(dirpath) / "cgroup.procs").read_text().split()]
    return pids


def _remove_cgroup_tree(cgroup: Path) -> None:
    for dirpath, _, _ in sorted(os.walk(cgroup), key=lambda w: -w[0].count("/")):
        with contextlib.suppress(OSError):
            os.rmdir(dirpath)


# -- the record of what the node changed on the host ---------------------------------------------------------------


@dataclass
class HostRecord:
    """What the node changes on this machine, recorded before it changes anything, so it can be undone even after a
    crash (the next start or `make k8s-down` reads it from /run/pier-node/host.json)."""

    work: str = ""  # the node's work dir: every daemon's command line names it
    sysctls: dict[str, str] = field(default_factory=dict)
    iptables: list[str] = field(default_factory=list)
    made_dirs: list[str] = field(default_factory=list)  # fixed host paths that did not exist: removed
    emptied_dirs: list[str] = field(default_factory=list)  # ones that existed, empty: emptied again
    mount_roots: list[str] = field(
        default_factory=list
    )  # where its mounts are: state, containerd's and kubelet's roots
    forwarding_was_off: bool = False
    cni_cache_made: bool = False

    def save(self) -> None:
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        tmp = HOST_RECORD.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.__dict__, indent=1))
        tmp.replace(HOST_RECORD)

    @classmethod
    def load(cls) -> HostRecord | None:
        try:
            return cls(**json.loads(HOST_RECORD.read_text()))
        except (OSError, ValueError, TypeError):
            return None


def clean_host(record: HostRecord | None = None) -> list[str]:
    """Undo everything a node did to this machine (what a stop does, and what a crashed run left); idempotent.

    Returns what could not be restored (empty when the host is as it was)."""
    record = record or HostRecord.load()
    _kill_node_processes(record)
    # kube-proxy's chains and rules (its own --cleanup does this at a normal stop; here by name), then ours.
    _remove_iptables()
    _remove_mounts_links_cgroups(record)
    _clean_cni_cache(record)
    problems = _restore_recorded(record) if record else []
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    return problems


def _kill_node_processes(record: HostRecord | None) -> None:
    """Every process of the node: containerd's shims (they name our socket), the daemons (they name the node's
    work dir; they also die with the process that started them), then whatever still runs in the pods' cgroups
    (containers whose shim died)."""
    marks = [str(RUN_DIR)] + ([record.work] if record and record.work else [])
    _kill(_pids_matching(lambda argv: any(mark in a for a in argv for mark in marks)))
    for _ in range(50):
        pids = [pid for cg in _cgroup_dirs("kubepods") for pid in _processes_in(cg)]
        if not pids:
            break
        _kill(pids)
        time.sleep(0.1)


def _remove_mounts_links_cgroups(record: HostRecord | None) -> None:
    """Mounts (containers' root filesystems and network namespaces under our state dir, pods' volumes under the
    kubelet's root), the node's network links, the pods' cgroups."""
    roots = [RUN_DIR, *map(Path, record.mount_roots if record else [])]
    for point in _mounts_under(*roots):
        _run("umount", "-l", point, check=False)
    for link in (BRIDGE, NODE_LINK):  # the veth's peer goes with it
        _run("ip", "link", "del", link, check=False)
    for cgroup in _cgroup_dirs("kubepods"):
        _remove_cgroup_tree(cgroup)


def _clean_cni_cache(record: HostRecord | None) -> None:
    results = CNI_CACHE / "results"
    for pattern in (f"{CNI_NETWORK}-*", "cni-loopback-*"):
        for entry in results.glob(pattern) if results.is_dir() else ():
            entry.unlink(missing_ok=True)
    if record and record.cni_cache_made:
        with contextlib.suppress(OSError):
            results.rmdir()
            CNI_CACHE.rmdir()


def _restore_recorded(record: HostRecord) -> list[str]:
    """What the record says the node changed, put back (sysctls, directories); what could not be restored."""
    problems: list[str] = []
    for name, value in record.sysctls.items():
        try:
            _sysctl_path(name).write_text(value)
        except OSError as err:
            problems.append(f"sysctl {name}={value}: {err}")
    for path in map(Path, record.made_dirs):
        shutil.rmtree(path, ignore_errors=True)
    for path in map(Path, record.emptied_dirs):
        for entry in path.iterdir() if path.is_dir() else ():
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
    if record.iptables:  # recorded before the node changed anything
        left = [rule for rule in _iptables_rules() if rule not in record.iptables]
        if left:
            problems.append(f"iptables rules left: {left}")
    return problems


def _remove_iptables() -> None:
    """Our chain, and kube-proxy's (KUBE-*; kube-proxy --cleanup leaves its canary chains), with the jumps to them."""
    for command, table in IPTABLES:
        rules = _run(f"{command}-save", "-t", table, check=False).stdout.splitlines()
        chains = [line[1:].split()[0] for line in rules if line.startswith(":")]
        ours = [c for c in chains if c.startswith(("KUBE-", FORWARD_CHAIN))]
        for rule in rules:  # the jumps into our chains from the built-in ones
            if rule.startswith("-A ") and any(f"-j {c}" in rule for c in ours) and rule.split()[1] not in ours:
                _run(command, "-w", "-t", table, "-D", *shlex.split(rule)[1:], check=False)
        for chain in ours:
            _run(command, "-w", "-t", table, "-F", chain, check=False)
        for chain in ours:
            _run(command, "-w", "-t", table, "-X", chain, check=False)


# -- the machine-wide lock ---------------------------------------------------------------------------------------


class NodeLock:
    """One node per machine. The holder writes who it is into the lock file, for whoever waits."""

    def __init__(self) -> None:
        self._file: Any = None

    def acquire(self, timeout: float, holder: str) -> None:
        LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
        file = LOCK_PATH.open("a+")
        deadline = time.monotonic() + timeout
        told = False
        while True:
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                file.seek(0)
                other = file.read().strip() or "another process"
                # A cluster of `make k8s-up` stays until someone stops it: waiting would be in vain.
                if time.monotonic() > deadline or other.startswith("make k8s-up"):
                    file.close()
                    raise TimeoutError(
                        f"a Pier test node already runs on this machine ({other}); one at a time"
                    ) from None
                if not told:
                    print(f"waiting for the Pier test node of {other} to stop", flush=True)
                    told = True
                time.sleep(1)
        file.seek(0)
        file.truncate()
        file.write(holder)
        file.flush()
        self._file = file

    def release(self) -> None:
        if self._file is not None:
            self._file.truncate(0)
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


# -- watching the API for DNS records and volume claims --------------------------------------------------------


class _Watch(threading.Thread):
    """List, then watch, one resource; `handle(type, object)` for each ADDED/MODIFIED/DELETED, and a full resync
    (`sync(items)`) after every (re)list. Relists every few seconds, so a stop never waits long."""

    def __init__(self, cp: ControlPlane, path: str, handle: Callable[[str, dict], None], sync: Callable[[list], None]):
        super().__init__(daemon=True, name=f"watch {path}")
        self.cp, self.path, self.handle, self.sync = cp, path, handle, sync
        self.stopping = threading.Event()
        self.errors = 0

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                listing = self.cp.api("GET", self.path)
                self.sync(listing["items"])
                version = listing["metadata"]["resourceVersion"]
                url = f"{self.cp.server}{self.path}?watch=1&resourceVersion={version}&timeoutSeconds=5"
                with urllib.request.urlopen(url, timeout=15, context=self.cp.ssl_context()) as response:
                    for line in response:
                        event = json.loads(line)
                        if event.get("type") == "ERROR" or self.stopping.is_set():
                            break
                        self.handle(event["type"], event["object"])
            except (OSError, ValueError, KeyError, urllib.error.URLError):
                self.errors += 1
                self.stopping.wait(0.5)


class ClusterDns:
    """dnsmasq on the node's address, answering <service>.<namespace>.svc.cluster.local from the API's Services
    (one hosts file each, which dnsmasq re-reads on change) and nothing else: it has no upstream server."""

    def __init__(self, cp: ControlPlane, work: Path) -> None:
        self.hosts = work / "dns"
        self.staging = work / "dns.staging"  # files are written here, then renamed into `hosts` whole
        for path in (self.hosts, self.staging):
            path.mkdir(parents=True, exist_ok=True)
        self.watch = _Watch(cp, "/api/v1/services", self._event, self._sync)

    def argv(self) -> list[str]:
        return [
            "dnsmasq",
            "--keep-in-foreground",
            "--log-facility=-",
            "--conf-file=/dev/null",
            "--no-resolv",  # no upstream: a name outside the cluster gets no answer from elsewhere
            "--no-hosts",
            "--no-poll",
            f"--listen-address={NODE_IP}",
            "--bind-interfaces",
            f"--hostsdir={self.hosts}",
            f"--local=/{CLUSTER_DOMAIN}/",
            "--pid-file=",
            "--user=root",  # the hosts files sit in the test's private temp dir, which "nobody" cannot read
        ]

    def _file(self, service: dict) -> Path:
        meta = service["metadata"]
        return self.hosts / f"{meta['namespace']}.{meta['name']}"

    def _write(self, service: dict) -> None:
        ip = service["spec"].get("clusterIP")
        if not ip or ip == "None":
            return
        meta = service["metadata"]
        path = self._file(service)
        record = f"{ip} {meta['name']}.{meta['namespace']}.svc.{CLUSTER_DOMAIN}\n"
        if path.exists() and path.read_text() == record:
            return  # a resync: dnsmasq need not read it again
        staged = self.staging / path.name
        staged.write_text(record)
        staged.replace(path)  # dnsmasq reads every file of its directory: never a half-written one

    def _event(self, kind: str, service: dict) -> None:
        if kind == "DELETED":
            self._file(service).unlink(missing_ok=True)
        else:
            self._write(service)

    def _sync(self, services: list[dict]) -> None:
        names = {self._file(s).name for s in services}
        for path in self.hosts.iterdir():
            if path.name not in names:
                path.unlink(missing_ok=True)
        for service in services:
            self._write(service)


class HostPathProvisioner:
    """Volume claims of StorageClass pier-local get a PersistentVolume: a fresh host directory (mode 0777, as a
    cloud disk is writable by the pod's fsGroup); deleting the claim deletes both (reclaim policy Delete)."""

    def __init__(self, cp: ControlPlane, work: Path) -> None:
        self.cp = cp
        self.root = work / "volumes"
        self.root.mkdir(parents=True, exist_ok=True)
        self.watch = _Watch(cp, "/api/v1/persistentvolumeclaims", self._event, self._sync)

    def storage_class(self) -> dict:
        return {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {
                "name": STORAGE_CLASS,
                "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
            },
            "provisioner": PROVISIONER,
            "reclaimPolicy": "Delete",
            "volumeBindingMode": "Immediate",
        }

    def _event(self, kind: str, claim: dict) -> None:
        if kind == "DELETED":
            name = f"pvc-{claim['metadata']['uid']}"
            with contextlib.suppress(urllib.error.HTTPError):
                self.cp.api("DELETE", f"/api/v1/persistentvolumes/{name}")
            shutil.rmtree(self.root / name, ignore_errors=True)
            return
        spec, meta = claim["spec"], claim["metadata"]
        if spec.get("storageClassName") != STORAGE_CLASS or spec.get("volumeName"):
            return
        name = f"pvc-{meta['uid']}"
        path = self.root / name
        path.mkdir(exist_ok=True)
        path.chmod(0o777)
        volume = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": name, "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER}},
            "spec": {
                "capacity": {"storage": spec["resources"]["requests"]["storage"]},
                "accessModes": spec["accessModes"],
                "persistentVolumeReclaimPolicy": "Delete",
                "storageClassName": STORAGE_CLASS,
                "hostPath": {"path": str(path), "type": "Directory"},
                "claimRef": {"namespace": meta["namespace"], "name": meta["name"], "uid": meta["uid"]},
            },
        }
        with contextlib.suppress(urllib.error.HTTPError):  # 409: made already (a resync)
            self.cp.api("POST", "/api/v1/persistentvolumes", volume)

    def _sync(self, claims: list[dict]) -> None:
        for claim in claims:
            self._event("ADDED", claim)


# -- what leaves the machine -----------------------------------------------------------------------------------------


def _socket_table() -> dict[int, tuple[str, str]]:
    """inode → (remote address, TCP state or 'udp') of every connected TCP/UDP socket in this network namespace."""
    table = {}
    for name in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            remote, state, inode = cols[2], cols[3], int(cols[9])
            host_hex, port_hex = remote.split(":")
            raw = bytes.fromhex(host_hex)
            # /proc prints addresses as native-endian 32-bit words.
            packed = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            address = ipaddress.ip_address(packed)
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                address = address.ipv4_mapped
            table[inode] = (f"{address}:{int(port_hex, 16)}", "udp" if name.startswith("udp") else state)
    return table


_LOCAL = [ipaddress.ip_network(n) for n in ("127.0.0.0/8", "::1/128", f"{NODE_IP}/32", POD_CIDR, SERVICE_CIDR)]


def _is_local(remote: str) -> bool:
    address = ipaddress.ip_address(remote.rsplit(":", 1)[0])
    return address.is_unspecified or any(address in net for net in _LOCAL)


class EgressWatch(threading.Thread):
    """Samples, every 0.2 s, the remote end of every socket of the cluster's daemons (control plane, node daemons,
    containerd's shims): each must be this machine (loopback, the node address, the Service range) or a pod.
    Pods live in their own network namespaces: a daemon's socket to a pod shows the pod's address here."""

    def __init__(self, pids: Callable[[], dict[str, int]]) -> None:
        super().__init__(daemon=True, name="egress watch")
        self.pids = pids
        self.stopping = threading.Event()
        self.samples = 0
        self.connections: set[tuple[str, str]] = set()  # (daemon, remote) seen, local or not
        self.violations: set[tuple[str, str, str]] = set()  # (daemon, remote, state)

    def run(self) -> None:
        while not self.stopping.wait(0.2):
            self.sample()

    def sample(self) -> None:
        table = _socket_table()
        for daemon, pid in self.pids().items():
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    entry = table.get(int(target[8:-1]))
                    if entry is None:
                        continue
                    remote, state = entry
                    if remote.rsplit(":", 1)[0] in ("0.0.0.0", "::"):
                        continue  # listening or unconnected
                    self.connections.add((daemon, remote))
                    if not _is_local(remote):
                        self.violations.add((daemon, remote, state))
        self.samples += 1


# -- the node --------------------------------------------------------------------------------------------------------


class RealNode:
    """containerd + kubelet + kube-proxy + kube-scheduler + DNS + storage, for one ControlPlane. See the module doc.

    prepare() (lock, leftovers, network) must run before the control plane starts: the API server binds the
    node's address. Then start(control_plane); at the end stop_daemons(), the control plane's stop(), restore_host().
    """

    def __init__(
        self,
        work_dir: Path,
        bin_dir: Path,
        images: dict[str, Image],
        *,
        lock_timeout: float = 3600,
        lock_holder: str = "",
    ) -> None:
        self.work = Path(work_dir).resolve()
        self.bin_dir = bin_dir
        self.images = images
        self.lock_timeout = lock_timeout
        self.lock_holder = lock_holder or f"pid {os.getpid()} ({self.work})"
        self.logs = self.work / "logs"
        self.containerd_root = cache_root() / "node" / "containerd"
        self.kubelet_root = self.work / "kubelet"
        self.processes: list[Process] = []
        self.cp: ControlPlane | None = None
        self.dns: ClusterDns | None = None
        self.provisioner: HostPathProvisioner | None = None
        self.egress: EgressWatch | None = None
        self.record = HostRecord()
        self._lock = NodeLock()
        self.timings: dict[str, float] = {}

    # -- public -------------------------------------------------------------------------------------------------

    def prepare(self) -> RealNode:
        """Take the machine's node lock, clear a crashed run's leftovers, record the host, make the network."""
        if os.geteuid() != 0:
            raise PermissionError("a real node needs root (network, mounts, cgroups): run the tests as root")
        # Outside the try: without the lock, nothing here is ours to clean.
        self._lock.acquire(self.lock_timeout, self.lock_holder)
        try:
            leftovers = HostRecord.load()
            if leftovers is not None:
                clean_host(leftovers)
            for path in FIXED_DIRS:
                if path.exists() and any(path.iterdir()):
                    raise RuntimeError(
                        f"{path} is not empty: another kubelet or containerd uses it, or a node whose record "
                        f"({HOST_RECORD}) is lost left it (then remove it)"
                    )
            self.work.mkdir(parents=True, exist_ok=True)
            self.logs.mkdir(exist_ok=True)
            sysctls = _read_sysctls()
            self.record = HostRecord(
                work=str(self.work),
                sysctls=sysctls,
                iptables=_iptables_rules(),
                made_dirs=[str(p) for p in FIXED_DIRS if not p.exists()],
                emptied_dirs=[str(p) for p in FIXED_DIRS if p.exists()],
                mount_roots=[str(RUN_DIR), str(self.containerd_root), str(self.kubelet_root)],
                forwarding_was_off=sysctls.get("net/ipv4/ip_forward") == "0",
                cni_cache_made=not CNI_CACHE.exists(),
            )
            self.record.save()
            for path in FIXED_DIRS:
                path.mkdir(parents=True, exist_ok=True)
            self._make_network()
        except BaseException:
            self.restore_host()
            raise
        return self

    def start(self, cp: ControlPlane, timeout: float = 180) -> RealNode:
        """Start every daemon, import the images, wait until the node is Ready."""
        self.cp = cp
        t0 = time.monotonic()
        try:
            self.egress = EgressWatch(self.daemon_pids)
            self.egress.start()
            self._start_containerd()
            self.timings["containerd"] = time.monotonic() - t0
            self._import_images()
            self.timings["images"] = time.monotonic() - t0
            self._start_dns()
            self._start_kube_proxy()
            self._start_kubelet()
            self._start_scheduler()
            self._start_storage()
            self._wait(self._node_ready, timeout, "node Ready")
            self.timings["ready"] = time.monotonic() - t0
        except BaseException:
            self.stop_daemons()
            raise
        return self

    def daemon_pids(self) -> dict[str, int]:
        """Every process of the cluster (control plane, node daemons, containerd's shims) by name."""
        pids = {p.name: p.popen.pid for p in self.processes if p.popen.poll() is None}
        if self.cp is not None:
            pids.update(self.cp.pids)
        sock = str(SOCKET)
        for pid in _pids_matching(lambda argv: bool(argv) and "containerd-shim" in argv[0] and sock in argv):
            pids[f"containerd-shim-{pid}"] = pid
        return pids

    def stop_daemons(self) -> None:
        """Containers first (killed, removed), then the daemons; kube-proxy's rules go with `kube-proxy --cleanup`."""
        for watch in (self.dns, self.provisioner):
            if watch is not None:
                watch.watch.stopping.set()
        for proc in reversed(self.processes):
            if proc.name != "containerd":
                proc.stop()
        if SOCKET.exists():
            self._remove_containers()
        for proc in self.processes:
            if proc.name == "containerd":
                proc.stop()
        self.processes.clear()
        if (self.bin_dir / "kube-proxy").exists():
            _run(str(self.bin_dir / "kube-proxy"), "--cleanup", check=False)
        if self.egress is not None:
            self.egress.stopping.set()
            self.egress.join()

    def restore_host(self) -> None:
        """Undo what prepare() and the daemons did to the host, release the lock; raise if something stayed, or if
        a daemon of the cluster connected off this machine while it ran."""
        try:
            problems = clean_host(self.record)
        finally:
            self._lock.release()
        if self.egress is not None and self.egress.violations:
            problems.append(f"connections off this machine: {sorted(self.egress.violations)}")
        if problems:
            raise RuntimeError("the node left the host changed: " + "; ".join(problems))

    # -- node failures, for tests -----------------------------------------------------------------------------------

    def stop_kubelet(self) -> None:
        """Stop the kubelet alone, as when a node's agent dies: its containers go on running, nobody reports on
        them, and after the node controller's grace the node is NotReady (unknown) to the cluster."""
        kubelet = next(p for p in self.processes if p.name == "kubelet")
        kubelet.stop()
        self.processes.remove(kubelet)

    def start_kubelet(self) -> None:
        """Start the kubelet again (the same configuration); `wait_node_ready` then. From the thread that runs the
        tests: its processes die with the thread that started them (PR_SET_PDEATHSIG), so never in a helper
        thread (`asyncio.to_thread`'s end with its test's loop would take the kubelet with it)."""
        assert not any(p.name == "kubelet" for p in self.processes), "the kubelet runs already"
        self._start_kubelet()

    def wait_node_ready(self, timeout: float = 120) -> None:
        """Wait until the node is Ready again (blocking: from a thread of its own)."""
        self._wait(self._node_ready, timeout, "node Ready again")

    def kill_pod(self, pod_uid: str) -> None:
        """SIGKILL every process of a pod, its sandbox included, as a machine that dies takes them: its address
        goes with its network namespace. (With the kubelet stopped, nothing starts them again.)"""
        for container in self.pod_container_ids(pod_uid):
            with contextlib.suppress(LookupError, ProcessLookupError):  # not running
                os.kill(self.task_pid(container), signal.SIGKILL)

    # -- the runtime, for tests -------------------------------------------------------------------------------------

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run("ctr", "--address", str(SOCKET), "--namespace", "k8s.io", *args, check=check)

    def container_info(self, container_id: str) -> dict[str, Any]:
        """containerd's record of a container (`ctr containers info`): labels, image, and the OCI runtime spec
        runc ran it with."""
        return json.loads(self.ctr("containers", "info", container_id.removeprefix("containerd://")).stdout)

    def task_pid(self, container_id: str) -> int:
        """The host PID of a running container's first process."""
        container_id = container_id.removeprefix("containerd://")
        for line in self.ctr("tasks", "ls").stdout.splitlines()[1:]:
            cols = line.split()
            if cols[0] == container_id and cols[2] == "RUNNING":
                return int(cols[1])
        raise LookupError(f"no running task {container_id}")

    def container_ids(self) -> set[str]:
        return set(self.ctr("containers", "ls", "-q").stdout.split())

    def pod_container_ids(self, pod_uid: str) -> set[str]:
        """Every containerd container of a pod, its sandbox included (the CRI labels them with the pod's UID)."""
        return set(self.ctr("containers", "ls", "-q", f'labels."io.kubernetes.pod.uid"=={pod_uid}').stdout.split())

    def sandbox_pid(self, pod_uid: str) -> int:
        """The host PID of a pod's sandbox (pause) process."""
        for container in self.pod_container_ids(pod_uid):
            if self.container_info(container)["Labels"].get("io.cri-containerd.kind") == "sandbox":
                with contextlib.suppress(LookupError):
                    return self.task_pid(container)
        raise LookupError(f"no running sandbox for pod {pod_uid}")

    # -- network -------------------------------------------------------------------------------------------------

    def _make_network(self) -> None:
        _run("ip", "link", "add", NODE_LINK, "type", "veth", "peer", "name", f"{NODE_LINK[:-1]}1")
        _run("ip", "addr", "add", f"{NODE_IP}/32", "dev", NODE_LINK)
        _run("ip", "link", "set", NODE_LINK, "up")
        # The Service range ends at that link: kube-proxy's DNAT sends what is for a Service to its pods; anything
        # else for that range is dropped there instead of following the default route off the machine.
        _run("ip", "route", "add", SERVICE_CIDR, "dev", NODE_LINK, "src", NODE_IP)
        # The pods' bridge, made here rather than by the bridge plugin at the first pod: its route to the pod
        # range exists before any address in it is used.
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        _run("ip", "addr", "add", f"{POD_GATEWAY}/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        # A pod's default route is this host. Forwarded, its packets may only go back into the bridge (a Service's
        # pods, after kube-proxy's DNAT); anything else is refused here. When forwarding was off before (the bridge
        # plugin turns it on), nothing else may be forwarded either, as before.
        chain = FORWARD_CHAIN
        _run("iptables", "-w", "-N", chain)
        _run("iptables", "-w", "-A", chain, "-i", BRIDGE, "-o", BRIDGE, "-j", "ACCEPT")
        _run("iptables", "-w", "-A", chain, "-i", BRIDGE, "-j", "REJECT", "--reject-with", "icmp-admin-prohibited")
        _run("iptables", "-w", "-A", chain, "-o", BRIDGE, "-j", "DROP")
        if self.record.forwarding_was_off:
            _run("iptables", "-w", "-A", chain, "-j", "DROP")
        _run("iptables", "-w", "-I", "FORWARD", "1", "-j", chain)
        # Bridged pod-to-pod traffic must pass iptables, or a reply from a Service's pod would skip the un-DNAT.
        _sysctl_path("net/bridge/bridge-nf-call-iptables").write_text("1")
        _sysctl_path("net/ipv4/ip_forward").write_text("1")
        conf = self.work / "cni" / "net.d"
        conf.mkdir(parents=True, exist_ok=True)
        network = {
            "cniVersion": "0.4.0",
            "name": CNI_NETWORK,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    "ipMasq": False,  # nothing is NATed off the machine
                    "hairpinMode": True,  # a pod reaches itself through its own Service
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_CIDR, "gateway": POD_GATEWAY}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(self.work / "cni" / "ipam"),
                    },
                }
            ],
        }
        (conf / "10-pier.conflist").write_text(json.dumps(network, indent=1))

    # -- daemons -----------------------------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.processes.append(Process.spawn(name, argv, self.logs, self.work, env={**DAEMON_ENV, **(env or {})}))

    def _start_containerd(self) -> None:
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        self.containerd_root.mkdir(parents=True, exist_ok=True)
        hosts = self.work / "containerd" / "certs.d"
        # The usual registries resolve to a closed local port (containerd 1.6 wants a [host] table besides
        # `server`, and knows no `_default`): a missing image fails at once, and without a DNS lookup.
        closed = '"http://127.0.0.1:9"'
        for registry in ("docker.io", "registry.k8s.io", "k8s.gcr.io", "gcr.io", "ghcr.io", "quay.io", "localhost"):
            (hosts / registry).mkdir(parents=True, exist_ok=True)
            (hosts / registry / "hosts.toml").write_text(
                f'server = {closed}\n[host.{closed}]\n  capabilities = ["pull", "resolve"]\n'
            )
        cri = '[plugins."io.containerd.grpc.v1.cri"'
        config = f"""\
version = 2
root = "{self.containerd_root}"
state = "{RUN_DIR}/containerd"
# /opt/containerd and the snapshotters this node does not use: nothing made outside our own paths.
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{SOCKET}"
[ttrpc]
  address = "{SOCKET}.ttrpc"
[metrics]
  address = ""
{cri}]
  sandbox_image = "{self.images["pause"].ref}"
  # root here lacks CAP_SYS_RESOURCE: runc cannot set an oom_score_adj below containerd's own.
  restrict_oom_score_adj = true
  # Network namespaces under our state dir instead of /var/run/netns.
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
{cri}.containerd.runtimes.runc.options]
  BinaryName = "{shutil.which("runc") or "/usr/sbin/runc"}"
  Root = "{RUN_DIR}/runc"
  SystemdCgroup = false
{cri}.cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "{self.work / "cni" / "net.d"}"
{cri}.registry]
  config_path = "{hosts}"
"""
        path = self.work / "containerd" / "config.toml"
        path.write_text(config)
        # Any other registry too: containerd's image pulls go through a proxy at a closed local port (the API
        # server and the kubelet are not behind it: only containerd has this environment).
        proxy = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
        self._spawn("containerd", ["containerd", "--config", str(path)], env=proxy)
        self._wait(lambda: self.ctr("version", check=False).returncode == 0, 60, "containerd")

    def _import_images(self) -> None:
        """Import each image whose ID containerd does not have under its name (imports survive: the root is kept)."""
        present = set(self.ctr("images", "ls", "-q").stdout.split())
        stamp = self.containerd_root / "pier-images.json"
        try:
            imported = json.loads(stamp.read_text())
        except (OSError, ValueError):
            imported = {}
        for image in self.images.values():
            if image.ref in present and imported.get(image.ref) == image.id:
                continue
            self.ctr("images", "import", str(image.archive))
            imported[image.ref] = image.id
            stamp.write_text(json.dumps(imported, indent=1))
        # Earlier builds' images: their refs are ours (localhost/pier...) and no longer current.
        current = {image.ref for image in self.images.values()}
        stale = [ref for ref in present if ref.startswith("localhost/pier") and ref not in current]
        if stale:
            self.ctr("images", "rm", *stale, check=False)

    def _start_dns(self) -> None:
        assert self.cp is not None
        self.dns = ClusterDns(self.cp, self.work)
        self.dns.watch.start()
        (self.work / "resolv.conf").write_text(f"nameserver {NODE_IP}\n")
        self._spawn("dnsmasq", self.dns.argv())

    def _start_kube_proxy(self) -> None:
        assert self.cp is not None
        kubeconfig = self.cp.client_kubeconfig("kube-proxy", "system:kube-proxy")
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(kubeconfig)},
            "hostnameOverride": NODE_NAME,
            "bindAddress": NODE_IP,
            "healthzBindAddress": f"{NODE_IP}:10256",
            "metricsBindAddress": "127.0.0.1:10249",
            "clusterCIDR": POD_CIDR,
            "mode": "iptables",
            # kube-proxy would raise its own oom_score_adj and the conntrack table's size and timeouts: host
            # settings it has no need to change here (and the first needs CAP_SYS_RESOURCE).
            "oomScoreAdj": 0,
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        }
        path = self.work / "kube-proxy.yaml"
        path.write_text(json.dumps(config, indent=1))
        self._spawn("kube-proxy", [str(self.bin_dir / "kube-proxy"), f"--config={path}", "--v=1"])

    def _start_kubelet(self) -> None:
        assert self.cp is not None
        kubeconfig = self.cp.client_kubeconfig("kubelet", f"system:node:{NODE_NAME}", "system:nodes")
        self.kubelet_root.mkdir(exist_ok=True)
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": NODE_IP,
            "readOnlyPort": 0,
            "healthzPort": 0,
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(self.cp.ca_file)},
            },
            "authorization": {"mode": "Webhook"},
            "cgroupDriver": "cgroupfs",
            "failSwapOn": False,
            # No KUBE-MARK-*/KUBE-FIREWALL chains of the kubelet's own: kube-proxy makes what it needs.
            "makeIPTablesUtilChains": False,
            "clusterDNS": [NODE_IP],
            "clusterDomain": CLUSTER_DOMAIN,
            # Never the host's resolv.conf: its nameserver is off this machine.
            "resolvConf": str(self.work / "resolv.conf"),
            # The images cannot be pulled again: never garbage-collect them, never evict for the disk's sake.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
                "nodefs.inodesFree": "1%",
            },
            "serializeImagePulls": False,
            "rotateCertificates": False,
            "containerLogMaxSize": "10Mi",
        }
        path = self.work / "kubelet.yaml"
        path.write_text(json.dumps(config, indent=1))
        self._spawn(
            "kubelet",
            [
                str(self.bin_dir / "kubelet"),
                f"--config={path}",
                f"--kubeconfig={kubeconfig}",
                "--container-runtime=remote",
                f"--container-runtime-endpoint=unix://{SOCKET}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={NODE_IP}",
                f"--root-dir={self.kubelet_root}",
                f"--cert-dir={self.kubelet_root / 'pki'}",
                f"--volume-plugin-dir={self.kubelet_root / 'volume-plugins'}",
                f"--pod-infra-container-image={self.images['pause'].ref}",
                # The kubelet lowers its own oom_score_adj to -999 by default, which needs CAP_SYS_RESOURCE.
                "--oom-score-adj=0",
                "--v=1",
            ],
        )

    def _start_scheduler(self) -> None:
        assert self.cp is not None
        self.processes.append(self.cp.start_scheduler(self.logs, env=DAEMON_ENV))

    def _start_storage(self) -> None:
        assert self.cp is not None
        self.provisioner = HostPathProvisioner(self.cp, self.work)
        with contextlib.suppress(urllib.error.HTTPError):
            self.cp.api("POST", "/apis/storage.k8s.io/v1/storageclasses", self.provisioner.storage_class())
        self.provisioner.watch.start()

    def _remove_containers(self) -> None:
        """Kill and delete every task and container (sandboxes too): the node's pods end with it."""
        for container in self.ctr("containers", "ls", "-q", check=False).stdout.split():
            self.ctr("tasks", "kill", "--signal", "SIGKILL", container, check=False)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            running = [
                line for line in self.ctr("tasks", "ls", check=False).stdout.splitlines()[1:] if "RUNNING" in line
            ]
            if not running:
                break
            time.sleep(0.2)
        for container in self.ctr("containers", "ls", "-q", check=False).stdout.split():
            self.ctr("tasks", "delete", "--force", container, check=False)
            self.ctr("containers", "delete", container, check=False)

    # -- waiting --------------------------------------------------------------------------------------------------

    def _check_alive(self) -> None:
        for proc in self.processes:
            proc.check_alive()

    def _wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            with contextlib.suppress(OSError, ValueError, RuntimeError, urllib.error.URLError):
                if ready():
                    return
            time.sleep(0.2)
        logs = "\n".join(f"--- {p.name}\n{p.tail(15)}" for p in self.processes)
        raise TimeoutError(f"{what}: not after {timeout:.0f}s\n{logs}")

    def _node_ready(self) -> bool:
        assert self.cp is not None
        node = self.cp.api("GET", f"/api/v1/nodes/{NODE_NAME}")
        conditions = {c["type"]: c["status"] for c in ((node or {}).get("status") or {}).get("conditions") or []}
        return conditions.get("Ready") == "True"


class RealCluster:
    """The control plane and a real node, images built and imported: the Kubernetes tier's cluster."""

    def __init__(self, work_dir: Path, *, lock_timeout: float = 3600, lock_holder: str = "") -> None:
        self.work = Path(work_dir).resolve()
        self.lock_timeout = lock_timeout
        self.lock_holder = lock_holder
        self.bin_dir: Path | None = None
        self.images: dict[str, Image] = {}
        self.node: RealNode | None = None
        self.control_plane: ControlPlane | None = None
        self.timings: dict[str, float] = {}

    def build(self) -> RealCluster:
        """Install the Debian packages the cluster needs, build (or find cached) its binaries and images."""
        t0 = time.monotonic()
        subprocess.run([str(PACKAGES_SCRIPT)], check=True)
        self.bin_dir = build_k8s(NODE_BINARIES)
        self.timings["binaries"] = time.monotonic() - t0
        self.images = build_images()
        self.timings["images"] = time.monotonic() - t0 - self.timings["binaries"]
        return self

    def start(self) -> RealCluster:
        if self.bin_dir is None:
            self.build()
        assert self.bin_dir is not None
        t0 = time.monotonic()
        self.node = RealNode(
            self.work / "node", self.bin_dir, self.images, lock_timeout=self.lock_timeout, lock_holder=self.lock_holder
        )
        self.node.prepare()
        try:
            self.control_plane = ControlPlane(self.work / "control-plane", self.bin_dir, address=NODE_IP).start()
            self.node.start(self.control_plane)
        except BaseException:
            self.stop()
            raise
        self.timings["start"] = time.monotonic() - t0
        return self

    def stop(self) -> None:
        if self.node is not None:
            self.node.stop_daemons()
        if self.control_plane is not None:
            self.control_plane.stop()
        if self.node is not None:
            self.node.restore_host()

    def __enter__(self) -> RealCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def cp(self) -> ControlPlane:
        assert self.control_plane is not None
        return self.control_plane

    @property
    def real_node(self) -> RealNode:
        assert self.node is not None
        return self.node


def service_url(cp: ControlPlane, namespace: str, name: str, port: int | None = None) -> str:
    """http://<ClusterIP>:<port> of a Service: kube-proxy makes ClusterIPs reachable from this host too."""
    service = cp.api("GET", f"/api/v1/namespaces/{namespace}/services/{name}")
    if service is None:
        raise LookupError(f"no Service {namespace}/{name}")
    return f"http://{service['spec']['clusterIP']}:{port or service['spec']['ports'][0]['port']}"


def wait_for_service(cp: ControlPlane, namespace: str, name: str, path: str = "/readyz", timeout: float = 120) -> str:
    """The Service's URL once it answers `path` with 200: ready pods are behind it *and* kube-proxy has synced its
    rules (a second or so after the endpoints change; Helm's wait sees only the former)."""
    url = service_url(cp, namespace, name)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + path, timeout=2) as response:
                if response.status == 200:
                    return url
        except (OSError, urllib.error.URLError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}{path} did not answer 200 within {timeout:.0f}s")
        time.sleep(0.2)


def pod_containers(cp: ControlPlane, namespace: str, pod: str) -> dict[str, dict[str, Any]]:
    """The pod's container statuses (init containers too) by name, as the kubelet reports them."""
    obj = cp.api("GET", f"/api/v1/namespaces/{namespace}/pods/{pod}") or {}
    status = obj.get("status") or {}
    return {
        c["name"]: c for c in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]
    }
