"""The chart's Grafana dashboards and alerts, checked against Debian's Prometheus and promtool.

A real Prometheus scrapes a router, a `pier jobs` worker and a `pier sidecar` while they serve calls, start
and fail sessions, claim warm ones, hand off a job and deliver its webhook; then every query of the overview
dashboard and every alert's query (as the chart ships them: rendered by the Helm engine) must return series —
a metric renamed in the code, or mistyped in a query, leaves a query empty and fails here. The operator's
dashboard and alert are checked the same way against the operator on the test cluster
(tests/k8s/test_mcpsessions.py). promtool checks the rules and runs their unit tests
(tests/e2e/alerts.test.yaml): every alert fires in one and stays quiet in another.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

import yaml
from mcp import Client

from pier.cli.redis_server import free_port
from pier.core.catalog import Catalog, Profile, demo_profile
from tests.hooks import Receiver
from tests.prometheus import (
    alert_parts,
    alert_queries,
    alerts,
    dashboard_queries,
    empty_queries,
    promtool,
    scraping,
    shipped,
)
from tests.servers import DEMO, router_app, sidecar_process, text_of, wait_job, wait_until, worker_processes

HERE = Path(__file__).parent


def test_the_rules_pass_promtool_and_every_alert_fires_and_stays_quiet_in_its_unit_tests(tmp_path):
    _, spec = shipped()
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    checked = promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alerts(spec))} rules found" in checked.stdout
    shutil.copy(HERE / "alerts.test.yaml", tmp_path / "alerts.test.yaml")
    tested = promtool("test", "rules", "alerts.test.yaml", cwd=tmp_path)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # Each alert has a unit test where it fires and one where it stays quiet.
    cases = [case for test in yaml.safe_load((HERE / "alerts.test.yaml").read_text())["tests"]
             for case in test["alert_rule_test"]]  # fmt: skip
    for rule in alerts(spec):
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case["exp_alerts"] for case in mine), f"{rule['alert']}: no unit test where it fires"
        assert any(not case["exp_alerts"] for case in mine), f"{rule['alert']}: no unit test where it stays quiet"


def test_every_alert_compares_one_query_with_a_threshold():
    _, spec = shipped()
    for rule in alerts(spec):
        parts = alert_parts(rule)  # what the live test evaluates
        assert parts["query"].count("(") == parts["query"].count(")"), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["runbook_url"].endswith("#" + rule["alert"].lower())


async def test_every_dashboard_query_and_alert_returns_series_from_a_live_prometheus(http, redis_server, tmp_path):
    catalog = Catalog([
        demo_profile(),
        Profile(name="pooled", command=DEMO, warm_pool=1),
        Profile(name="broken", command=[sys.executable, "-c", "import sys; sys.exit(3)"]),
    ])  # fmt: skip
    jobs_port = free_port()
    async with (
        Receiver(fail_first=1) as receiver,  # the first webhook attempt fails: retried, then delivered
        router_app(redis_server.url, catalog, webhook_url=receiver.url) as running,
        worker_processes(
            redis_server.url, PIER_JOBS_PORT=str(jobs_port), PIER_WEBHOOK_BACKOFF_S="0.05"
        ),
        sidecar_process(*DEMO) as (bridge_url, _),
    ):  # fmt: skip
        targets = {
            "router": running.url.removeprefix("http://"),
            "jobs": f"127.0.0.1:{jobs_port}",
            "bridge": bridge_url.removeprefix("http://"),
        }
        async with scraping(tmp_path / "prometheus", http, targets) as prometheus:
            await _traffic(http, running, bridge_url, receiver)
            boards, spec = shipped()
            queries = dashboard_queries(boards["pier-overview.json"])
            assert len(queries) > 25
            queries += alert_queries(spec, operator=False)  # the operator's: on the test cluster
            empty = await empty_queries(prometheus, http, queries)
    assert not empty, "queries that return no series (a metric renamed or mistyped?):\n" + "\n".join(empty)


async def _traffic(http, running, bridge_url: str, receiver: Receiver) -> None:
    """What fills every panel: calls, an error, a failed start, a warm claim and a miss, a hand-off and its
    webhook (retried once), an ended session, an MCP call straight to a bridge."""
    alice = running.user_url("alice")
    async with http.post(f"{alice}/tools/echo/call", json={"arguments": {"message": "hi"}}) as response:
        assert response.status == 200
    async with http.post(f"{alice}/tools/nope/call", json={"arguments": {}}) as response:
        assert response.status == 404  # UNKNOWN_TOOL: an error by its code
    async with http.post(f"{running.user_url('alice', 'broken')}/tools/echo/call", json={}) as response:
        assert response.status == 502  # SESSION_START_FAILED: a 5xx, a failed start
    await wait_until(lambda: running.router.backend.pool_views()[-1]["ready"] == 1)

    async def first_call(user: str) -> None:
        body = {"arguments": {"message": user}}
        async with http.post(f"{running.user_url(user, 'pooled')}/tools/echo/call", json=body) as r:
            assert r.status == 200

    await asyncio.gather(first_call("u1"), first_call("u2"))  # one claims the warm session, one misses
    async with http.post(f"{alice}/tools/slow/call", json={"arguments": {"seconds": 1}, "timeout_s": 0.2}) as response:
        queued = await response.json()
        assert response.status == 202, queued
    assert (await wait_job(http, running.url, queued["job_id"]))["status"] == "completed"
    await wait_until(lambda: len(receiver.received) >= 2)
    async with http.delete(running.user_url("u1", "pooled")) as response:
        assert response.status == 204
    async with Client(f"{bridge_url}/mcp", mode="legacy") as client:
        assert text_of(await client.call_tool("echo", {"message": "direct"})) == "Echo: direct"
