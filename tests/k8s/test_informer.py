"""The informers router and operator keep the cluster in memory with (pier.core.kube), against the real API server."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from pier.core.kube import ApiAccess, Informer, KubeClient
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
