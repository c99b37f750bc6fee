"""What only a real node shows: Pier's chart and sessions on containerd + kubelet, read back from the runtime.

The session's `real_cluster` (tests/k8s/realnode.py) is the control plane and one real node. This module installs
the chart with the real Helm engine as release `node` in namespace `pier-node`, image `localhost/pier-test` (the
Dockerfile's image plus server-everything under /opt/mcp-servers, as a platform team adds the servers it
offers), and four profiles beside the default `demo`: a Node server in the bridge's own container, server-everything
in an image of its own (attach mode), the demo server in a container of its own (attach mode: its crashes are
container restarts), and a server slow to start (readiness). What the tests assert is read from the kubelet's
reports, containerd, and the kernel (/proc, cgroups) — not from the pod specs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import statistics
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from pier.core.mcpsession import session_name
from tests.k8s.cluster import ControlPlane
from tests.k8s.realnode import RealCluster, RealNode, pod_containers
from tests.k8s.up import installed
from tests.servers import ROOT, text_of, wait_until

pytestmark = pytest.mark.k8s
NAMESPACE, RELEASE = "pier-node", "node"
KEY = "node-tier-app-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
EVERYTHING_JS = "/opt/mcp-servers/everything/node_modules/@modelcontextprotocol/server-everything/dist/index.js"
DEMO = ["python", "-m", "pier.examples.demo_server"]
ARTIFACTS = ROOT / "tests" / "artifacts"


@dataclass
class Deployed:
    cluster: RealCluster
    router: str  # http://<ClusterIP>:80 of the release's router Service

    @property
    def cp(self) -> ControlPlane:
        return self.cluster.cp

    @property
    def node(self) -> RealNode:
        return self.cluster.real_node

    def url(self, user: str, profile: str) -> str:
        return f"{self.router}/v1/users/{user}/servers/{profile}"

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        result = self.cp.kubectl("-n", NAMESPACE, "get", kind, name, "-o", "json", check=False)
        return json.loads(result.stdout) if result.returncode == 0 else None

    def session(self, user: str, profile: str) -> dict[str, Any]:
        return self.get("mcps", session_name(user, profile)) or {}

    def session_pod(self, user: str, profile: str) -> dict[str, Any]:
        name = (self.session(user, profile).get("status") or {}).get("podName")
        pod = self.get("pod", name) if name else None
        assert pod is not None, f"no pod for {user}/{profile}"
        return pod


@pytest.fixture(scope="module")
def deployed(real_cluster: RealCluster) -> Iterator[Deployed]:
    images = real_cluster.images
    values = {
        "auth": {"appKeys": [KEY]},
        "router": {"replicaCount": 1},
        "jobs": {"replicaCount": 1},
        # Quicker status refresh and replacement than the defaults (5 s, 2 s): the tests wait less.
        "operator": {"env": {"PIER_SYNC_INTERVAL_S": "1", "PIER_REPLACE_BACKOFF_S": "0.5"}},
        "profiles": {
            "everything": {"command": ["node", EVERYTHING_JS, "stdio"]},
            "everything-attach": {"command": ["node", EVERYTHING_JS, "stdio"], "image": images["everything"].ref},
            "demo-attach": {"command": DEMO, "image": images["pier-test"].ref},
            "slow-start": {"command": ["sh", "-c", f"sleep 6; exec {' '.join(DEMO)}"]},
        },
    }
    with installed(real_cluster, RELEASE, NAMESPACE, values, image="pier-test") as router:
        yield Deployed(real_cluster, router)


async def _call(
    http: aiohttp.ClientSession, deployed: Deployed, user: str, profile: str, tool: str, arguments: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    async with http.post(
        f"{deployed.url(user, profile)}/tools/{tool}/call", json={"arguments": arguments, "timeout_s": 60},
        headers=AUTH,
    ) as response:  # fmt: skip
        return response.status, await response.json()


async def _echo(http: aiohttp.ClientSession, deployed: Deployed, user: str, profile: str, message: str) -> str:
    status, body = await _call(http, deployed, user, profile, "echo", {"message": message})
    assert status == 200, body
    return body["result"]["content"][0]["text"]


def _ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions") or [])


# -- what the kernel says about a container's first process ------------------------------------------------


def _comm(pid: int | str) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def _children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _environ(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")


def _proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def _root_mount_options(pid: int) -> set[str]:
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == "/":
            return set(fields[5].split(","))
    raise LookupError(f"no root mount for {pid}")


def _memory_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return int(Path(f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes").read_text())
    raise LookupError(f"no memory cgroup for {pid}")


def _container_pid(deployed: Deployed, pod: dict[str, Any], container: str) -> int:
    status = pod_containers(deployed.cp, NAMESPACE, pod["metadata"]["name"])[container]
    return deployed.node.task_pid(status["containerID"])


def _bridge_status(deployed: Deployed, pod: dict[str, Any]) -> dict[str, Any]:
    """The bridge's /v1/status, asked with the release's bridge token (read as an admin)."""
    token = base64.b64decode(
        deployed.cp.kubectl("-n", NAMESPACE, "get", "secret", f"{RELEASE}-pier-bridge-token", "-o",
                            "jsonpath={.data.token}").stdout
    ).decode()  # fmt: skip
    request = urllib.request.Request(
        f"http://{pod['status']['podIP']}:8080/v1/status", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)


# -- the tests ---------------------------------------------------------------------------------------------------


async def test_chart_and_session_pods_are_containerd_containers_from_the_built_image(deployed, http):
    assert await _echo(http, deployed, "ada", "demo", "in a container") == "Echo: in a container"
    node = deployed.get("node", "pier-node")
    assert node is not None
    assert node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")
    image = deployed.cluster.images["pier-test"].ref
    pods = json.loads(deployed.cp.kubectl("-n", NAMESPACE, "get", "pods", "-o", "json").stdout)["items"]
    components = {p["metadata"]["labels"].get("app.kubernetes.io/component") for p in pods}
    assert {"redis", "router", "jobs", "operator"} <= components
    assert any(p["metadata"]["labels"].get("app.kubernetes.io/name") == "pier-session" for p in pods)
    running = deployed.node.container_ids()
    for pod in pods:
        assert pod["status"]["phase"] == "Running", pod["metadata"]["name"]
        for status in pod["status"]["containerStatuses"]:
            assert status["containerID"].startswith("containerd://"), (pod["metadata"]["name"], status)
            assert status["containerID"].removeprefix("containerd://") in running
            # Every Pier container (the operator's session pods included) runs the image built here.
            if status["name"] != "redis":
                assert status["image"] == image, (pod["metadata"]["name"], status["image"])
                info = deployed.node.container_info(status["containerID"])
                assert info["Image"] == image


async def test_a_node_server_runs_in_the_bridges_read_only_container(deployed, http):
    status, tools = 0, {}
    async with http.get(f"{deployed.url('grace', 'everything')}/tools", headers=AUTH) as response:
        status, tools = response.status, await response.json()
    assert status == 200, tools
    assert {"echo", "get-sum", "trigger-long-running-operation"} <= {t["name"] for t in tools["tools"]}
    assert await _echo(http, deployed, "grace", "everything", "from node") == "Echo: from node"
    status, body = await _call(http, deployed, "grace", "everything", "get-sum", {"a": 2, "b": 3})
    assert status == 200, body
    assert body["result"]["content"][0]["text"] == "The sum of 2 and 3 is 5."
    # The same session as an MCP server, through the router's relay.
    keyed = httpx2.AsyncClient(headers=AUTH, timeout=60)
    async with (
        keyed,
        Client(streamable_http_client(f"{deployed.url('grace', 'everything')}/mcp", http_client=keyed)) as c,
    ):
        assert text_of(await c.call_tool("echo", {"message": "mcp"})) == "Echo: mcp"
    # node is the bridge's child in the bridge's container: same uid, same read-only root.
    pod = deployed.session_pod("grace", "everything")
    bridge = _container_pid(deployed, pod, "bridge")
    node = [child for child in _children(bridge) if _comm(child) == "node"]
    assert node, _children(bridge)
    assert _proc_status(node[0])["Uid"].split() == ["10001"] * 4
    assert "ro" in _root_mount_options(node[0])


async def test_attach_mode_wires_a_server_in_its_own_image_through_fifos(deployed, http):
    assert await _echo(http, deployed, "hopper", "everything-attach", "attached") == "Echo: attached"
    pod = deployed.session_pod("hopper", "everything-attach")
    statuses = pod_containers(deployed.cp, NAMESPACE, pod["metadata"]["name"])
    assert statuses["prepare"]["state"]["terminated"]["exitCode"] == 0
    images = {name: deployed.node.container_info(s["containerID"])["Image"] for name, s in statuses.items()}
    assert images["bridge"] == deployed.cluster.images["pier-test"].ref
    assert images["server"] == deployed.cluster.images["everything"].ref
    # The FIFOs live in the pod's `io` emptyDir on this node; the server's stdin and stdout are those very FIFOs,
    # and the bridge (another container, another image) holds their other ends.
    io_dir = deployed.node.kubelet_root / "pods" / pod["metadata"]["uid"] / "volumes" / "kubernetes.io~empty-dir" / "io"
    fifo = {name: os.stat(io_dir / name) for name in ("stdin", "stdout")}
    server, bridge = _container_pid(deployed, pod, "server"), _container_pid(deployed, pod, "bridge")
    assert _comm(server) == "node"  # the wrapper exec'd the server
    assert os.stat(f"/proc/{server}/fd/0").st_ino == fifo["stdin"].st_ino
    assert os.stat(f"/proc/{server}/fd/1").st_ino == fifo["stdout"].st_ino
    bridge_fds = set()
    for fd in os.listdir(f"/proc/{bridge}/fd"):
        with contextlib.suppress(OSError):
            bridge_fds.add(os.stat(f"/proc/{bridge}/fd/{fd}").st_ino)
    assert {fifo["stdin"].st_ino, fifo["stdout"].st_ino} <= bridge_fds


async def test_the_security_context_holds_in_the_runtime(deployed, http):
    await _echo(http, deployed, "ada", "demo", "x")
    await _echo(http, deployed, "hopper", "everything-attach", "x")
    hardened = [
        _container_pid(deployed, deployed.session_pod("ada", "demo"), "bridge"),
        _container_pid(deployed, deployed.session_pod("hopper", "everything-attach"), "bridge"),
    ]
    router = json.loads(
        deployed.cp.kubectl(
            "-n", NAMESPACE, "get", "pods", "-l", "app.kubernetes.io/component=router", "-o", "json"
        ).stdout
    )["items"][0]
    hardened.append(_container_pid(deployed, router, "router"))
    for pid in hardened:
        status = _proc_status(pid)
        assert status["Uid"].split() == ["10001"] * 4
        assert status["Gid"].split() == ["10001"] * 4
        assert "10001" in status["Groups"].split()  # fsGroup
        assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == int(status["CapBnd"], 16) == 0
        assert status["NoNewPrivs"] == "1"
        assert status["Seccomp"] == "2"  # a filter: RuntimeDefault
        assert "ro" in _root_mount_options(pid)
    # The session bridge's memory limit is in its container's cgroup.
    assert _memory_limit(hardened[0]) == 256 * 1024 * 1024
    # The attach-mode server: the pod's user (the image's own USER 1000 is overridden), no capabilities,
    # seccomp, no privilege escalation, but a writable root filesystem (arbitrary server images write anywhere).
    server = _proc_status(_container_pid(deployed, deployed.session_pod("hopper", "everything-attach"), "server"))
    assert server["Uid"].split() == ["10001"] * 4
    assert int(server["CapEff"], 16) == int(server["CapBnd"], 16) == 0
    assert (server["NoNewPrivs"], server["Seccomp"]) == ("1", "2")
    server_pid = _container_pid(deployed, deployed.session_pod("hopper", "everything-attach"), "server")
    assert "rw" in _root_mount_options(server_pid)
    # And as the container sees it, through the kubelet's exec.
    pod = deployed.session_pod("ada", "demo")["metadata"]["name"]
    probe = (
        "import os, pathlib; print(os.getuid());\ntry: pathlib.Path('/x').touch()\nexcept OSError as e: print(e.errno)"
    )
    out = deployed.cp.kubectl("-n", NAMESPACE, "exec", pod, "-c", "bridge", "--", "python", "-c", probe).stdout.split()
    assert out == ["10001", "30"]  # EROFS


async def test_a_server_container_crash_is_restarted_and_counted_once(deployed, http):
    user, profile = "linus", "demo-attach"
    assert await _echo(http, deployed, user, profile, "before") == "Echo: before"
    status, body = await _call(http, deployed, user, profile, "crash", {})
    assert status == 502, body
    assert body["error"]["code"] == "SERVER_EXITED"
    pod = deployed.session_pod(user, profile)
    name = pod["metadata"]["name"]

    async def restarted() -> bool:
        server = pod_containers(deployed.cp, NAMESPACE, name)["server"]
        return server["restartCount"] == 1 and server["ready"]

    await wait_until(restarted, timeout=120, interval=0.3)
    server = pod_containers(deployed.cp, NAMESPACE, name)["server"]
    assert server["lastState"]["terminated"]["exitCode"] == 3  # crash() exits 3
    assert pod_containers(deployed.cp, NAMESPACE, name)["bridge"]["restartCount"] == 0
    assert await _echo(http, deployed, user, profile, "after") == "Echo: after"
    # One crash: the kubelet restarted the server container once, the bridge reattached once, and the session's
    # status counts one restart.
    assert _bridge_status(deployed, deployed.get("pod", name))["restarts"] == 1

    async def counted() -> bool:
        return ((deployed.session(user, profile).get("status") or {}).get("restarts") or 0) >= 1

    await wait_until(counted, timeout=30, interval=0.3)
    await asyncio.sleep(2)  # two more status refreshes: the count stays one
    assert deployed.session(user, profile)["status"]["restarts"] == 1


async def test_a_session_pod_killed_from_the_host_recovers(deployed, http):
    user = "kill"
    assert await _echo(http, deployed, user, "demo", "before") == "Echo: before"
    pod = deployed.session_pod(user, "demo")
    name, ip = pod["metadata"]["name"], pod["status"]["podIP"]
    os.kill(_container_pid(deployed, pod, "bridge"), signal.SIGKILL)

    async def bridge_restarted() -> bool:
        bridge = pod_containers(deployed.cp, NAMESPACE, name)["bridge"]
        session = deployed.session(user, "demo").get("status") or {}
        return bridge["restartCount"] == 1 and bridge["ready"] and session.get("phase") == "Ready"

    await wait_until(bridge_restarted, timeout=120, interval=0.3)
    assert await _echo(http, deployed, user, "demo", "after a container kill") == "Echo: after a container kill"

    # The whole pod's processes, its sandbox first: the kubelet makes a new sandbox (a new network namespace and
    # address) and restarts the containers in it; the operator publishes the new endpoint, the router follows.
    sandbox = deployed.node.sandbox_pid(pod["metadata"]["uid"])
    os.kill(sandbox, signal.SIGKILL)

    async def moved() -> bool:
        current = deployed.get("pod", name) or {}
        session = deployed.session(user, "demo").get("status") or {}
        new_ip = (current.get("status") or {}).get("podIP")
        return bool(new_ip) and new_ip != ip and session.get("endpoint") == f"http://{new_ip}:8080"

    await wait_until(moved, timeout=120, interval=0.3)
    assert deployed.get("pod", name) is not None  # the same pod: the node healed it
    assert await _echo(http, deployed, user, "demo", "after a sandbox kill") == "Echo: after a sandbox kill"


async def test_deleting_a_session_removes_its_pod_and_containers(deployed, http):
    user, profile = "dora", "demo-attach"
    await _echo(http, deployed, user, profile, "x")
    pod = deployed.session_pod(user, profile)
    uid = pod["metadata"]["uid"]
    containers = deployed.node.pod_container_ids(uid)
    assert len(containers) == 4  # the sandbox, prepare, bridge, server
    deployed.cp.kubectl("-n", NAMESPACE, "delete", "mcps", session_name(user, profile), "--wait=true")

    pod_dir = deployed.node.kubelet_root / "pods" / uid  # its volumes (the FIFOs' emptyDir among them)
    assert pod_dir.is_dir()

    async def gone() -> bool:
        return (
            deployed.get("pod", pod["metadata"]["name"]) is None
            and not deployed.node.pod_container_ids(uid)
            and not pod_dir.exists()
        )

    # The kubelet kills the containers at once; its housekeeping removes them and the pod's directory after.
    await wait_until(gone, timeout=180, interval=0.5)


async def test_the_readiness_probe_gates_routing(deployed, http):
    """A session's pod runs (its bridge listens) seconds before its server is up: until the kubelet's readiness probe
    passes, the router does not route to it; the call waits and is answered once the pod is Ready."""
    user = "slow"
    call = asyncio.create_task(_echo(http, deployed, user, "slow-start", "when ready"))
    name = session_name(user, "slow-start")
    seen_unready = False

    async def listening_but_unready() -> bool:
        nonlocal seen_unready
        status = (deployed.get("mcps", name) or {}).get("status") or {}
        pod = deployed.get("pod", status["podName"]) if status.get("podName") else None
        if not pod or not pod["status"].get("podIP") or _ready(pod):
            return False
        try:
            async with http.get(f"http://{pod['status']['podIP']}:8080/readyz") as response:
                answered = response.status
        except aiohttp.ClientError:
            return False
        seen_unready = answered == 503 and status.get("phase") == "Starting" and not status.get("endpoint")
        return seen_unready

    await wait_until(listening_but_unready, timeout=60, interval=0.2)
    assert not call.done()  # the bridge listens, the router holds the call
    assert await call == "Echo: when ready"
    assert seen_unready
    assert _ready(deployed.session_pod(user, "slow-start"))


async def test_cold_start_measured(deployed, http):
    """MCPSession created → first call answered, through the router, for new users: figures, not thresholds.
    The two servers alternate, and each sample starts once the previous session's pod is gone."""
    figures: dict[str, list[float]] = {"demo": [], "everything": []}
    for i in range(5):
        for profile, samples in figures.items():
            user = f"cold-{profile}-{i}"
            t0 = time.monotonic()
            assert await _echo(http, deployed, user, profile, "hi") == "Echo: hi"
            samples.append(round(time.monotonic() - t0, 2))
            pod = deployed.session_pod(user, profile)["metadata"]["name"]
            deployed.cp.kubectl("-n", NAMESPACE, "delete", "mcps", session_name(user, profile))
            await wait_until(lambda pod=pod: deployed.get("pod", pod) is None, timeout=120, interval=0.3)
    report = {p: {"seconds": v, "median": statistics.median(v)} for p, v in figures.items()}
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "k8s-cold-start.json").write_text(json.dumps(report, indent=1))
    print(f"\ncold start (MCPSession created -> first call answered): {report}")


async def test_no_daemon_of_the_cluster_connects_off_this_machine(deployed, http):
    await _echo(http, deployed, "ada", "demo", "a pod to look out of")
    node = deployed.node
    kubelet = next(p for p in node.processes if p.name == "kubelet")
    assert "AWS_EC2_METADATA_DISABLED=true" in _environ(kubelet.popen.pid)
    assert node.egress is not None
    node.egress.sample()
    assert node.egress.samples > 10  # it has watched since the node started
    assert any(daemon == "kubelet" for daemon, _ in node.egress.connections)  # and saw the daemons' sockets
    assert node.egress.violations == set()
    seen = sorted({(daemon.split("-")[0] if daemon.startswith("containerd-shim") else daemon, remote.rsplit(":", 1)[0])
                   for daemon, remote in node.egress.connections})  # fmt: skip
    print(f"\n{node.egress.samples} samples; daemons and the hosts they connected to: {seen}")
    # From a pod, the world ends at this machine: no route out, no DNS answer for outside names; the cluster's own
    # names resolve.
    pod = deployed.session_pod("ada", "demo")["metadata"]["name"]
    probe = (
        "import socket\n"
        "try: socket.create_connection(('192.0.2.1', 80), 5)\n"
        "except OSError as e: print(e.errno)\n"
        "try: socket.gethostbyname('pypi.org')\n"
        "except OSError as e: print('no-dns')\n"
        f"print(socket.gethostbyname('{RELEASE}-pier-redis'))\n"
    )
    out = deployed.cp.kubectl("-n", NAMESPACE, "exec", pod, "-c", "bridge", "--", "python", "-c", probe).stdout.split()
    redis = deployed.get("service", f"{RELEASE}-pier-redis")
    assert redis is not None
    assert out == ["113", "no-dns", redis["spec"]["clusterIP"]]  # EHOSTUNREACH: refused at this host


async def test_an_image_missing_on_the_node_is_pulled_from_nowhere(deployed):
    """containerd tries the registry at a closed local port: no DNS lookup, no connection off the machine."""
    for name, image in (("pull-hub", "docker.io/library/busybox:1.36"), ("pull-other", "public.ecr.aws/pier/none:1")):
        deployed.cp.kubectl("-n", NAMESPACE, "run", name, f"--image={image}", "--restart=Never")

    def pull_errors() -> list[str]:
        events = json.loads(deployed.cp.kubectl("-n", NAMESPACE, "get", "events", "-o", "json").stdout)["items"]
        return [
            e["message"]
            for e in events
            if e["involvedObject"]["name"] in ("pull-hub", "pull-other") and e["message"].startswith("Failed to pull")
        ]

    try:
        await wait_until(lambda: len({m.split('"')[1] for m in pull_errors()}) == 2, timeout=60, interval=0.5)
        for message in pull_errors():
            assert "127.0.0.1:9" in message, message  # the registry hosts' closed port, or the pull proxy's
            assert "connection refused" in message, message
            assert "lookup" not in message, message  # no name was resolved
    finally:
        deployed.cp.kubectl("-n", NAMESPACE, "delete", "pod", "pull-hub", "pull-other", "--wait=false", check=False)
