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
