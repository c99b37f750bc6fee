"""The Helm chart on a real cluster: server-side dry runs, then real installs serving calls.

The cluster is v1.20: the dry runs use a control plane alone (tests/k8s/cluster.py) and render with
`kubeVersion: 1.20.2` (PDBs and HPAs in the API versions it serves); tests/test_chart.py validates the
default render against current schemas. The installs go to the session's `real_cluster` (a real node:
kubelet, containerd, kube-proxy; tests/k8s/realnode.py) through the real Helm engine, as a platform team
installs: default values but the images built here (the Dockerfile's, and Redis), whose containers run
in containerd.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.k8s.chart_values import VALUES_SETS
from tests.k8s.cluster import ControlPlane, build_controlplane
from tests.k8s.up import app_key, installed
from tests.servers import ROOT, wait_until
from tools import helm

pytestmark = pytest.mark.k8s
OLD_CLUSTER = {"kubeVersion": "1.20.2"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[ControlPlane]:
    plane = ControlPlane(tmp_path_factory.mktemp("k8s-chart"), build_controlplane())
    plane.start()
    try:
        plane.apply_crds(helm.CHART / "crds")  # as `helm install` does before the templates
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
    # ServiceMonitor, PodMonitor, PrometheusRule and ScaledObject: the Prometheus Operator's and KEDA's CRDs,
    # which this control plane lacks.
    objects = [o for o in objects if not o["apiVersion"].startswith(("monitoring.coreos.com/", "keda.sh/"))]
    result = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=_manifests(objects), check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("(server dry run)") == len(objects)


async def test_the_installed_chart_serves_calls_through_the_router(real_cluster, http):
    namespace, release = "pier-e2e", "e2e"
    cp = real_cluster.cp
    with installed(real_cluster, release, namespace, {}) as router:
        # The generated key, read as NOTES.txt tells users to.
        notes = helm.render_notes({}, name=release, namespace=namespace)
        assert f"get secret {release}-pier-keys -o jsonpath='{{.data.app-key}}'" in notes
        key = app_key(cp, release, namespace)
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
        listing = await asyncio.to_thread(cp.kubectl, "get", "mcpsessions.pier.dev", "-n", namespace, "-o", "json")
        sessions = json.loads(listing.stdout)["items"]
        assert [(s["spec"]["userId"], s["status"]["phase"]) for s in sessions] == [("alice", "Ready")]

        # Redis, two routers, two workers, the operator and alice's session: containers in containerd on the node,
        # from the image built from the Dockerfile (the operator gives session pods the chart's image).
        pods = json.loads(cp.kubectl("-n", namespace, "get", "pods", "-o", "json").stdout)["items"]
        components = sorted(p["metadata"]["labels"].get("app.kubernetes.io/component", "session") for p in pods)
        assert components == ["jobs", "jobs", "operator", "operator", "redis", "router", "router", "session"]
        for pod in pods:
            assert pod["spec"]["nodeName"] == "pier-node"
            assert pod["status"]["phase"] == "Running"
            [container] = pod["status"]["containerStatuses"]
            assert container["containerID"].startswith("containerd://"), pod["metadata"]["name"]
            expected = real_cluster.images["redis" if container["name"] == "redis" else "pier"].ref
            assert container["image"] == expected

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


async def test_operator_replicas_share_the_work_and_replacements_take_over(real_cluster, http):
    """Two operator replicas (a Lease): one pod per session, and fresh replicas take over at once."""
    namespace, release, key = "pier-ha", "ha", "ha-app-key-0123456789abcdef"
    values = {"operator": {"replicaCount": 2}, "router": {"replicaCount": 1}, "jobs": {"replicaCount": 1},
              "auth": {"appKeys": [key]}}  # fmt: skip
    cp = real_cluster.cp

    def kubectl(*args: str) -> Any:
        result = cp.kubectl(*args, "-n", namespace, "-o", "json", check=False)
        return json.loads(result.stdout) if result.returncode == 0 else None

    async def one_leads() -> bool:
        lease = await asyncio.to_thread(kubectl, "get", "lease", "pier-operator")
        holder = ((lease or {}).get("spec") or {}).get("holderIdentity")
        pods = (await asyncio.to_thread(kubectl, "get", "pods", "-l", "app.kubernetes.io/component=operator"))["items"]
        return bool(holder) and holder in {p["metadata"]["name"] for p in pods}

    with installed(real_cluster, release, namespace, values) as router:

        async def served(user: str) -> None:
            async with http.post(
                f"{router}/v1/users/{user}/servers/demo/tools/echo/call",
                json={"arguments": {"message": user}}, headers={"Authorization": f"Bearer {key}"},
            ) as response:  # fmt: skip
                assert response.status == 200, await response.text()

        await wait_until(one_leads, timeout=60, interval=0.5)
        await served("alice")
        session_pods = await asyncio.to_thread(kubectl, "get", "pods", "-l", "pier.dev/user=alice")
        assert len(session_pods["items"]) == 1  # two replicas, yet no second pod and no replacement
        # Both replicas go at once; their replacements must not wait out the departed peers' records.
        operators = "app.kubernetes.io/component=operator"
        old = {
            p["metadata"]["name"] for p in (await asyncio.to_thread(kubectl, "get", "pods", "-l", operators))["items"]
        }
        await asyncio.to_thread(cp.kubectl, "delete", "pod", "-l", operators, "-n", namespace, "--wait=false")

        async def departed() -> bool:
            # A loaded node can take longer than kubectl's own wait to tear a pod down: poll instead.
            pods = await asyncio.to_thread(kubectl, "get", "pods", "-l", operators)
            return not old & {p["metadata"]["name"] for p in pods["items"]}

        await wait_until(departed, timeout=180, interval=1)
        await wait_until(one_leads, timeout=60, interval=0.5)  # a new replica holds the Lease: no wait for the old
        await served("bob")
        assert len((await asyncio.to_thread(kubectl, "get", "pods", "-l", "pier.dev/user=alice"))["items"]) == 1
