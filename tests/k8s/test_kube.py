"""Against the real API server: the informers router and operator keep the cluster in memory with
(pier.core.kube), and the Lease operator replicas elect their leader with (pier.operator.leader)."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest

from pier.core.kube import ApiAccess, Informer, KubeClient
from pier.operator.leader import LeaderElection
from tests.servers import wait_until

pytestmark = pytest.mark.k8s
NAMESPACE = "informer"


async def test_an_informer_lists_in_pages_watches_and_relists_with_what_it_missed(real_cluster, http):
    cp = real_cluster.cp
    cp.kubectl("create", "namespace", NAMESPACE)
    try:
        for i in range(3):
            cp.kubectl("create", "configmap", f"c{i}", "-n", NAMESPACE, f"--from-literal=n={i}")
        client = KubeClient(http, ApiAccess(cp.kubeconfig))
        informer = Informer(client, f"/api/v1/namespaces/{NAMESPACE}/configmaps", page_size=2)
        seen: list[tuple[str, str]] = []
        informer.subscribe(lambda name, before, after: seen.append((name, "gone" if after is None else "here")))
        task = asyncio.create_task(informer.run())
        await asyncio.wait_for(informer.synced.wait(), 30)
        assert {f"c{i}" for i in range(3)} <= set(informer.items)  # two pages of two
        assert "managedFields" not in informer.items["c0"]["metadata"]  # kept slim
        cp.kubectl("create", "configmap", "c3", "-n", NAMESPACE)
        await wait_until(lambda: "c3" in informer.items, timeout=30)
        # Disconnected: a deletion and a change it does not see...
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        cp.kubectl("delete", "configmap", "c1", "-n", NAMESPACE)
        cp.kubectl("patch", "configmap", "c2", "-n", NAMESPACE, "-p", '{"data": {"n": "changed"}}')
        seen.clear()
        # ...are announced by the next list, like watch events: the deleted object with it.
        task = asyncio.create_task(informer.run())
        await wait_until(lambda: ("c1", "gone") in seen and ("c2", "here") in seen, timeout=30)
        assert "c1" not in informer.items
        assert informer.items["c2"]["data"] == {"n": "changed"}
        assert ("c0", "here") not in seen  # unchanged: not announced again
        assert informer.relists == 2
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        cp.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)


async def test_one_replica_leads_and_a_standby_takes_over_when_it_gives_up(real_cluster, http):
    cp = real_cluster.cp
    namespace = "lease-test"
    cp.kubectl("create", "namespace", namespace)
    try:
        client = KubeClient(http, ApiAccess(cp.kubeconfig))
        changes: list[tuple[str, bool]] = []

        def elector(name: str) -> LeaderElection:
            return LeaderElection(client, namespace, "pier-operator", name, 3.0, lambda up: changes.append((name, up)))

        one, two = elector("one"), elector("two")
        first = asyncio.create_task(one.elect())
        await asyncio.wait_for(one.leading.wait(), 10)
        second = asyncio.create_task(two.elect())
        await asyncio.sleep(4)  # more than a lease duration: the holder renews, the standby stays one
        assert one.leading.is_set()
        assert not two.leading.is_set()
        lease = json.loads(cp.kubectl("get", "lease", "pier-operator", "-n", namespace, "-o", "json").stdout)
        assert lease["spec"]["holderIdentity"] == "one"
        first.cancel()  # a leader that shuts down gives the Lease up...
        with contextlib.suppress(asyncio.CancelledError):
            await first
        await asyncio.wait_for(two.leading.wait(), 5)  # ...and the standby takes it at its next look
        assert changes == [("one", True), ("two", True)]
        lease = json.loads(cp.kubectl("get", "lease", "pier-operator", "-n", namespace, "-o", "json").stdout)
        assert (lease["spec"]["holderIdentity"], lease["spec"]["leaseTransitions"]) == ("two", 1)
        second.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await second
    finally:
        cp.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
