"""The local backend's one start per (user, profile), when a session needs its user's upstream token first:
asking for the token suspends the request, and another request's start may begin, or even finish, meanwhile."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, cast

import pytest

from pier.core.callapi import BridgeHandle, Endpoint
from pier.core.catalog import Profile
from pier.router.accounts.service import Accounts, Credential
from pier.router.backends.base import SessionKey
from pier.router.backends.local.isolation import Isolation, Lease
from pier.router.backends.local.pool import LocalBackend
from pier.router.backends.local.runtimes import LocalSession, Runtime
from pier.router.config import RouterSettings
from pier.router.metrics import RouterMetrics

pytestmark = pytest.mark.unit

PROFILE = Profile(
    name="github", command=["github-mcp"],
    upstream_oauth={"issuer": "https://auth.example.com", "client_id": "pier", "env": "GITHUB_TOKEN"},
)  # fmt: skip


@dataclass
class _Bridge:
    endpoint: Endpoint


@dataclass(eq=False, kw_only=True)
class _Session(LocalSession):
    stopped: bool = False

    @property
    def exited(self) -> bool:
        return self.stopped

    async def stop(self) -> None:
        self.stopped = True


class _Runtime(Runtime):
    """No bridge, no server: a unit test of the backend's bookkeeping (what a start makes is a record)."""

    def __init__(self, settings: RouterSettings) -> None:
        super().__init__(settings, Isolation(settings))
        self.started: list[_Session] = []

    async def _start(
        self, key: SessionKey, profile: Profile, token: str, env: dict[str, str], warm_up: bool, lease: Lease | None
    ) -> LocalSession:
        bridge = cast(BridgeHandle, _Bridge(Endpoint(f"http://127.0.0.1:1/{len(self.started)}")))
        session = _Session(key=key, bridge=bridge, profile=profile)
        self.started.append(session)
        return session


class _Accounts:
    """Stands in for the accounts' Redis and provider: the second request's token must be slow on purpose,
    an interleaving no real provider gives on demand."""

    def __init__(self) -> None:
        self.asked = 0
        self.second = asyncio.Event()

    async def credential(self, user: str, profile: Profile) -> Credential:
        self.asked += 1
        if self.asked == 1:
            await asyncio.sleep(0)  # the first request yields once: the second passes the "starting?" check
        else:
            await self.second.wait()  # …and gets its token only after the first request's start is done
        return Credential(f"token-{user}", None, None)


async def test_a_start_that_finished_while_another_request_got_its_token_is_joined_not_repeated():
    settings = RouterSettings()
    runtime = _Runtime(settings)
    accounts = _Accounts()
    backend = LocalBackend(settings, runtime, RouterMetrics(), [PROFILE], accounts=cast(Accounts, cast(Any, accounts)))
    first = asyncio.create_task(backend.acquire("alice", PROFILE))
    second = asyncio.create_task(backend.acquire("alice", PROFILE))
    session = await first
    assert accounts.asked == 2
    assert not second.done()  # the second is still waiting for its token
    accounts.second.set()
    assert await second is session
    assert runtime.started == [session]  # one server for alice, none left behind untracked
    assert backend.list("alice") == [session]
    await backend.close()
