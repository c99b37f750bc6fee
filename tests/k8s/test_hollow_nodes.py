"""A node lost in a cluster of several: kubemark's hollow nodes (tests/k8s/hollow.py) beside the real node.

Two hollow nodes join the session's `real_cluster` (its control plane and scheduler), labelled and tainted so that
only this module's sessions go there: the operator (a local process, with deploy/'s RBAC) puts session pods on
them by node selector and toleration, as a platform team dedicates a node pool to tenants. Their pods' bridge is
the one real bridge every hollow pod's address leads to. One node is silenced (its kubelet stopped, SIGSTOP): it
stops heartbeating, the node controller finds it unreachable, and the session moves to the other node.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import yaml

from tests.k8s.cluster import ControlPlane
from tests.k8s.hollow import HOLLOW_LABEL, HollowNodes, SharedBridge
from tests.k8s.operators import deploy_access, operator_process
from tests.k8s.realnode import RealCluster
from tests.servers import ROOT, wait_until

pytestmark = pytest.mark.k8s
NAMESPACE = "pier"
TAINT = f"{HOLLOW_LABEL}=true:NoSchedule"
LONG_TOLERATION_S = 600


@pytest.fixture(scope="module")
def hollow(real_cluster: RealCluster, tmp_path_factory) -> Iterator[tuple[ControlPlane, HollowNodes]]:
    cp = real_cluster.cp
    cp.apply_crds(ROOT / "deploy" / "crds")
    access = deploy_access()
    cp.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(access))
    work = tmp_path_factory.mktemp("hollow")
    bridge = SharedBridge(work / "bridge").start()
    nodes = HollowNodes(cp, work / "nodes", 2, prefix="hollow-loss", taints=[TAINT])
    try:
        nodes.start()
        yield cp, nodes
    finally:
        nodes.stop()
        bridge.stop()
        cp.kubectl("delete", "mcps", "--all", "-n", NAMESPACE, "--wait=true", "--timeout=120s", check=False)
        cp.kubectl("delete", "-f", "-", "--wait=true", "--timeout=180s", input=yaml.safe_dump_all(access),
                   check=False, timeout=200)  # fmt: skip


@pytest.fixture
async def operator(hollow, tmp_path) -> AsyncIterator[asyncio.subprocess.Process]:
    cp, _ = hollow
    env = {
        "KUBECONFIG": str(cp.token_kubeconfig(NAMESPACE, "pier-operator")),
        "PIER_NAMESPACE": NAMESPACE,
        "PIER_PROFILES_INLINE": yaml.safe_dump({"profiles": {"demo": {"command": ["python", "-m", "x"]}}}),
        "PIER_BRIDGE_IMAGE": "pier-hollow:none",  # never pulled: a hollow pod runs nothing
        "PIER_SESSION_NODE_SELECTOR": json.dumps({HOLLOW_LABEL: "true"}),
        "PIER_SESSION_TOLERATIONS": json.dumps([{"key": HOLLOW_LABEL, "operator": "Exists", "effect": "NoSchedule"}]),
        "PIER_METRICS_PORT": "0",
        # Longer than the test waits for the move (the default 30 s is tests/operator/test_pods.py's): the taint
        # manager cannot evict the pod first, so a session that moves was moved by the operator, however slow
        # the machine.
        "PIER_NODE_LOSS_TOLERATION_S": str(LONG_TOLERATION_S),
    }
    async with operator_process(env, tmp_path / "operator.log") as proc:
        yield proc


def _get(cp: ControlPlane, kind: str, name: str) -> dict | None:
    result = cp.kubectl("get", kind, name, "-n", NAMESPACE, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def _events(cp: ControlPlane, name: str) -> list[dict]:
    out = cp.kubectl("get", "events", "-n", NAMESPACE, "--field-selector", f"involvedObject.name={name}", "-o", "json")
    return json.loads(out.stdout)["items"]


async def test_a_session_on_a_silenced_node_moves_to_another_node(hollow, operator):
    cp, nodes = hollow
    session = {
        "apiVersion": "pier.dev/v1alpha1",
        "kind": "MCPSession",
        "metadata": {"name": "roaming", "namespace": NAMESPACE},
        "spec": {"userId": "roaming", "server": {"profile": "demo"}},
    }
    cp.kubectl("apply", "-f", "-", input=json.dumps(session))

    def status() -> dict:
        return (_get(cp, "mcps", "roaming") or {}).get("status") or {}

    await wait_until(lambda: status().get("phase") == "Ready", timeout=90, interval=0.3)
    first = _get(cp, "pod", status()["podName"])
    assert first is not None
    lost = first["spec"]["nodeName"]
    assert lost in nodes.names
    # Kubernetes' own 300 s tolerations are replaced by the operator's (the cluster's backstop if it is gone).
    noexec = {t["key"]: t.get("tolerationSeconds") for t in first["spec"]["tolerations"] if t["effect"] == "NoExecute"}
    assert noexec == {
        key: LONG_TOLERATION_S for key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")
    }

    silenced = time.monotonic()
    nodes.silence(lost)
    try:

        def moved() -> bool:
            now = status()
            pod = _get(cp, "pod", now["podName"]) if now.get("podName") != first["metadata"]["name"] else None
            return pod is not None and now.get("phase") == "Ready" and pod["spec"]["nodeName"] != lost

        await wait_until(moved, timeout=180, interval=0.5)
        moved_after = time.monotonic() - silenced
        node = _get(cp, "node", lost) or {}
        ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
        assert ready == "Unknown"  # unreachable, as the node controller sees a node that stopped reporting
        # The operator acted on the node's state; the taint manager did not (it would only after the toleration).
        assert any(e["reason"] == "NodeLost" for e in _events(cp, "roaming"))
        assert not any(e["reason"] == "TaintManagerEviction" for e in _events(cp, first["metadata"]["name"]))
        old = _get(cp, "pod", first["metadata"]["name"])
        assert old is not None
        assert old["metadata"].get("deletionTimestamp")  # deleted, but its kubelet cannot confirm it yet
    finally:
        nodes.revive(lost)
    await wait_until(lambda: _get(cp, "pod", first["metadata"]["name"]) is None, timeout=120, interval=0.5)
    print(f"\nhollow node {lost} silenced -> the session Ready on another node: {moved_after:.0f} s")
