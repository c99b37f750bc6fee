"""Local sessions are isolated from each other and from Pier (README: "Local sessions: isolation").

A real `pier router` process (its keys, its secrets key and its Redis password in its environment, as
in production) runs `peek_server.py` for alice and bob, each with a secret of their own. Bob's server
then does what a hostile server would: it scans every readable process environment for alice's secret
and Pier's keys, reads alice's files, writes outside its home, kills alice's server, leaves a process
behind. Both bridge modes; the sandbox (bubblewrap, with a uid per session, as these tests run as
root) and the uid alone. The same attack against unisolated sessions succeeds: the check can fail.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pier.cli.redis_server import free_port
from pier.core.errors import PierError
from pier.router.backends.local.isolation import Isolation
from pier.router.config import RouterSettings
from tests.identity import UPSTREAM_SECRET_ENV, OpenIdProvider, authorize, upstream_client, upstream_oauth
from tests.servers import PIER, ROOT, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs sessions under uids of their own: needs root")

SYSTEM_PYTHON = "/usr/bin/python3"  # readable by every uid, unlike a Python under /root


@dataclass
class Pier:
    url: str
    proc: asyncio.subprocess.Process
    app_key: str
    secrets_key: str
    sessions: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.app_key}"}

    def user_url(self, user: str) -> str:
        return f"{self.url}/v1/users/{user}/servers/peek"


@pytest.fixture
def world() -> Iterator[Path]:
    """A directory every uid can enter: the peek server's script and the sessions' homes live in it."""
    base = Path(tempfile.mkdtemp(prefix="pier-isolation-"))
    base.chmod(0o755)
    (base / "bin").mkdir(mode=0o755)
    shutil.copy(ROOT / "tests" / "mcp_servers" / "peek_server.py", base / "bin" / "peek_server.py")
    (base / "bin" / "peek_server.py").chmod(0o644)
    (base / "private").mkdir(mode=0o755)  # a root-owned directory no session may write to
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextlib.asynccontextmanager
async def pier_router(
    http: aiohttp.ClientSession, redis_url: str, world: Path, bridges: str, isolation: str,
    peek: dict[str, Any] | None = None, port: int | None = None, **env: str,
) -> AsyncIterator[Pier]:  # fmt: skip
    """`pier router` as its own process, with a profile whose sessions take a user secret (or, given, `peek`:
    the peek profile's other fields)."""
    port = port or free_port()
    app_key, secrets_key = f"app-{secrets.token_hex(8)}", base64.b64encode(os.urandom(32)).decode()
    takes = peek or {"user_secrets": {"PEEK_SECRET": {"description": "whose session this is"}}}
    catalog = {"profiles": {"peek": {"command": [SYSTEM_PYTHON, str(world / "bin" / "peek_server.py")], **takes}}}
    settings = {
        "PIER_PORT": str(port), "PIER_PUBLIC_URL": f"http://127.0.0.1:{port}", "PIER_REDIS_URL": redis_url,
        "PIER_PROFILES_INLINE": json.dumps(catalog),
        "PIER_APP_KEYS": json.dumps([app_key]), "PIER_SECRETS_KEY": secrets_key, "PIER_LOCAL_BRIDGES": bridges,
        "PIER_LOCAL_ISOLATION": isolation, "PIER_LOCAL_SESSIONS_DIR": str(world / "sessions"),
        "PIER_LOCAL_SANDBOX_PATHS": json.dumps([str(world / "bin")]), "PIER_SESSION_TTL_S": "0", **env,
    }  # fmt: skip
    proc = await asyncio.create_subprocess_exec(*PIER, "router", env={**os.environ, **settings})
    running = Pier(f"http://127.0.0.1:{port}", proc, app_key, secrets_key, world / "sessions")
    try:
        await wait_until(lambda: _ready(http, running.url), timeout=60)
        yield running
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 60)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _ready(http: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with http.get(f"{url}/readyz") as response:
            return response.status == 200
    except aiohttp.ClientError:
        return False


async def peek(http: aiohttp.ClientSession, pier: Pier, user: str, tool: str, **arguments: object) -> dict:
    """Call one of the peek server's tools in `user`'s session; its structured answer."""
    url = f"{pier.user_url(user)}/tools/{tool}/call"
    async with http.post(url, json={"arguments": arguments}, headers=pier.headers) as response:
        body = await response.json()
    assert response.status == 200, body
    return body["result"]["structuredContent"]


async def set_secret(http: aiohttp.ClientSession, pier: Pier, user: str, value: str) -> None:
    url = f"{pier.user_url(user)}/secrets"
    async with http.put(url, json={"PEEK_SECRET": value}, headers=pier.headers) as response:
        assert response.status == 204, await response.text()


# -- what the host sees (the test runs as root) ---------------------------------------------------------


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError:
        return b""


def _exists(path: str) -> bool:
    return os.path.exists(path)


def _mode(path: str) -> int:
    return os.stat(path).st_mode


def host_pids_holding(needle: str) -> list[int]:
    """Processes whose environment holds `needle`."""
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    return [pid for pid in pids if needle.encode() in _read(f"/proc/{pid}/environ")]


def host_pids_of_uid(uid: int) -> list[int]:
    """Live processes (not zombies waiting for their parent) of `uid`."""
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        fields = dict(
            line.split(":", 1) for line in _read(f"/proc/{name}/status").decode(errors="replace").splitlines()
        )
        if str(uid) in fields.get("Uid", "").split() and not fields.get("State", "").strip().startswith("Z"):
            found.append(int(name))
    return found


def descendants(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        stat = _read(f"/proc/{name}/stat").decode(errors="replace")
        if stat:
            parents[int(name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        children = [child for child, parent in parents.items() if parent == pid]
        found += children
        frontier += children
    return found


# -- the attack -----------------------------------------------------------------------------------------


# -- slots ----------------------------------------------------------------------------------------------


async def test_routers_sharing_a_sessions_directory_never_share_a_slot(world):
    settings = RouterSettings(local_sessions_dir=world / "sessions", local_uids="1200100-1200102")
    first, second = Isolation(settings), Isolation(settings)
    await first.start([])
    await second.start([])
    assert first.mode == "sandbox"
    leases = [await first.lease(), await second.lease(), await first.lease()]
    slots = sorted(lease.slot for lease in leases if lease is not None)
    assert slots == [0, 1, 2]
    with pytest.raises(PierError) as refused:
        await second.lease()
    assert refused.value.code == "SESSION_CAPACITY"
    homes = [lease.confinement.home for lease in leases if lease is not None]
    assert all(home.is_dir() and home.stat().st_uid == 1_200_100 + int(home.name) for home in homes)
    await asyncio.gather(*(lease.release() for lease in leases if lease is not None))
    assert not any(home.exists() for home in homes)
    again = await second.lease()
    assert again is not None
    await again.release()


@pytest.mark.parametrize(
    ("bridges", "isolation"),
    [("inprocess", "sandbox"), ("process", "sandbox"), ("inprocess", "uid"), ("process", "uid")],
)
async def test_a_server_cannot_reach_another_sessions_secrets_files_or_processes(
    http, redis_server, world, bridges, isolation
):
    alice_secret, bob_secret = f"alice-{secrets.token_hex(12)}", f"bob-{secrets.token_hex(12)}"
    async with pier_router(http, redis_server.url, world, bridges, isolation) as pier:
        await set_secret(http, pier, "alice", alice_secret)
        await set_secret(http, pier, "bob", bob_secret)
        alice = (await peek(http, pier, "alice", "whoami"))["value"]
        stash = (await peek(http, pier, "alice", "stash", text=alice_secret))["value"]
        bob = (await peek(http, pier, "bob", "whoami"))["value"]

        # Each server under a uid and gid of its own, no other groups, with a private home.
        assert alice["uid"] != bob["uid"]
        assert min(alice["uid"], bob["uid"]) >= 1000
        assert (bob["gid"], bob["groups"]) == (bob["uid"], [])
        assert (Path(bob["home"]).parent, bob["tmpdir"]) == (pier.sessions, f"{bob['home']}/tmp")
        assert stash == [f"{alice['home']}/stash", f"{alice['home']}/tmp/stash"]

        # Every readable environment and command line: no secret of alice's, none of Pier's
        # (bob's own secret is the scan's control: it reads its own environment)
        needles = [alice_secret, pier.app_key, pier.secrets_key, redis_server.password, "PIER_", bob_secret]
        scan = await peek(http, pier, "bob", "scan", needles=needles)
        assert {hit["needle"] for hit in scan["found"]} == {bob_secret}, scan
        if isolation == "sandbox":
            assert scan["pids_seen"] <= 3  # its own pid namespace: the sandbox's init, the server (and a child)

        # Alice's files, and the directory of all homes.
        for path in stash:
            assert not (await peek(http, pier, "bob", "read", path=path))["ok"]
        assert not (await peek(http, pier, "bob", "listdir", path=alice["home"]))["ok"]
        homes = await peek(http, pier, "bob", "listdir", path=str(pier.sessions))
        assert homes == {"ok": True, "value": [Path(bob["home"]).name]} if isolation == "sandbox" else not homes["ok"]
        assert not (await peek(http, pier, "bob", "write", path=f"{alice['home']}/planted"))["ok"]

        # Writing outside its home: nowhere it could matter.
        for path in (str(world / "private" / "planted"), "/etc/pier-planted", str(ROOT / "planted")):
            assert not (await peek(http, pier, "bob", "write", path=path))["ok"], path
        assert (await peek(http, pier, "bob", "write", path=f"{bob['home']}/mine"))["ok"]
        shared = f"/tmp/pier-planted-{secrets.token_hex(4)}"
        written = (await peek(http, pier, "bob", "write", path=shared))["ok"]
        try:
            assert written
            if isolation == "sandbox":
                assert not _exists(shared)  # its /tmp is its own
            else:
                assert _mode(shared) & 0o077 == 0  # the machine's /tmp, but what it writes there is its own
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(shared)

        # Killing alice's server (its host pid), or everything it may: alice's server lives on.
        [alice_pid] = [p for p in host_pids_holding(alice_secret) if p in host_pids_of_uid(alice["uid"])]
        assert not (await peek(http, pier, "bob", "kill", pid=alice_pid))["ok"]
        await peek(http, pier, "bob", "kill", pid=-1)
        assert (await peek(http, pier, "alice", "whoami"))["value"]["pid"] == alice["pid"]

        # The router's and bridges' helpers (the process-group watchdog) hold no environment at all.
        watchdogs = [p for p in descendants(pier.proc.pid) if b"os.killpg" in _read(f"/proc/{p}/cmdline")]
        assert watchdogs
        assert [_read(f"/proc/{p}/environ") for p in watchdogs] == [b""] * len(watchdogs)


@pytest.mark.parametrize(("bridges", "isolation"), [("inprocess", "sandbox"), ("process", "uid")])
async def test_a_confined_server_restarts_confined_and_leaves_nothing_behind(
    http, redis_server, world, bridges, isolation
):
    async with pier_router(http, redis_server.url, world, bridges, isolation) as pier:
        await set_secret(http, pier, "bob", "bob-secret")
        before = (await peek(http, pier, "bob", "whoami"))["value"]
        assert (await peek(http, pier, "bob", "stash", text="kept"))["ok"]

        # A crash: the caller hears its exit code, the server restarts under the same uid and home.
        async with http.post(
            f"{pier.user_url('bob')}/tools/crash/call", json={"arguments": {}}, headers=pier.headers
        ) as response:
            crashed = await response.json()
        assert (response.status, crashed["error"]["code"]) == (502, "SERVER_EXITED")
        assert crashed["error"]["details"]["exit_code"] == 3

        async def restarted() -> dict | None:
            async with http.post(
                f"{pier.user_url('bob')}/tools/whoami/call", json={"arguments": {}}, headers=pier.headers
            ) as response:
                return (await response.json())["result"]["structuredContent"]["value"] if response.ok else None

        await wait_until(restarted, timeout=30)
        after = await restarted()
        assert after is not None
        assert (after["uid"], after["home"]) == (before["uid"], before["home"])
        assert after["pid"] != before["pid"] or isolation == "sandbox"  # (a new pid namespace may reuse it)
        assert (await peek(http, pier, "bob", "read", path=f"{before['home']}/stash"))["value"] == "kept"

        # A process that left its group, then the session's end: no process of its uid is left, no home.
        assert (await peek(http, pier, "bob", "orphan"))["ok"]
        assert len(host_pids_of_uid(before["uid"])) >= 2  # the server and its orphan
        async with http.delete(pier.user_url("bob"), headers=pier.headers) as response:
            assert response.status == 204
        await wait_until(lambda: not host_pids_of_uid(before["uid"]), timeout=30)
        await wait_until(lambda: not _exists(before["home"]), timeout=30)


async def test_a_dead_routers_sessions_are_cleaned_by_the_next(http, redis_server, world):
    async with pier_router(http, redis_server.url, world, "inprocess", "uid") as pier:
        await set_secret(http, pier, "alice", "alice-secret")
        alice = (await peek(http, pier, "alice", "whoami"))["value"]
        assert (await peek(http, pier, "alice", "orphan"))["ok"]  # survives its group's watchdog
        pier.proc.kill()
        await pier.proc.wait()
    assert _exists(f"{alice['home']}/tmp")
    assert host_pids_of_uid(alice["uid"])  # the orphan

    async with pier_router(http, redis_server.url, world, "inprocess", "uid"):
        assert not _exists(alice["home"])
        await wait_until(lambda: not host_pids_of_uid(alice["uid"]), timeout=30)  # SIGKILLed: they go at once


async def test_unisolated_sessions_leak_and_a_router_refuses_to_run_them_for_secrets(http, redis_server, world):
    # The control: the same attack, without isolation, finds alice's secret and Pier's keys.
    async with pier_router(http, redis_server.url, world, "inprocess", "none", PIER_LOCAL_SINGLE_USER="true") as pier:
        await set_secret(http, pier, "alice", "alice-unisolated-secret")
        await set_secret(http, pier, "bob", "bob-unisolated-secret")
        await peek(http, pier, "alice", "whoami")
        scan = await peek(http, pier, "bob", "scan", needles=["alice-unisolated-secret", pier.app_key])
        assert {hit["needle"] for hit in scan["found"]} == {"alice-unisolated-secret", pier.app_key}

    # Which is why, without isolation and without the single-user declaration, the router will not start.
    env = {
        **os.environ, "PIER_PORT": str(free_port()), "PIER_REDIS_URL": redis_server.url,
        "PIER_SECRETS_KEY": base64.b64encode(os.urandom(32)).decode(), "PIER_LOCAL_ISOLATION": "none",
        "PIER_PROFILES_INLINE": json.dumps({"profiles": {"peek": {
            "command": [SYSTEM_PYTHON, "-c", "pass"], "user_secrets": {"PEEK_SECRET": {}}}}}),
    }  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *PIER, "router", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    lines = [line for line in err.decode().splitlines() if line.startswith("pier router:")]
    assert proc.returncode == 2
    assert len(lines) == 1, err
    assert "refusing to start" in lines[0]
    assert "PIER_LOCAL_SINGLE_USER" in lines[0]
    assert "Traceback" not in err.decode()


async def test_asking_for_an_isolation_this_machine_cannot_give_is_one_clear_line(redis_server):
    env = {
        **os.environ, "PIER_PORT": str(free_port()), "PIER_REDIS_URL": redis_server.url,
        "PIER_LOCAL_ISOLATION": "sandbox", "PATH": "/nonexistent",  # no bwrap to be found
    }  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pier.cli", "router", env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    assert "pier router: PIER_LOCAL_ISOLATION=sandbox, but bubblewrap cannot run here" in err.decode()


async def test_one_users_server_cannot_read_another_users_upstream_token(http, redis_server, world, tmp_path):
    """Connected accounts' tokens (a variable and a file, as the profile says) are as private as secrets:
    bob's server finds neither alice's token nor the router's client secret anywhere it can look."""
    port, client_secret = free_port(), f"client-secret-{secrets.token_hex(8)}"
    client = upstream_client(f"http://127.0.0.1:{port}/v1/oauth/callback", client_secret)
    async with OpenIdProvider(tmp_path / "upstream", clients=[client]) as upstream:
        oauth = upstream_oauth(upstream.issuer, env="PEEK_TOKEN", file="/run/pier/upstream/token")
        async with pier_router(
            http, redis_server.url, world, "inprocess", "sandbox", {"upstream_oauth": oauth}, port,
            **{UPSTREAM_SECRET_ENV: client_secret},
        ) as pier:  # fmt: skip
            tokens = {}
            for user in ("alice", "bob"):
                link = f"{pier.url}/v1/users/{user}/servers/peek/connect"
                async with http.get(link, headers=pier.headers) as response:
                    authorization_url = (await response.json())["authorization_url"]
                async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
                    assert (await authorize(browser, authorization_url, f"{user}-gh")).status == 200
                mine = await peek(http, pier, user, "read", path="/run/pier/upstream/token")
                assert mine["ok"]
                tokens[user] = mine["value"]
            assert tokens["alice"] != tokens["bob"]
            alice = (await peek(http, pier, "alice", "whoami"))["value"]

            # Every readable environment and command line: bob's own token (the control), nothing else.
            needles = [tokens["alice"], client_secret, pier.secrets_key, pier.app_key, tokens["bob"]]
            scan = await peek(http, pier, "bob", "scan", needles=needles)
            assert {hit["needle"] for hit in scan["found"]} == {tokens["bob"]}, scan
            # Alice's token file, where the router keeps it on the host, and her home: out of reach.
            host_file = Path(alice["home"]).with_name(Path(alice["home"]).name + ".run") / "token"
            assert host_file.exists()  # (it is there: the host sees it)
            assert not (await peek(http, pier, "bob", "read", path=str(host_file)))["ok"]
            assert not (await peek(http, pier, "bob", "listdir", path=str(host_file.parent)))["ok"]
            assert pier.proc.pid not in host_pids_holding(tokens["alice"])  # the router's environment never has it
