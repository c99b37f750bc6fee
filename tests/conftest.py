from collections.abc import Iterator

import aiohttp
import pytest

from pier.cli.redis_server import RedisServer


@pytest.fixture
async def http():
    # No connection limit: a request queued client-side would look like an idle session to the reaper.
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield session


@pytest.fixture
async def redis_server(tmp_path):
    """A real redis-server (AOF on) of this test's own."""
    async with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture(scope="session")
def real_cluster(tmp_path_factory) -> Iterator:
    """The control plane and a real node (containerd, kubelet, kube-proxy, scheduler), the images built from the
    Dockerfile imported: one per test session, shared by the Kubernetes tier's modules (each in its own
    namespaces). Its stop fails the session if the node left anything behind on the host."""
    from tests.k8s.realnode import RealCluster

    cluster = RealCluster(tmp_path_factory.mktemp("real-cluster"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
