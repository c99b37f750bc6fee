"""Kubernetes: the MCPSession CRD, the operator and the router's Kubernetes backend on a real cluster.

The session's `real_cluster` (tests/k8s/realnode.py): kube-apiserver, kube-controller-manager, kube-scheduler,
kubelet and kube-proxy v1.20 built from Debian's source, etcd, containerd. The operator and the router run here as
local processes (this tree's code) with the ServiceAccount tokens of deploy/ (exactly its RBAC); the session pods
they make run on the real node, from the image built from the Dockerfile. `make test-k8s` runs this tier alone.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import yaml
from mcp import Client

from pier.cli.redis_server import free_port
from pier.core import tracing
from pier.core.catalog import Catalog, Profile, demo_profile
from pier.core.mcpsession import parse_stamp, session_name
from pier.router.usersecrets import secret_name
from tests import mcp_clients
from tests.hooks import Collector
from tests.k8s.cluster import ControlPlane
from tests.k8s.faulty_api import FaultyApi
from tests.k8s.operators import deploy_access, operator_process
from tests.k8s.realnode import RealCluster, pod_containers
from tests.prometheus import alert_queries, dashboard_queries, empty_queries, scraping, shipped
from tests.servers import ROOT, get_json, router_app, scrape, text_of, wait_until, worker_processes
from tools import helm

pytestmark = pytest.mark.k8s
NAMESPACE = "pier"
# The demo server as the image runs it (its `python` is the image's venv).
DEMO_PROFILE = yaml.safe_dump({"profiles": {"demo": {"command": ["python", "-m", "pier.examples.demo_server"]}}})


@pytest.fixture(scope="module")
def cluster(real_cluster: RealCluster) -> Iterator[ControlPlane]:
    plane = real_cluster.cp
    # deploy/'s CRDs, namespace and RBAC; not its workloads: these tests run operator and router themselves.
    plane.apply_crds(ROOT / "deploy" / "crds")
    access = deploy_access()
    plane.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(access))
    try:
        yield plane
    finally:
        # The cluster outlives this module: its sessions, pods and deploy/'s objects go (the CRDs stay).
        plane.kubectl("delete", "mcps", "--all", "-n", NAMESPACE, "--wait=true", "--timeout=120s", check=False)
        plane.kubectl("delete", "-f", "-", "--wait=true", "--timeout=180s", input=yaml.safe_dump_all(access),
                      check=False, timeout=200)  # fmt: skip


@pytest.fixture
def node(real_cluster: RealCluster, cluster: ControlPlane) -> Iterator[RealCluster]:
    """The real node, and no session left of a test when the next begins."""
    try:
        yield real_cluster
    finally:
        cluster.kubectl("delete", "mcps", "--all", "-n", NAMESPACE, "--wait=false", check=False)


@contextlib.asynccontextmanager
async def _operator(
    cluster: ControlPlane, node: RealCluster, log_path: Path, profiles: str = DEMO_PROFILE, metrics_port: int = 0,
    kubeconfig: Path | None = None,
) -> AsyncIterator[asyncio.subprocess.Process]:  # fmt: skip
    """`pier operator` as its own process, with the operator ServiceAccount's token; its pods run the image built
    from the Dockerfile."""
    env = {
        "KUBECONFIG": str(kubeconfig or cluster.token_kubeconfig(NAMESPACE, "pier-operator")),
        "PIER_NAMESPACE": NAMESPACE,
        "PIER_PROFILES_INLINE": profiles,
        "PIER_BRIDGE_IMAGE": node.images["pier"].ref,
        "PIER_SYNC_INTERVAL_S": "1",
        "PIER_REPLACE_BACKOFF_S": "0.5",
        "PIER_METRICS_PORT": str(metrics_port),
    }
    async with operator_process(env, log_path) as proc:
        yield proc


@pytest.fixture
async def operator(cluster, node, tmp_path) -> AsyncIterator[asyncio.subprocess.Process]:
    async with _operator(cluster, node, tmp_path / "operator.log") as proc:
        yield proc


def _apply(cluster: ControlPlane, manifest: dict) -> subprocess.CompletedProcess[str]:
    return cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest), check=False)


def _session(name: str, user: str, ttl: int = 3600) -> dict:
    return {
        "apiVersion": "pier.dev/v1alpha1",
        "kind": "MCPSession",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"userId": user, "server": {"profile": "demo"}, "ttlSeconds": ttl},
    }


def _get(cluster: ControlPlane, kind: str, name: str) -> dict | None:
    result = cluster.kubectl("get", kind, name, "-n", NAMESPACE, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


async def _found(cluster: ControlPlane, kind: str, name: str) -> dict:
    """An object that must exist."""
    obj = await asyncio.to_thread(_get, cluster, kind, name)
    assert obj is not None, f"no {kind} {name}"
    return obj


async def _ready(cluster: ControlPlane, name: str) -> dict:
    async def is_ready() -> bool:
        obj = await asyncio.to_thread(_get, cluster, "mcps", name)
        return bool(obj and (obj.get("status") or {}).get("phase") == "Ready")

    await wait_until(is_ready, timeout=90, interval=0.3)
    return await _found(cluster, "mcps", name)


async def _replaced(cluster: ControlPlane, name: str, pod: str) -> dict:
    """Waits until session `name` is Ready on a pod other than `pod`; its status then."""

    async def moved() -> bool:
        status = ((await asyncio.to_thread(_get, cluster, "mcps", name)) or {}).get("status") or {}
        return status.get("phase") == "Ready" and status.get("podName") != pod

    await wait_until(moved, timeout=90, interval=0.3)
    status: dict = (await _found(cluster, "mcps", name))["status"]
    return status


def _events(cluster: ControlPlane, name: str) -> dict[str, dict]:
    """The session's Events by reason (the last of each)."""
    out = cluster.kubectl(
        "get", "events", "-n", NAMESPACE, "--field-selector", f"involvedObject.name={name}", "-o", "json"
    )
    return {e["reason"]: e for e in json.loads(out.stdout)["items"]}


def _sessions(cluster: ControlPlane) -> list[dict]:
    items: list[dict] = json.loads(cluster.kubectl("get", "mcps", "-n", NAMESPACE, "-o", "json").stdout)["items"]
    return items


def _router_settings(cluster: ControlPlane) -> dict:
    return {
        "backend": "kubernetes",
        "namespace": NAMESPACE,
        "kubeconfig": cluster.token_kubeconfig(NAMESPACE, "pier-router"),
    }


async def test_an_applied_session_becomes_ready_and_serves_calls(cluster, operator, redis_server, http):
    assert _apply(cluster, _session("alice-demo", "alice")).returncode == 0
    session = await _ready(cluster, "alice-demo")
    status = session["status"]
    assert status["endpoint"].startswith("http://10.244.0.")  # the pod's address on the node's bridge
    assert status["serverInfo"]["name"] == "pier-demo"
    assert status["tools"] == 7
    assert status["observedGeneration"] == session["metadata"]["generation"]
    assert {c["type"]: c["status"] for c in status["conditions"]} == {"Ready": "True", "ServerRunning": "True"}
    table = cluster.kubectl("get", "mcps", "-n", NAMESPACE).stdout
    assert table.split("\n")[0].split() == ["NAME", "USER", "SERVER", "PHASE", "ENDPOINT", "AGE"]
    assert "alice-demo" in table
    assert "Ready" in table

    async with router_app(redis_server.url, catalog=Catalog([demo_profile()]), **_router_settings(cluster)) as running:
        # The router makes its own MCPSession for (alice, demo) and routes REST and MCP calls to it.
        async with http.post(
            f"{running.user_url('alice')}/tools/echo/call", json={"arguments": {"message": "in a pod"}}
        ) as response:
            body = await response.json()
        assert body["result"]["content"][0]["text"] == "Echo: in a pod", body
        async with Client(f"{running.user_url('alice')}/mcp") as client:
            assert text_of(await client.call_tool("echo", {"message": "mcp"})) == "Echo: mcp"
        names = cluster.kubectl("get", "mcps", "-n", NAMESPACE, "-o", "name").stdout.split()
        assert len(names) == 2  # ours above, and the router's


async def test_pods_are_replaced_and_crashes_counted(cluster, operator, node):
    _apply(cluster, _session("bob-demo", "bob"))
    first = (await _ready(cluster, "bob-demo"))["status"]["podName"]
    cluster.kubectl("delete", "pod", first, "-n", NAMESPACE, "--wait=false")
    status = await _replaced(cluster, "bob-demo", first)
    assert status["replacements"] == 1
    assert {"Started", "Ready", "Replaced"} <= set(_events(cluster, "bob-demo"))

    # The bridge's process, killed from the host: the kubelet restarts the container.
    bridge = pod_containers(cluster, NAMESPACE, status["podName"])["bridge"]
    os.kill(node.real_node.task_pid(bridge["containerID"]), signal.SIGKILL)

    async def restart_counted() -> bool:
        obj = await asyncio.to_thread(_get, cluster, "mcps", "bob-demo")
        return bool(obj and (obj.get("status") or {}).get("restarts", 0) >= 1)

    await wait_until(restart_counted, timeout=90, interval=0.3)


async def test_deleting_a_session_deletes_its_pod_and_idle_ones_are_reaped(cluster, operator, node, http):
    _apply(cluster, _session("carol-demo", "carol"))
    pod = (await _ready(cluster, "carol-demo"))["status"]["podName"]
    cluster.kubectl("delete", "mcps", "carol-demo", "-n", NAMESPACE)
    await wait_until(lambda: asyncio.to_thread(lambda: _get(cluster, "pod", pod) is None), timeout=60)

    # `busy`'s TTL leaves the test time to see it Ready and start its call before it is idle that long.
    _apply(cluster, _session("busy", "erin", ttl=5))
    busy = (await _ready(cluster, "busy"))["status"]["endpoint"]
    # A call that runs far longer than the TTL keeps its session alive the whole time.
    async with http.post(f"{busy}/v1/calls", json={"tool": "slow", "arguments": {"seconds": 60}, "wait_s": 0}) as r:
        call = (await r.json())["call_id"]
    _apply(cluster, _session("idle", "dave", ttl=2))
    await wait_until(lambda: asyncio.to_thread(lambda: _get(cluster, "mcps", "idle") is None), timeout=60)
    await asyncio.sleep(6)  # `busy` has now run its call for longer than its TTL, whatever `idle` took
    assert "Reaped" in _events(cluster, "idle")
    async with http.get(f"{busy}/v1/calls/{call}") as r:
        assert (await r.json())["status"] == "running"  # still going, well past the TTL...
    assert await asyncio.to_thread(_get, cluster, "mcps", "busy") is not None  # ...and its session still here


async def test_two_routers_racing_share_one_session(cluster, operator, redis_server, http):
    settings = _router_settings(cluster)
    catalog = Catalog([demo_profile()])
    async with (
        router_app(redis_server.url, catalog=catalog, **settings) as one,
        router_app(redis_server.url, catalog=catalog, **settings) as two,
    ):

        async def call(router, message: str) -> int:
            async with http.post(f"{router.user_url('frank')}/tools/counter/call", json={"arguments": {}}) as response:
                return (await response.json())["result"]["structuredContent"]["result"]

        counts = await asyncio.gather(*(call(r, "x") for r in (one, two, one, two)))
    assert sorted(counts) == [1, 2, 3, 4]  # one server saw all four calls
    assert [s["spec"]["userId"] for s in _sessions(cluster)].count("frank") == 1


@pytest.mark.parametrize("kind", ["python", "typescript"])
async def test_an_mcp_session_outlives_its_pod_replaced_and_its_mcpsession_deleted(
    cluster, operator, redis_server, http, kind
):
    user = f"grace-{kind}"
    catalog = Catalog([demo_profile()])
    async with router_app(redis_server.url, catalog=catalog, **_router_settings(cluster)) as running:
        async with mcp_clients.connect(kind, f"{running.user_url(user)}/mcp") as client:
            assert mcp_clients.counted(await client.call("counter")) == 1
            assert mcp_clients.counted(await client.call("counter")) == 2
            # (kubectl off the loop: the router runs on it.)
            sessions = await asyncio.to_thread(_sessions, cluster)
            name = next(s["metadata"]["name"] for s in sessions if s["spec"]["userId"] == user)

            # Its pod, deleted: once the operator's new pod is Ready, the next call starts a fresh server under the
            # same MCP session.
            pod = (await _found(cluster, "mcps", name))["status"]["podName"]
            await asyncio.to_thread(cluster.kubectl, "delete", "pod", pod, "-n", NAMESPACE, "--wait=true")
            await _replaced(cluster, name, pod)
            assert mcp_clients.counted(await client.call("counter")) == 1

            # Its MCPSession, deleted: the router makes a new one for the next call, the MCP session still the same.
            await asyncio.to_thread(cluster.kubectl, "delete", "mcps", name, "-n", NAMESPACE, "--wait=true")

            # (Until the router's watch brings the deletion, it may still route to the old pod, not yet gone.)
            async def let_go() -> bool:
                return not (await get_json(http, f"{running.url}/v1/users/{user}/sessions"))["sessions"]

            await wait_until(let_go, timeout=60, interval=0.3)
            assert mcp_clients.counted(await client.call("counter")) == 1
            assert await client.call("echo", message="moved") == "Echo: moved"
        resumed = (await scrape(http, running.url)).value("pier_router_mcp_sessions_resumed_total", profile="demo")
        assert resumed == 2


def test_invalid_specs_are_rejected_with_a_readable_message(cluster):
    bad = _session("bad", "x")
    bad["spec"]["server"] = {"profile": "demo", "command": ["sh"]}
    result = _apply(cluster, bad)
    assert result.returncode != 0
    assert "spec.server" in result.stderr
    bad["spec"] = {"server": {"profile": "demo"}}
    result = _apply(cluster, bad)
    assert result.returncode != 0
    assert 'missing required field "userId"' in result.stderr
    # Past kubectl's own checks, the API server's schema refuses it too.
    server_side = cluster.kubectl("apply", "--validate=false", "-f", "-", input=json.dumps(bad), check=False)
    assert server_side.returncode != 0
    assert "spec.userId: Required value" in server_side.stderr


def test_components_work_with_the_deploy_rbac_and_no_more(cluster):
    router = cluster.token_kubeconfig(NAMESPACE, "pier-router")
    operator = cluster.token_kubeconfig(NAMESPACE, "pier-operator")

    def can(kubeconfig: Path, *args: str) -> bool:
        return cluster.kubectl("auth", "can-i", *args, "-n", NAMESPACE, kubeconfig=kubeconfig,
                               check=False).stdout.strip() == "yes"  # fmt: skip

    assert can(router, "create", "mcpsessions.pier.dev")
    assert not can(router, "create", "pods")
    assert not can(router, "get", "secrets")
    assert can(operator, "create", "pods")
    assert can(operator, "patch", "mcpsessions.pier.dev/status")
    assert not can(operator, "create", "mcpsessions.pier.dev")
    assert not can(operator, "list", "secrets")
    default = cluster.token_kubeconfig(NAMESPACE, "default")
    denied = cluster.kubectl("get", "mcps", "-n", NAMESPACE, kubeconfig=default, check=False)
    assert denied.returncode != 0
    assert "forbidden" in denied.stderr.lower()


async def test_a_spec_change_replaces_the_pod(cluster, operator, node):
    _apply(cluster, _session("grace-demo", "grace"))
    before = (await _ready(cluster, "grace-demo"))["status"]["podName"]
    changed = _session("grace-demo", "grace")
    changed["spec"]["maxConcurrentCalls"] = 4
    assert _apply(cluster, changed).returncode == 0

    async def replaced() -> bool:
        obj = await asyncio.to_thread(_get, cluster, "mcps", "grace-demo")
        status = (obj or {}).get("status") or {}
        return status.get("phase") == "Ready" and status.get("observedGeneration") == 2

    await wait_until(replaced, timeout=90, interval=0.3)
    after = (await _found(cluster, "mcps", "grace-demo"))["status"]["podName"]
    assert after != before
    assert after.startswith("grace-demo-g2-")
    await wait_until(lambda: asyncio.to_thread(lambda: _get(cluster, "pod", before) is None), timeout=60)


def _pods(cluster: ControlPlane, selector: str) -> list[dict]:
    listing = cluster.kubectl("get", "pods", "-n", NAMESPACE, "-l", selector, "-o", "json").stdout
    return json.loads(listing)["items"]


def _of_sessions(names: list[str]) -> str:
    """A label selector for the pods of these sessions alone (earlier tests' sessions may still be going)."""
    return f"pier.dev/session in ({','.join(names)})"


def _pod_ready(pod: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


async def _warm(cluster: ControlPlane, size: int) -> list[str]:
    """The names of the demo profile's pooled pods, once `size` of them are ready and unclaimed."""

    async def full() -> bool:
        pods = await asyncio.to_thread(_pods, cluster, "pier.dev/pool=demo")
        usable = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        return len(usable) == size and all(_pod_ready(p) for p in usable)

    await wait_until(full, timeout=120, interval=0.5)
    return sorted(p["metadata"]["name"] for p in await asyncio.to_thread(_pods, cluster, "pier.dev/pool=demo"))


async def test_a_new_user_is_bound_to_a_warm_pod_and_the_pool_refills(cluster, node, redis_server, http, tmp_path):
    pooled = yaml.safe_load(DEMO_PROFILE)
    pooled["profiles"]["demo"]["warm_pool"] = 2
    metrics_port = free_port()
    catalog = Catalog([demo_profile().model_copy(update={"warm_pool": 2})])
    async with (
        _operator(cluster, node, tmp_path / "operator.log", yaml.safe_dump(pooled), metrics_port),
        router_app(redis_server.url, catalog=catalog, **_router_settings(cluster)) as running,
    ):
        warm = await _warm(cluster, 2)
        async with http.post(f"{running.user_url('grace')}/tools/counter/call", json={}) as response:
            assert (response.status, (await response.json())["result"]["structuredContent"]) == (200, {"result": 1})
        session = await _found(cluster, "mcps", session_name("grace", "demo"))
        bound = session["status"]["podName"]
        assert bound in warm  # a pod that was running before grace asked: no pod was started for her
        pod = await _found(cluster, "pod", bound)
        assert pod["metadata"]["labels"]["pier.dev/user"] == "grace"
        assert "pier.dev/pool" not in pod["metadata"]["labels"]
        assert [o["name"] for o in pod["metadata"]["ownerReferences"]] == [session["metadata"]["name"]]
        # The pool is full again, with a new pod in place of the claimed one.
        refilled = await _warm(cluster, 2)
        assert bound not in refilled
        assert len(set(refilled) - set(warm)) == 1
        assert "Claimed" in _events(cluster, session["metadata"]["name"])
        async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as response:
            metrics = await response.text()
        assert 'pier_operator_pool_claims_total{profile="demo"} 1.0' in metrics
        assert 'pier_operator_pool_size{profile="demo"} 2.0' in metrics

        # A session applied with a short TTL claims a pod that has idled in the pool for a while: its
        # idle time counts from the claim, not from the pod's warm-up (which would reap it at once).
        await asyncio.sleep(8)  # the pool's pods idle 8 s more: a precondition, not a measurement
        applied = time.time()
        _apply(cluster, _session("henry-demo", "henry", ttl=3))
        assert (await _ready(cluster, "henry-demo"))["status"]["podName"] in refilled
        await wait_until(lambda: asyncio.to_thread(lambda: _get(cluster, "mcps", "henry-demo") is None), timeout=60)
        reaped = _events(cluster, "henry-demo")["Reaped"]
        idle_s = int(reaped["message"].split()[2])  # "idle for N s (ttlSeconds 3)"
        at = parse_stamp(reaped["firstTimestamp"]).timestamp()
        assert 3 <= idle_s <= at - applied + 2  # + 2: the timestamps' whole seconds
    # Without the operator nobody keeps the pool: its pods go with the next test's cleanup.
    cluster.kubectl("delete", "pods", "-n", NAMESPACE, "-l", "pier.dev/pool", "--wait=false", check=False)


async def test_the_kubernetes_path_is_traced_and_the_operators_queries_return_series(
    cluster, node, redis_server, http, tmp_path, monkeypatch
):
    """A new user's call through the router on this cluster, traced from the caller to the operator's reconcile
    (the MCPSession's annotation carries the context), while a real Prometheus scrapes the operator: every query
    of the operator's dashboard, and the alerts on its metrics, return series."""
    caller = tracing.TraceContext(secrets.token_hex(16), secrets.token_hex(8))
    pooled = yaml.safe_load(DEMO_PROFILE)
    pooled["profiles"]["demo"]["warm_pool"] = 1
    metrics_port = free_port()
    async with Collector() as collector:
        # The operator's process and this process's router export to the collector.
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        catalog = Catalog([demo_profile().model_copy(update={"warm_pool": 1})])
        async with (
            _operator(cluster, node, tmp_path / "operator.log", yaml.safe_dump(pooled), metrics_port),
            router_app(redis_server.url, catalog=catalog, **_router_settings(cluster)) as running,
            scraping(tmp_path / "prometheus", http, {"operator": f"127.0.0.1:{metrics_port}"}) as prometheus,
        ):
            url = f"{running.user_url('ivan')}/tools/echo/call"
            headers = {"traceparent": caller.traceparent}
            async with http.post(url, json={"arguments": {"message": "hi"}}, headers=headers) as response:
                assert response.status == 200, await response.text()
            await _warm(cluster, 1)  # the pool refilled: the next new user claims its pod
            async with http.post(f"{running.user_url('judy')}/tools/echo/call", json={"arguments": {"message": "x"}}):
                pass
            await asyncio.to_thread(tracing.flush)
            await wait_until(lambda: collector.named("reconcile MCPSession", caller.trace_id), timeout=60)
            boards, spec = shipped()
            queries = dashboard_queries(boards["pier-operator.json"]) + alert_queries(spec, operator=True)
            empty = await empty_queries(prometheus, http, queries)
    assert not empty, "queries that return no series (a metric renamed or mistyped?):\n" + "\n".join(empty)
    spans = collector.trace(caller.trace_id)
    by_name = {s.name: s for s in spans}
    assert by_name["session acquire"].attributes["pier.session.acquired"] == "created"
    create = by_name["MCPSession create"]
    assert (create.kind, create.service) == ("client", "pier-router")
    assert "MCPSession wait Ready" in by_name
    reconciles = [s for s in spans if s.name == "reconcile MCPSession"]
    assert reconciles
    assert {(s.service, s.parent_id) for s in reconciles} == {("pier-operator", create.span_id)}
    assert by_name["POST /v1/calls"].attributes["http.response.status_code"] == 200  # the call, to the pod's bridge
    cluster.kubectl("delete", "pods", "-n", NAMESPACE, "-l", "pier.dev/pool", "--wait=false", check=False)


async def test_a_call_while_the_pod_is_pending_is_handed_off_then_completes(
    cluster, node, redis_server, http, tmp_path
):
    # The demo server behind a three-second start, so the pod is surely not Ready at the call's deadline.
    slow = {"command": ["sh", "-c", "sleep 3; exec python -m pier.examples.demo_server"]}
    async with (
        _operator(cluster, node, tmp_path / "operator.log", yaml.safe_dump({"profiles": {"demo": slow}})),
        router_app(redis_server.url, catalog=Catalog([demo_profile()]), **_router_settings(cluster)) as running,
        worker_processes(redis_server.url),
    ):
        url = running.user_url("heidi")
        async with http.post(f"{url}/tools/counter/call", json={"timeout_s": 1}) as response:
            assert response.status == 202
            job = await response.json()
        session = await _found(cluster, "mcps", session_name("heidi", "demo"))
        assert (session.get("status") or {}).get("phase") != "Ready"  # handed off before the pod was up

        record: dict = {}

        async def finished() -> bool:
            record.update(await get_json(http, f"{running.url}{job['poll_url']}"))
            return record["status"] not in ("queued", "running")

        await wait_until(finished, timeout=120, interval=0.5)
        assert (record["status"], record["result"]["structuredContent"]) == ("completed", {"result": 1})
        async with http.post(f"{url}/tools/count/call", json={}) as response:
            assert (await response.json())["result"]["structuredContent"]["result"] == 1  # it ran exactly once


async def test_a_users_own_secret_reaches_only_their_pod(cluster, node, redis_server, http, tmp_path):
    # The router's Role as the chart renders it when a profile takes users' secrets.
    with_secrets = {"profiles": {"demo": {"command": ["x"], "user_secrets": {"DEMO_TOKEN": {"required": True}}}}}
    role = next(
        o for o in helm.render(with_secrets, name="pier", namespace=NAMESPACE)
        if o["kind"] == "Role" and o["metadata"]["name"] == "pier-router"
    )  # fmt: skip
    cluster.kubectl("apply", "-f", "-", input=json.dumps(role))
    profile = Profile.model_validate(
        {**demo_profile().model_dump(), "user_secrets": {"DEMO_TOKEN": {"required": True}}}
    )
    values = {"ivan": "ivan-" + os.urandom(8).hex(), "judy": "judy-" + os.urandom(8).hex()}
    try:
        async with (
            _operator(cluster, node, tmp_path / "operator.log"),
            router_app(redis_server.url, catalog=Catalog([profile]), **_router_settings(cluster)) as running,
        ):

            async def env_hash(user: str) -> tuple[int, dict]:
                async with http.post(
                    f"{running.user_url(user)}/tools/env_hash/call", json={"arguments": {"name": "DEMO_TOKEN"}}
                ) as response:
                    return response.status, await response.json()

            status, body = await env_hash("ivan")
            assert (status, body["error"]["code"]) == (409, "SECRETS_REQUIRED")
            for user, value in values.items():
                async with http.put(f"{running.user_url(user)}/secrets", json={"DEMO_TOKEN": value}) as response:
                    assert response.status == 204
            for user, value in values.items():
                status, body = await env_hash(user)
                digest = hashlib.sha256(value.encode()).hexdigest()[:16]
                assert (status, body["result"]["structuredContent"]["result"]) == (200, digest)
            # Each value lives in its user's Secret, referenced by that user's pod and copied nowhere else.
            for user, value in values.items():
                secret = await _found(cluster, "secret", secret_name(user, "demo"))
                assert base64.b64decode(secret["data"]["DEMO_TOKEN"]).decode() == value
                session = await _found(cluster, "mcps", session_name(user, "demo"))
                pod = json.dumps(await _found(cluster, "pod", session["status"]["podName"]))
                assert secret_name(user, "demo") in pod
                assert value not in pod + json.dumps(session)
    finally:
        cluster.kubectl("delete", "secrets", "-n", NAMESPACE, "-l", "app.kubernetes.io/managed-by=pier-router",
                        check=False)  # fmt: skip
        cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(deploy_access()))  # deploy/'s Role again


# -- a node lost, bad input, faults ------------------------------------------------------------------------------


async def _job(http, url: str, tool: str, arguments: dict, headers: dict | None = None) -> str:
    async with http.post(f"{url}/tools/{tool}/call", json={"arguments": arguments, "timeout_s": 1},
                         headers=headers or {}) as response:  # fmt: skip
        body = await response.json()
        assert response.status == 202, body
        return str(body["job_id"])


async def _job_ended(http, router_url: str, job_id: str) -> dict:
    record: dict = {}

    async def ended() -> bool:
        record.update(await get_json(http, f"{router_url}/v1/jobs/{job_id}"))
        return record["status"] not in ("queued", "running")

    await wait_until(ended, timeout=300, interval=0.5)
    return record


async def test_a_node_whose_kubelet_stops_loses_its_pods_to_new_ones_and_their_jobs_follow(
    cluster, node, redis_server, http, tmp_path
):
    """The node's agent dies and its pods' processes with it (the kubelet stopped, the pod killed from the host):
    after the node controller's grace the node is NotReady, and the operator replaces the pod at once rather than
    waiting out the default five-minute eviction. With one node, the new pod waits for the kubelet to come back.
    A handed-off retry-safe call is re-run in the new pod; one that is not fails SESSION_LOST."""
    async with (
        _operator(cluster, node, tmp_path / "operator.log"),
        router_app(redis_server.url, catalog=Catalog([demo_profile()]), **_router_settings(cluster)) as running,
        worker_processes(redis_server.url),
    ):
        url, name = running.user_url("nadia"), session_name("nadia", "demo")
        async with http.post(f"{url}/tools/echo/call", json={"arguments": {"message": "before"}}) as response:
            assert response.status == 200, await response.text()
        before = (await _found(cluster, "mcps", name))["status"]
        old_pod = await _found(cluster, "pod", before["podName"])
        # Two calls handed off (a 1 s timeout), both running in the pod when its node dies.
        safe = await _job(http, url, "slow", {"seconds": 10})  # read-only: retry-safe
        unsafe = await _job(http, url, "counter", {"delay_s": 10})  # neither read-only nor keyed: not retry-safe
        lost_at = time.monotonic()
        node.real_node.stop_kubelet()
        try:
            node.real_node.kill_pod(old_pod["metadata"]["uid"])
            failed = await _job_ended(http, running.url, unsafe)
            assert (failed["status"], failed["error"]["code"]) == ("failed", "SESSION_LOST"), failed

            async def replaced() -> bool:
                status = ((await asyncio.to_thread(_get, cluster, "mcps", name)) or {}).get("status") or {}
                return status.get("podName") not in (None, before["podName"])

            await wait_until(replaced, timeout=180, interval=0.5)
            replaced_after = time.monotonic() - lost_at
            events = _events(cluster, name)
            assert "NodeLost" in events, events
            assert events["NodeLost"]["type"] == "Warning"
            assert before["podName"] in events["NodeLost"]["message"]
        finally:
            node.real_node.start_kubelet()
            await asyncio.to_thread(node.real_node.wait_node_ready)
        # Back: the old pod is confirmed gone, the new one runs, the router follows, and the retry-safe call ran again.
        rerun = await _job_ended(http, running.url, safe)
        assert (rerun["status"], rerun["attempts"]) == ("completed", 2), rerun
        assert rerun["result"]["content"][0]["text"] == "Slept 10.0 seconds"
        async with http.post(f"{url}/tools/echo/call", json={"arguments": {"message": "after"}}) as response:
            assert (await response.json())["result"]["content"][0]["text"] == "Echo: after"
        after = (await _found(cluster, "mcps", name))["status"]
        assert after["endpoint"] != before["endpoint"]
        assert after["replacements"] == 1
        gone = old_pod["metadata"]["name"]
        await wait_until(lambda: asyncio.to_thread(lambda: _get(cluster, "pod", gone) is None), timeout=120)
    print(f"\nnode lost -> replacement pod created: {replaced_after:.0f} s (the node controller's grace is 40 s)")


async def test_sessions_the_operator_cannot_serve_fail_with_a_reason_and_hold_up_no_one(cluster, operator, node):
    """An unknown profile, and resources the API server refuses in a pod: each session fails once, with why; the
    good sessions applied with them get Ready."""
    bad = _session("nope", "x1")
    bad["spec"]["server"] = {"profile": "no-such-profile"}
    invalid = _session("lots", "x2")
    invalid["spec"]["server"]["resources"] = {"limits": {"cpu": "lots"}}  # valid to the CRD, not in a pod
    good = [_session(f"fine-{i}", f"fine{i}") for i in range(2)]
    assert _apply(cluster, {"apiVersion": "v1", "kind": "List", "items": [bad, invalid, *good]}).returncode == 0
    for manifest in good:
        await _ready(cluster, manifest["metadata"]["name"])

    async def failed(name: str) -> dict:
        async def is_failed() -> bool:
            return ((await asyncio.to_thread(_get, cluster, "mcps", name)) or {}).get("status", {}).get(
                "phase"
            ) == "Failed"

        await wait_until(is_failed, timeout=60, interval=0.3)
        return (await _found(cluster, "mcps", name))["status"]

    unknown = await failed("nope")
    ready = {c["type"]: c for c in unknown["conditions"]}["Ready"]
    assert (ready["reason"], ready["message"]) == ("InvalidSpec", "no server profile 'no-such-profile'")
    refused = await failed("lots")
    ready = {c["type"]: c for c in refused["conditions"]}["Ready"]
    assert ready["reason"] == "PodInvalid"
    assert "quantities must match the regular expression" in ready["message"]
    assert _events(cluster, "lots")["PodInvalid"]["type"] == "Warning"
    await asyncio.sleep(3)  # three passes more: nothing is tried again, nothing is written again
    assert (await _found(cluster, "mcps", "lots"))["status"] == refused
    assert not _pods(cluster, "pier.dev/session in (nope,lots)")


async def test_the_operator_killed_in_the_middle_of_a_burst_loses_nothing_and_doubles_nothing(cluster, node, tmp_path):
    names = [f"burst-{i}" for i in range(6)]
    burst = {"apiVersion": "v1", "kind": "List", "items": [_session(n, f"b{i}") for i, n in enumerate(names)]}
    async with _operator(cluster, node, tmp_path / "operator.log") as first:
        assert _apply(cluster, burst).returncode == 0

        async def some_pods() -> bool:
            return bool(await asyncio.to_thread(_pods, cluster, _of_sessions(names)))

        await wait_until(some_pods, timeout=30, interval=0.05)
        first.kill()  # mid-burst: some sessions have pods and a status, some a pod and no status, some nothing
        await first.wait()
    async with _operator(cluster, node, tmp_path / "operator.log"):
        for name in names:
            status = (await _ready(cluster, name))["status"]
            assert status["podName"] == f"{name}-g1-0"
            assert status["replacements"] == 0
        pods = await asyncio.to_thread(_pods, cluster, _of_sessions(names))
        assert sorted(p["metadata"]["name"] for p in pods) == sorted(f"{n}-g1-0" for n in names)


async def test_an_api_server_refusing_for_30_s_delays_the_operator_but_loses_nothing(cluster, node, tmp_path):
    """The one fault the real API server cannot be asked for: tests/k8s/faulty_api.py stands in front of it."""
    async with FaultyApi(cluster) as proxy:
        kubeconfig = proxy.kubeconfig(cluster.token_kubeconfig(NAMESPACE, "pier-operator"))
        async with _operator(cluster, node, tmp_path / "operator.log", kubeconfig=kubeconfig):
            _apply(cluster, _session("calm", "calm"))
            await _ready(cluster, "calm")
            proxy.fail_for(30)
            names = [f"storm-{i}" for i in range(3)]
            for i, name in enumerate(names):  # applied straight to the API server, while the operator gets refusals
                assert _apply(cluster, _session(name, f"storm{i}")).returncode == 0
            await asyncio.sleep(5)
            assert all((_get(cluster, "mcps", n) or {}).get("status") in (None, {}) for n in names)  # not yet
            await wait_until(lambda: not proxy.failing, timeout=40, interval=0.5)
            for name in names:
                status = (await _ready(cluster, name))["status"]
                assert (status["podName"], status["replacements"]) == (f"{name}-g1-0", 0)
            assert (await _found(cluster, "mcps", "calm"))["status"]["phase"] == "Ready"
            assert proxy.answered.get(429)
            assert proxy.answered.get(500)
        pods = await asyncio.to_thread(_pods, cluster, _of_sessions(["calm", *names]))
        assert sorted(p["metadata"]["name"] for p in pods) == sorted(f"{n}-g1-0" for n in ["calm", *names])
