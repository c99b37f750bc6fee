"""Debian's Prometheus and promtool for the tests: a real server scraping Pier's components, and the chart's
dashboards' and alerts' queries as they ship (rendered by the real Helm engine)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from pier.cli.redis_server import free_port
from tests.servers import wait_until
from tools import helm

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
NAMESPACE = "pier-test"  # what the scrape configs label every series with, as a Kubernetes scrape would
# Grafana's template variables as a dashboard resolves them: namespace "All", a rate window several scrapes wide.
DASHBOARD_VARIABLES = {"$namespace": ".*", "$__rate_interval": "30s"}
# An alert's expression: a query compared with a threshold, and maybe "or absent(metric)" (tools/observability.py).
ALERT_EXPR = re.compile(
    r"(?P<query>.+) (?P<op>[<>]=?|[!=]=) (?P<threshold>[0-9.e+-]+)(?: or absent\((?P<absent>[^)]+)\))?"
)


def shipped() -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The chart's dashboards (by ConfigMap key) and its PrometheusRule's spec, rendered with both on."""
    values = {"metrics": {"dashboards": {"enabled": True}, "prometheusRule": {"enabled": True}}}
    objects = helm.render(values)
    boards = {
        key: json.loads(text)
        for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"].get("labels", {}).get("grafana_dashboard") == "1"
        for key, text in o["data"].items()
    }
    [rule] = [o for o in objects if o["kind"] == "PrometheusRule"]
    return boards, rule["spec"]


def dashboard_queries(board: dict[str, Any]) -> list[str]:
    """A dashboard's queries with its variables resolved as Grafana would ("All" namespaces)."""
    queries = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in DASHBOARD_VARIABLES.items():
                expr = expr.replace(name, value)
            queries.append(expr)
    return queries


def alerts(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [rule for group in spec["groups"] for rule in group["rules"] if "alert" in rule]


def alert_parts(rule: dict[str, Any]) -> dict[str, str]:
    """An alert's query, comparison, threshold (and metric whose absence fires it): what a test evaluates."""
    match = ALERT_EXPR.fullmatch(rule["expr"])
    assert match is not None, f"{rule['alert']}: not `query op threshold [or absent(metric)]`: {rule['expr']}"
    return {k: v for k, v in match.groupdict().items() if v is not None}


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=cwd, timeout=120, check=False)


class Prometheus:
    """A Prometheus server (its own data directory and loopback port) scraping `targets` every second:
    job name → `host:port` of a component's `/metrics`."""

    def __init__(self, workdir: Path, targets: dict[str, str]) -> None:
        self.workdir = workdir
        self.targets = targets
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: asyncio.subprocess.Process | None = None

    def _config(self) -> dict[str, Any]:
        return {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [target], "labels": {"namespace": NAMESPACE}}]}
                for job, target in self.targets.items()
            ],
        }

    async def __aenter__(self) -> Prometheus:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(self._config()))
        log = (self.workdir / "prometheus.log").open("wb")
        self.proc = await asyncio.create_subprocess_exec(
            PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn", stdout=log, stderr=log,
        )  # fmt: skip
        log.close()
        async with aiohttp.ClientSession() as http:

            async def ready() -> bool:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{self.url}/-/ready") as response:
                        return response.status == 200
                return False

            await wait_until(ready, timeout=60, interval=0.2)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()

    async def query(self, http: aiohttp.ClientSession, expr: str) -> list[dict[str, Any]]:
        """An instant query's result (its series); AssertionError for a query Prometheus refuses."""
        async with http.get(f"{self.url}/api/v1/query", params={"query": expr}) as response:
            body = await response.json()
        assert body.get("status") == "success", f"{expr}: {body.get('error')}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def all_up(self, http: aiohttp.ClientSession) -> None:
        """Until every target has been scraped successfully."""

        async def up() -> bool:
            series = await self.query(http, "up")
            return len(series) == len(self.targets) and all(s["value"][1] == "1" for s in series)

        await wait_until(up, timeout=60, interval=0.5)


@contextlib.asynccontextmanager
async def scraping(workdir: Path, http: aiohttp.ClientSession, targets: dict[str, str]) -> AsyncIterator[Prometheus]:
    """A Prometheus scraping `targets`, once each is up."""
    async with Prometheus(workdir, targets) as prometheus:
        await prometheus.all_up(http)
        yield prometheus


def alert_queries(spec: dict[str, Any], operator: bool) -> list[str]:
    """What to evaluate of the alerts on the operator's metrics (`operator`), or of the others (on metrics of the
    router, workers or bridges: the warm-pool alert reads both): each one's query, and its comparison (`bool`,
    so that it returns series whether it holds or not)."""
    queries = []
    for rule in alerts(spec):
        parts = alert_parts(rule)
        others = re.search(r"pier_(?!operator_)", parts["query"]) is not None
        if ("pier_operator_" in parts["query"]) if operator else others:
            queries += [parts["query"], f"{parts['query']} {parts['op']} bool {parts['threshold']}"]
    return queries


async def empty_queries(
    prometheus: Prometheus, http: aiohttp.ClientSession, queries: list[str], timeout: float = 60
) -> list[str]:
    """The queries that still return no series after `timeout` (scrapes keep coming in meanwhile)."""
    found: dict[str, int] = {}

    async def every_query_has_series() -> bool:
        found.update({expr: len(await prometheus.query(http, expr)) for expr in queries})
        return all(found.values())

    with contextlib.suppress(TimeoutError):
        await wait_until(every_query_has_series, timeout=timeout, interval=1)
    return [expr for expr, count in found.items() if not count]
