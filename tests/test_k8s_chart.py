"""The Helm chart on a real API server: server-side dry runs, then a real install serving calls.

The control plane is v1.20 (tests/k8s/cluster.py), so the chart is rendered with `kubeVersion:
1.20.2` here (PDBs and HPAs in the API versions it serves); tests/test_chart.py validates the
default render against current schemas. Pods run on the node emulator (tests/k8s/node.py), which
runs the image's commands (`pier router`, `pier operator`, `redis-server`…) as local processes.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.k8s.cluster import ControlPlane, build_controlplane
from tests.k8s.node import NodeEmulator
from tests.servers import ROOT, wait_until
from tests.test_chart import VALUES_SETS
from tools import helm

pytestmark = pytest.mark.k8s
OLD_CLUSTER = {"kubeVersion": "1.20.2"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[ControlPlane]:
    plane = ControlPlane(tmp_path_factory.mktemp("k8s-chart"), build_controlplane())
    plane.start()
    try:
        plane.kubectl("apply", "-f", str(helm.CHART / "crds"))  # as `helm install` does before the templates
        plane.kubectl("wait", "--for=condition=established", "crd/mcpsessions.pier.dev")
        yield plane
    finally:
        plane.stop()


def _manifests(objects: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(objects, sort_keys=False)


@pytest.mark.parametrize("name", VALUES_SETS)
def test_every_object_passes_a_server_side_dry_run(cluster, name):
    namespace = f"dry-{name}"
    cluster.kubectl("create", "namespace", namespace)
    objects = helm.render({**VALUES_SETS[name], **OLD_CLUSTER}, name="pier", namespace=namespace)
    # ServiceMonitor is the Prometheus Operator's CRD, which this control plane does not have.
    objects = [o for o in objects if o["kind"] != "ServiceMonitor"]
    result = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=_manifests(objects), check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("(server dry run)") == len(objects)


async def test_the_installed_chart_serves_calls_through_the_router(cluster, tmp_path, http):
    namespace, release = "pier-e2e", "e2e"
    cluster.kubectl("create", "namespace", namespace)
    objects = helm.render(OLD_CLUSTER, name=release, namespace=namespace)
    cluster.kubectl("apply", "-f", "-", input=_manifests(objects))
    node = NodeEmulator(cluster.kubeconfig, namespace, tmp_path)
    await node.start()
    try:
        # Redis, the operator, two routers and two workers come up from the chart's own objects.
        for workload in ("statefulset/e2e-pier-redis", "deployment/e2e-pier-router", "deployment/e2e-pier-jobs",
                         "deployment/e2e-pier-operator"):  # fmt: skip
            # In a thread: the emulator runs on this event loop.
            await asyncio.to_thread(
                cluster.kubectl, "rollout", "status", workload, "-n", namespace, "--timeout=120s", timeout=130
            )
        router = f"http://{(await node.service_addresses())['e2e-pier-router']}:8000"
        # The generated key, read as NOTES.txt tells users to.
        notes = helm.render_notes(OLD_CLUSTER, name=release, namespace=namespace)
        assert f"get secret {release}-pier-keys -o jsonpath='{{.data.app-key}}'" in notes
        encoded = await asyncio.to_thread(
            cluster.kubectl, "get", "secret", f"{release}-pier-keys", "-n", namespace, "-o", "jsonpath={.data.app-key}"
        )
        key = base64.b64decode(encoded.stdout).decode()
        alice = f"{router}/v1/users/alice/servers/demo"

        async with http.post(f"{alice}/tools/echo/call", json={"arguments": {"message": "x"}}) as response:
            assert response.status == 401  # the generated key is required

        auth = {"Authorization": f"Bearer {key}"}
        async with http.post(
            f"{alice}/tools/echo/call", json={"arguments": {"message": "from the chart"}}, headers=auth
        ) as response:
            body = await response.json()
            assert response.status == 200, body
        assert body["status"] == "completed"
        assert body["result"]["content"][0]["text"] == "Echo: from the chart"
        # The router asked for alice's MCPSession; the operator (in its pod) ran it.
        listing = await asyncio.to_thread(cluster.kubectl, "get", "mcpsessions.pier.dev", "-n", namespace, "-o", "json")
        sessions = json.loads(listing.stdout)["items"]
        assert [(s["spec"]["userId"], s["status"]["phase"]) for s in sessions] == [("alice", "Ready")]

        # A call that overruns its timeout is handed to the job pool, through the bundled Redis (with its password).
        async with http.post(
            f"{alice}/tools/slow/call", json={"arguments": {"seconds": 2}, "timeout_s": 0.5}, headers=auth
        ) as response:
            handed_off = await response.json()
            assert response.status == 202, handed_off
        job_url = f"{router}/v1/jobs/{handed_off['job_id']}"

        async def completed() -> bool:
            async with http.get(job_url, headers=auth) as response:
                return (await response.json())["status"] == "completed"

        await wait_until(completed, timeout=60, interval=0.3)
    finally:
        cluster.kubectl("delete", "mcps", "--all", "-n", namespace, "--wait=false", check=False)
        await node.stop()


def test_the_plain_manifests_apply(cluster):
    """deploy/ as `kubectl apply -k deploy/` sends it (kustomize), checked by the API server."""
    built = list(yaml.safe_load_all(cluster.kubectl("kustomize", str(ROOT / "deploy")).stdout))
    assert {o["kind"] for o in built} >= {"CustomResourceDefinition", "Namespace", "Deployment", "StatefulSet"}
    # deploy/ targets current clusters: policy/v1 PDBs, which v1.20 does not serve (test_chart validates them).
    objects = [o for o in built if o["kind"] not in ("CustomResourceDefinition", "PodDisruptionBudget", "Namespace")]
    cluster.kubectl("create", "namespace", "pier")
    result = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=_manifests(objects), check=False)
    assert result.returncode == 0, result.stderr
    assert "deployment.apps/pier-router created (server dry run)" in result.stdout


async def test_operator_replicas_share_the_work_and_replacements_take_over(cluster, tmp_path, http):
    """Two operator replicas (kopf peering): one pod per session, and fresh replicas take over at once."""
    namespace, release, key = "pier-ha", "ha", "ha-app-key-0123456789abcdef"
    values = {**OLD_CLUSTER, "operator": {"replicaCount": 2}, "router": {"replicaCount": 1},
              "jobs": {"replicaCount": 1}, "auth": {"appKeys": [key]}}  # fmt: skip
    cluster.kubectl("create", "namespace", namespace)
    cluster.kubectl("apply", "-f", "-", input=_manifests(helm.render(values, name=release, namespace=namespace)))
    node = NodeEmulator(cluster.kubeconfig, namespace, tmp_path)
    await node.start()

    def kubectl(*args: str) -> Any:
        result = cluster.kubectl(*args, "-n", namespace, "-o", "json", check=False)
        return json.loads(result.stdout) if result.returncode == 0 else None

    async def both_peers_present() -> bool:
        peering = await asyncio.to_thread(kubectl, "get", "kopfpeerings.kopf.dev", "pier")
        return len((peering or {}).get("status") or {}) == 2

    async def served(user: str) -> None:
        url = f"http://{(await node.service_addresses())['ha-pier-router']}:8000/v1/users/{user}/servers/demo"
        async with http.post(
            f"{url}/tools/echo/call", json={"arguments": {"message": user}}, headers={"Authorization": f"Bearer {key}"}
        ) as response:
            assert response.status == 200, await response.text()

    try:
        for workload in ("deployment/ha-pier-router", "deployment/ha-pier-operator"):
            await asyncio.to_thread(
                cluster.kubectl, "rollout", "status", workload, "-n", namespace, "--timeout=120s", timeout=130
            )
        await wait_until(both_peers_present, timeout=60, interval=0.5)
        await served("alice")
        session_pods = await asyncio.to_thread(kubectl, "get", "pods", "-l", "pier.dev/user=alice")
        assert len(session_pods["items"]) == 1  # two replicas, yet no second pod and no replacement
        # Both replicas go at once; their replacements must not wait out the departed peers' records.
        await asyncio.to_thread(
            cluster.kubectl, "delete", "pod", "-l", "app.kubernetes.io/component=operator", "-n", namespace
        )
        await served("bob")
        assert len((await asyncio.to_thread(kubectl, "get", "pods", "-l", "pier.dev/user=alice"))["items"]) == 1
    finally:
        cluster.kubectl("delete", "mcps", "--all", "-n", namespace, "--wait=false", check=False)
        await node.stop()
