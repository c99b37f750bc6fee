"""Attach mode: the server in "another container" (here, another process) through the FIFO wrapper."""

from __future__ import annotations

import asyncio
import subprocess

from pier.sidecar.attach import WRAPPER_NAME, prepare
from tests.servers import DEMO, bridge_app, wait_until


async def _start_server_side(directory) -> asyncio.subprocess.Process:
    # Exactly what the server container runs: /bin/sh and the wrapper, nothing else from Pier.
    return await asyncio.create_subprocess_exec(
        "/bin/sh", str(directory / WRAPPER_NAME), str(directory), *DEMO, stderr=subprocess.DEVNULL
    )


async def _call(http, url: str, tool: str, **arguments) -> dict:
    async with http.post(f"{url}/v1/calls", json={"tool": tool, "arguments": arguments}) as response:
        body = await response.json()
        assert response.status == 200, body
        return body["result"]


async def test_attach_survives_a_restart_of_the_server_side(http, tmp_path):
    prepare(tmp_path)  # the pod's init step
    async with bridge_app(attach_dir=tmp_path, wait_ready=False, restart_backoff_initial_s=0.01) as running:
        server = await _start_server_side(tmp_path)
        await running.bridge.upstream.wait_ready()
        assert (await _call(http, running.url, "echo", message="one"))["content"][0]["text"] == "Echo: one"
        assert (await _call(http, running.url, "counter"))["structuredContent"] == {"result": 1}

        # The server container dies (and is restarted, as the kubelet would).
        server.kill()
        await server.wait()
        await wait_until(lambda: not running.bridge.upstream.ready)
        server = await _start_server_side(tmp_path)
        try:
            await wait_until(lambda: running.bridge.upstream.ready)
            # A fresh server process: re-initialized, its own state starts over.
            assert (await _call(http, running.url, "counter"))["structuredContent"] == {"result": 1}
            assert running.bridge.upstream.restarts == 1
        finally:
            server.kill()
            await server.wait()


async def test_wrapper_refuses_a_directory_without_fifos(tmp_path):
    prepare(tmp_path)
    (tmp_path / "stdin").unlink()
    done = await asyncio.create_subprocess_exec(
        "/bin/sh", str(tmp_path / WRAPPER_NAME), str(tmp_path), "true", stderr=subprocess.PIPE
    )
    _, err = await done.communicate()
    assert done.returncode == 66
    assert b"must be FIFOs" in err
