"""The policy hook (minibridge's Policer format), built-in tool rules, and the audit log."""

from __future__ import annotations

import json
import logging

import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError

from pier.cli.redis_server import free_port
from pier.core.catalog import Catalog, demo_profile
from pier.core.policy import ToolRules
from tests.hooks import POLICY_TOKEN, PolicyServer
from tests.servers import router_app, text_of, wait_job, worker_processes


async def _call(http, url: str, tool: str, **arguments) -> tuple[int, dict]:
    async with http.post(f"{url}/tools/{tool}/call", json={"arguments": arguments}) as response:
        return response.status, await response.json()


async def test_denied_calls_never_reach_the_server(http, redis_server, caplog):
    caplog.set_level(logging.INFO, logger="pier.core.audit")
    async with (
        PolicyServer() as policy,
        router_app(redis_server.url, policy_url=policy.url, policy_token=POLICY_TOKEN) as running,
    ):
        alice = running.user_url("alice")
        status, body = await _call(http, alice, "echo", message="hi")
        assert (status, body["result"]["content"][0]["text"]) == (200, "Echo: hi")
        status, body = await _call(http, alice, "counter")
        assert (status, body["error"]["code"]) == (403, "POLICY_DENIED")
        assert body["error"]["details"]["reasons"] == ["counter is not allowed for you"]
        status, body = await _call(http, alice, "count")
        assert body["result"]["structuredContent"] == {"result": 0}  # counter never ran

        # Over MCP the caller gets a JSON-RPC error with the reasons.
        async with Client(f"{alice}/mcp") as client:
            assert text_of(await client.call_tool("echo", {"message": "relayed"})) == "Echo: relayed"
            with pytest.raises(MCPError) as denied:
                await client.call_tool("counter", {})
            assert denied.value.error.data["code"] == "POLICY_DENIED"
            assert denied.value.error.data["reasons"] == ["counter is not allowed for you"]
        status, body = await _call(http, alice, "count")
        assert body["result"]["structuredContent"] == {"result": 0}

        # A result the policy refuses is withheld.
        status, body = await _call(http, alice, "echo", message="my secret")
        assert (status, body["error"]["details"]["reasons"]) == (403, ["the result leaks a secret"])

    # minibridge's format plus Pier's context, with the bearer token.
    first = policy.seen[0]
    assert first["type"] == "Input"
    assert json.loads(first["messages"][0])["method"] == "tools/call"
    assert (first["user"], first["profile"], first["session"]) == ("alice", "demo", "alice/demo")
    assert first["identity"]["key_class"] == "open"
    assert {s["type"] for s in policy.seen} == {"Input", "Output"}
    assert set(policy.auth) == {f"Bearer {POLICY_TOKEN}"}
    audits = [r.audit for r in caplog.records if r.name == "pier.core.audit"]
    assert [(a["tool"], a["decision"], a["outcome"], a["via"]) for a in audits] == [
        ("echo", "allow", "completed", "rest"),
        ("counter", "deny", "POLICY_DENIED", "rest"),
        ("count", "allow", "completed", "rest"),
        ("echo", "allow", "completed", "mcp"),
        ("counter", "deny", "POLICY_DENIED", "mcp"),
        ("count", "allow", "completed", "rest"),
        ("echo", "deny", "POLICY_DENIED", "rest"),
    ]
    assert all(len(a["arguments_sha256"]) == 64 for a in audits)


async def test_an_unreachable_policy_service_denies_unless_fail_open(http, redis_server):
    nowhere = f"http://127.0.0.1:{free_port()}/police"
    async with router_app(redis_server.url, policy_url=nowhere) as running:
        status, body = await _call(http, running.user_url("alice"), "echo", message="x")
        assert (status, body["error"]["code"]) == (403, "POLICY_DENIED")
        assert "unreachable" in body["error"]["details"]["reasons"][0]
        assert not running.router.backend.list()  # not even a session was started
    async with router_app(redis_server.url, policy_url=nowhere, policy_fail_open=True) as running:
        assert (await _call(http, running.user_url("alice"), "echo", message="x"))[0] == 200


async def test_job_results_pass_the_output_policy(http, redis_server):
    async with (
        PolicyServer() as policy,
        router_app(redis_server.url, policy_url=policy.url) as running,
        worker_processes(redis_server.url),
    ):
        async with http.post(
            f"{running.user_url('alice')}/tools/slow/call", json={"arguments": {"seconds": 1}, "timeout_s": 0.2}
        ) as response:
            job_id = (await response.json())["job_id"]
        final = await wait_job(http, running.url, job_id)
        assert final["status"] == "completed"
        assert any(s["type"] == "Output" and job_id in s["messages"][0] for s in policy.seen)


async def test_built_in_tool_rules_per_profile_user_and_key(http, redis_server):
    rules = ToolRules(deny=["crash"], users={"alice": {"allow": ["echo", "count"]}})
    catalog = Catalog([demo_profile().model_copy(update={"tools": rules})])
    async with router_app(redis_server.url, catalog=catalog) as running:
        assert (await _call(http, running.user_url("alice"), "echo", message="x"))[0] == 200
        status, body = await _call(http, running.user_url("alice"), "counter")
        assert (status, body["error"]["details"]["decided_by"]) == (403, "built-in")
        assert (await _call(http, running.user_url("bob"), "counter"))[0] == 200
        status, body = await _call(http, running.user_url("bob"), "crash")
        assert (status, body["error"]["details"]["reasons"]) == (403, ["tool 'crash' is denied"])
