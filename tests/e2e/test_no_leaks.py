"""Keys and tokens never reach logs, metric labels, the dashboard or exported spans — checked by grepping
everything (the spans as the collector received them, bytes and all)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from pier.core import tracing
from pier.core.logs import JsonFormatter
from tests.hooks import Collector, PolicyServer, Receiver
from tests.servers import router_app, wait_until, worker_processes

APP_KEY = "app-key-0f9a8b7c6d5e"
USER_KEY = "user-key-1a2b3c4d5e6f"
WRONG_KEY = "wrong-key-9z8y7x6w5v"
POLICY_TOKEN = "policy-token-5k4j3h2g1f"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"webhook-secret-never-logged-xyz").decode()


async def test_no_key_or_token_appears_in_logs_metrics_dashboard_or_spans(
    http, redis_server, caplog, capfd, monkeypatch
):
    caplog.set_level(logging.DEBUG)
    async with (
        Collector() as collector,
        PolicyServer() as policy,
        Receiver() as receiver,
        traced(monkeypatch, collector),
        router_app(
            redis_server.url, app_keys=[APP_KEY], user_keys={USER_KEY: "alice"}, policy_url=policy.url,
            policy_token=POLICY_TOKEN, webhook_url=receiver.url, log_level="DEBUG", sidecar_log_level="DEBUG",
        ) as running,
        worker_processes(
            redis_server.url, PIER_WEBHOOK_SECRET=WEBHOOK_SECRET, PIER_POLICY_TOKEN=POLICY_TOKEN, PIER_LOG_LEVEL="DEBUG"
        ),
    ):  # fmt: skip
        alice = running.user_url("alice")
        for key in (USER_KEY, WRONG_KEY, APP_KEY):
            async with http.post(
                f"{alice}/tools/echo/call",
                json={"arguments": {"message": "x"}},
                headers={"Authorization": f"Bearer {key}"},
            ):
                pass
        async with http.post(
            f"{alice}/tools/slow/call",
            json={"arguments": {"seconds": 0.5}, "timeout_s": 0.1},
            headers={"X-API-Key": USER_KEY},
        ) as response:
            job_id = (await response.json())["job_id"]
        keyed = httpx2.AsyncClient(headers={"Authorization": f"Bearer {USER_KEY}"}, timeout=60)
        async with keyed, Client(streamable_http_client(f"{alice}/mcp", http_client=keyed)) as client:
            await client.call_tool("echo", {"message": "relayed"})
        await wait_until(lambda: receiver.received)  # the job finished and its webhook went out
        await wait_until(lambda: collector.named("process pier:jobs"))  # the worker's spans too
        async with http.get(f"{running.url}/v1/jobs/{job_id}", headers={"X-API-Key": USER_KEY}) as response:
            assert (await response.json())["status"] == "completed"
        [session] = running.router.backend.list("alice")
        tokens = [session.endpoint.token]
        dashboard = await get_json_with(http, f"{running.url}/v1/dashboard", APP_KEY)
        async with http.get(f"{running.url}/metrics") as response:
            metrics = await response.text()
        await asyncio.to_thread(tracing.flush)

    secrets = [
        APP_KEY,
        USER_KEY,
        WRONG_KEY,
        POLICY_TOKEN,
        WEBHOOK_SECRET,
        WEBHOOK_SECRET[6:],
        redis_server.password,
        *tokens,
    ]
    formatter = JsonFormatter()
    logged = "\n".join(formatter.format(record) for record in caplog.records)
    out, err = capfd.readouterr()
    spans = b"".join(collector.bodies).decode("latin-1")  # every exported byte: names, attributes, events, status
    everything = {
        "logs": logged, "stderr": err, "stdout": out, "metrics": metrics, "dashboard": str(dashboard), "spans": spans
    }  # fmt: skip
    assert len(logged) > 1000  # the scenario did log plenty
    assert len(collector.spans) > 50  # and traced plenty: the router's and the worker's spans
    for where, text in everything.items():
        for secret in secrets:
            assert secret not in text, f"a secret leaked into {where}"


@contextlib.asynccontextmanager
async def traced(monkeypatch, collector: Collector):
    """Tracing on for what starts inside (this process's router, the workers' processes)."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    yield


async def get_json_with(http, url: str, key: str) -> dict:
    async with http.get(url, headers={"X-API-Key": key}) as response:
        return await response.json()
