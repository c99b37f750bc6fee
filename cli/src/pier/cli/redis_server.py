"""A private `redis-server` process, for `pier up` (the embedded default) and the tests."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import socket
import subprocess
from pathlib import Path

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from pier.core.process import die_with_parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """`redis-server` on loopback with AOF persistence in `data_dir` (so a restart loses no job).

    It takes a password of its own: every local process can reach loopback, local sessions' servers
    included, and Redis holds every user's job results.
    """

    def __init__(self, data_dir: Path, port: int | None = None, password: str | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.password = password or secrets.token_urlsafe(24)
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    @property
    def shown_url(self) -> str:
        """The URL with its password masked, for people and logs."""
        return f"redis://:***@127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server; `make install`)")
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # The password on stdin (a config file read from "-"), never in the arguments `ps` shows.
        self.proc = await asyncio.create_subprocess_exec(
            binary, "-", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
            "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--protected-mode", "yes",
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, preexec_fn=die_with_parent, env={},
        )  # fmt: skip
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"requirepass {self.password}\n".encode())
        self.proc.stdin.close()
        client = aioredis.from_url(self.url, socket_connect_timeout=1)
        try:
            for _ in range(200):
                if self.proc.returncode is not None:
                    raise RuntimeError(f"redis-server exited with code {self.proc.returncode}")
                try:
                    await client.ping()
                    return
                except (OSError, RedisConnectionError):
                    await asyncio.sleep(0.05)
            raise RuntimeError("redis-server did not answer PING")
        finally:
            await client.aclose()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()  # redis-server flushes the AOF on SIGTERM
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()

    async def kill(self) -> None:
        """Crash it (SIGKILL): what persistence must survive."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    async def __aenter__(self) -> RedisServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            await self.stop()
