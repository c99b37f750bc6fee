"""The chart's Grafana dashboards and Prometheus alerts, as data: the one source of what ships.

`make manifests` (`python -m tools.helm`) writes them into the chart:
- `charts/pier/dashboards/pier-overview.json` and `pier-operator.json` (Grafana dashboards; the chart's
  ConfigMaps, labelled for Grafana's dashboard sidecar, carry them),
- `charts/pier/rules/pier-alerts.yaml` (the rule groups of the chart's PrometheusRule).

Queries select `namespace=~"$namespace"` (a dashboard variable; "All" matches series without the label
too), and rates use `$__rate_interval`. Every alert compares one query with a threshold (`Alert.expr`), so
a test can evaluate the query itself against a live Prometheus (tests/e2e/test_observability.py) and
promtool can test each alert firing and not (tests/e2e/alerts.test.yaml). Each alert's runbook
is a paragraph of the README's "Alerts" section (`runbook_url` links it; a test checks each is there).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import yaml

RUNBOOKS = "https://github.com/pier-dev/pier/blob/main/README.md"
NS = 'namespace=~"$namespace"'  # every dashboard query's selector
RATE = "$__rate_interval"
# Outcomes of `pier_router_calls_total` that are answers, not errors (a tool's own error result is its answer).
ANSWERS = "completed|queued|replayed|tool_error"
CALLS = 'route!~"/healthz|/readyz|/metrics"'  # requests but the probes and scrapes (they would dilute a ratio)


# -- alerts -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Alert:
    """An alerting rule: `query` compared with `threshold` (firing after `for_`), or, with `absent`, also
    when no such series exists at all."""

    name: str
    query: str
    op: str
    threshold: float
    for_: str
    severity: str
    summary: str
    description: str
    absent: str | None = None  # a metric whose absence fires too (nothing left to report)

    @property
    def expr(self) -> str:
        expr = f"{self.query} {self.op} {self.threshold:g}"
        return f"{expr} or absent({self.absent})" if self.absent else expr

    def rule(self) -> dict[str, Any]:
        return {
            "alert": self.name,
            "expr": self.expr,
            "for": self.for_,
            "labels": {"severity": self.severity},
            "annotations": {
                "summary": self.summary,
                "description": self.description,
                "runbook_url": f"{RUNBOOKS}#{self.name.lower()}",
            },
        }


def _ratio(numerator: str, denominator: str) -> str:
    return f"({numerator}) / ({denominator})"


ALERTS: tuple[Alert, ...] = (
    Alert(
        "PierSessionStartsFailing",
        _ratio(
            "sum by (namespace, profile) (rate(pier_router_sessions_failed_total[10m]))",
            "sum by (namespace, profile) (rate(pier_router_sessions_started_total[10m]))"
            " + sum by (namespace, profile) (rate(pier_router_sessions_failed_total[10m]))",
        ),
        ">", 0.25, "10m", "warning",
        "Sessions of profile {{ $labels.profile }} are failing to start",
        "{{ $value | humanizePercentage }} of the session starts of {{ $labels.profile }} failed over 10 minutes.",
    ),
    Alert(
        "PierJobStoreUnavailable",
        'min by (namespace) ({__name__=~"pier_router_redis_up|pier_jobs_redis_up"})',
        "<", 1, "2m", "critical",
        "Pier's job store (Redis) is unreachable",
        "A router or worker cannot reach Redis: hand-offs, jobs, idempotency keys and rate limits fail (503).",
    ),
    Alert(
        "PierJobsWaitingTooLong",
        "max by (namespace) (pier_jobs_oldest_queued_age_seconds)",
        ">", 120, "5m", "warning",
        "Handed-off jobs are waiting for a worker",
        "The oldest job no worker has taken has waited {{ $value | humanizeDuration }}.",
    ),
    Alert(
        "PierWebhooksFailing",
        _ratio(
            'sum by (namespace) (rate(pier_webhook_deliveries_total{outcome="retried"}[10m]))',
            'sum by (namespace) (rate(pier_webhook_deliveries_total{outcome=~"retried|delivered"}[10m]))',
        ),
        ">", 0.5, "10m", "warning",
        "Most webhook deliveries fail",
        "{{ $value | humanizePercentage }} of webhook attempts failed over 10 minutes; failed ones are dead-lettered.",
    ),
    Alert(
        "PierRouter5xxRatio",
        _ratio(
            f'sum by (namespace) (rate(pier_router_requests_total{{status=~"5..", {CALLS}}}[5m]))',
            f"sum by (namespace) (rate(pier_router_requests_total{{{CALLS}}}[5m]))",
        ),
        ">", 0.05, "10m", "warning",
        "The router answers many requests with 5xx",
        "{{ $value | humanizePercentage }} of the router's answers were 5xx over 5 minutes.",
    ),
    Alert(
        "PierWarmPoolEmpty",
        'min by (namespace, profile) ({__name__=~"pier_router_pool_ready|pier_operator_pool_ready"})',
        "<", 1, "10m", "warning",
        "The warm pool of {{ $labels.profile }} is empty",
        "No pooled session of {{ $labels.profile }} has been ready for 10 minutes: new users wait for a cold start.",
    ),
    Alert(
        "PierOperatorReconcileErrors",
        _ratio(
            'sum by (namespace) (rate(pier_operator_reconciles_total{outcome="error"}[10m]))',
            "sum by (namespace) (rate(pier_operator_reconciles_total[10m]))",
        ),
        ">", 0.1, "15m", "warning",
        "The operator's reconciles fail",
        "{{ $value | humanizePercentage }} of MCPSession reconciles failed over 10 minutes.",
    ),
    Alert(
        "PierNoReadyRouter",
        "sum by (namespace) (pier_router_ready)",
        "<", 1, "5m", "critical",
        "No Pier router is ready",
        "No router reports itself ready (or none is scraped): no call reaches any session.",
        absent="pier_router_ready",
    ),
)  # fmt: skip


def alert_rules() -> dict[str, Any]:
    """The PrometheusRule's spec: one group."""
    return {"groups": [{"name": "pier", "rules": [alert.rule() for alert in ALERTS]}]}


# -- dashboards -----------------------------------------------------------------------------------


@dataclass
class Panel:
    title: str
    queries: list[tuple[str, str]]  # (PromQL, legend)
    unit: str = "short"
    kind: str = "timeseries"  # or stat
    description: str = ""
    width: int = 12


@dataclass
class Row:
    title: str
    panels: list[Panel] = field(default_factory=list)


def _rate(metric: str, by: str, extra: str = "") -> str:
    selector = f"{{{NS}{', ' + extra if extra else ''}}}"
    return f"sum by ({by}) (rate({metric}{selector}[{RATE}]))" if by else f"sum(rate({metric}{selector}[{RATE}]))"


def _quantile(q: float, metric: str, by: str) -> str:
    return f"histogram_quantile({q}, sum by (le{', ' + by if by else ''}) (rate({metric}_bucket{{{NS}}}[{RATE}])))"


def _pools(component: str) -> list[Panel]:
    """The warm pools of a component (`router`: local sessions; `operator`: pods)."""
    name = f"pier_{component}_pool"
    return [
        Panel("Warm pools: ready of size", [
            (f"sum by (profile) ({name}_ready{{{NS}}})", "ready {{profile}}"),
            (f"sum by (profile) ({name}_size{{{NS}}})", "size {{profile}}"),
        ]),
        Panel("Warm pools: claims and misses", [
            (_rate(f"{name}_claims_total", "profile"), "claims {{profile}}"),
            (_rate(f"{name}_misses_total", "profile"), "misses {{profile}}"),
        ], "ops"),
    ]  # fmt: skip


OVERVIEW: list[Row] = [
    Row("Calls", [
        Panel("Calls by profile and outcome", [(_rate("pier_router_calls_total", "profile, outcome"),
              "{{profile}} {{outcome}}")], "reqps"),
        Panel("Errors by code and profile", [(_rate("pier_router_calls_total", "profile, outcome",
              f'outcome!~"{ANSWERS}"'), "{{profile}} {{outcome}}")], "reqps",
              description="Calls that ended in one of Pier's error codes (a tool's own error result is an answer)."),
        Panel("Call latency p50 / p99 by profile (until answer or hand-off)", [
            (_quantile(0.5, "pier_router_call_duration_seconds", "profile"), "p50 {{profile}}"),
            (_quantile(0.99, "pier_router_call_duration_seconds", "profile"), "p99 {{profile}}"),
        ], "s"),
        Panel("HTTP answers by status", [(_rate("pier_router_requests_total", "status"), "{{status}}")], "reqps"),
        Panel("Share of 5xx answers (probes and scrapes left out)", [(_ratio(
            _rate("pier_router_requests_total", "", f'status=~"5..", {CALLS}'),
            _rate("pier_router_requests_total", "", CALLS)), "5xx")], "percentunit"),
        Panel("Retries and hand-offs", [
            (_rate("pier_router_call_retries_total", "profile"), "retries {{profile}}"),
            (_rate("pier_router_handoffs_total", "profile"), "hand-offs {{profile}}"),
        ], "reqps"),
    ]),
    Row("Sessions", [
        Panel("Sessions by profile (local backend)", [(f"sum by (profile) (pier_router_sessions_active{{{NS}}})",
              "{{profile}}")]),
        Panel("Starts and start failures", [
            (_rate("pier_router_sessions_started_total", "profile"), "started {{profile}}"),
            (_rate("pier_router_sessions_failed_total", "profile"), "failed {{profile}}"),
        ], "ops"),
        Panel("Sessions ended, by reason", [(_rate("pier_router_sessions_reaped_total", "reason"), "{{reason}}")],
              "ops"),
        *_pools("router"),
    ]),
    Row("Jobs", [
        Panel("Jobs queued, waiting for a worker, running", [
            (f"max(pier_jobs_queue_depth{{{NS}}})", "on the stream"),
            (f"max(pier_jobs_queue_lag{{{NS}}})", "waiting"),
            (f"sum(pier_jobs_running{{{NS}}})", "running"),
        ]),
        Panel("Oldest waiting job", [(f"max(pier_jobs_oldest_queued_age_seconds{{{NS}}})", "age")], "s", "stat"),
        Panel("Jobs finished, by status", [(_rate("pier_jobs_finished_total", "status"), "{{status}}")], "ops"),
        Panel("Job duration p50 / p99", [
            (_quantile(0.5, "pier_job_duration_seconds", ""), "p50"),
            (_quantile(0.99, "pier_job_duration_seconds", ""), "p99"),
        ], "s"),
    ]),
    Row("Redis, webhooks, traces", [
        Panel("Redis reachable (routers, workers)", [
            (f"min(pier_router_redis_up{{{NS}}})", "routers"),
            (f"min(pier_jobs_redis_up{{{NS}}})", "workers"),
        ], kind="stat"),
        Panel("Redis errors", [
            (_rate("pier_router_redis_errors_total", "op"), "router {{op}}"),
            (_rate("pier_jobs_redis_errors_total", ""), "workers"),
        ], "ops"),
        Panel("Webhook attempts, by outcome", [(_rate("pier_webhook_deliveries_total", "outcome"), "{{outcome}}")],
              "ops"),
        Panel("Webhooks dead-lettered (kept)", [(f"max(pier_webhooks_dead_letters{{{NS}}})", "dead letters")],
              kind="stat"),
        Panel("Spans exported, dropped, failed", [(_rate("pier_tracing_spans_total", "outcome"), "{{outcome}}")],
              "ops", description="Spans a full queue dropped or an unreachable collector lost."),
    ]),
    Row("Bridges (session pods, when scraped)", [
        Panel("Bridge call latency p99", [(_quantile(0.99, "pier_bridge_call_duration_seconds", ""), "p99")], "s"),
        Panel("Bridge requests in flight, server restarts", [
            (f"sum(pier_bridge_requests_in_flight{{{NS}}})", "in flight"),
            (_rate("pier_bridge_server_restarts_total", ""), "restarts"),
        ]),
    ]),
]  # fmt: skip

OPERATOR: list[Row] = [
    Row("Reconciles", [
        Panel("Reconciles, by outcome", [(_rate("pier_operator_reconciles_total", "outcome"), "{{outcome}}")], "ops"),
        Panel("Share of reconciles failing", [(_ratio(
            _rate("pier_operator_reconciles_total", "", 'outcome="error"'),
            _rate("pier_operator_reconciles_total", "")), "errors")], "percentunit"),
        Panel("Reconcile duration p50 / p99", [
            (_quantile(0.5, "pier_operator_reconcile_duration_seconds", ""), "p50"),
            (_quantile(0.99, "pier_operator_reconcile_duration_seconds", ""), "p99"),
        ], "s"),
    ]),
    Row("Sessions and pods", [
        Panel("MCPSessions by phase", [(f"sum by (phase) (pier_operator_sessions{{{NS}}})", "{{phase}}")]),
        Panel("Pods by phase", [(f"sum by (phase) (pier_operator_pods{{{NS}}})", "{{phase}}")]),
        *_pools("operator"),
    ]),
]  # fmt: skip

DASHBOARDS = {
    "pier-overview": ("Pier: overview", OVERVIEW),
    "pier-operator": ("Pier: operator", OPERATOR),
}


def _panel(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    targets = [
        {"refId": chr(ord("A") + n), "expr": expr, "legendFormat": legend, "datasource": {"uid": "${datasource}"}}
        for n, (expr, legend) in enumerate(panel.queries)
    ]
    return {
        "id": panel_id, "type": panel.kind, "title": panel.title, "description": panel.description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}} if panel.kind == "timeseries" else {},
        "targets": targets,
    }  # fmt: skip


def dashboard(uid: str, title: str, rows: list[Row]) -> dict[str, Any]:
    """One Grafana dashboard (schema 39): a datasource and a namespace variable, rows of panels."""
    panels: list[dict[str, Any]] = []
    y, panel_id = 0, 1
    for row in rows:
        panels.append({"id": panel_id, "type": "row", "title": row.title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})  # fmt: skip
        panel_id, y, x = panel_id + 1, y + 1, 0
        for panel in row.panels:
            if x + panel.width > 24:
                x, y = 0, y + 8
            panels.append(_panel(panel, panel_id, x, y))
            panel_id, x = panel_id + 1, x + panel.width
        y += 8
    namespace = {
        "name": "namespace", "label": "namespace", "type": "query", "datasource": {"uid": "${datasource}"},
        "query": {"query": "label_values(pier_router_requests_total, namespace)", "refId": "namespaces"},
        "includeAll": True, "allValue": ".*", "multi": True, "refresh": 2,
        "current": {"text": "All", "value": "$__all"},
    }  # fmt: skip
    source = {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus"}
    return {
        "uid": uid, "title": title, "tags": ["pier", "mcp"], "timezone": "browser", "schemaVersion": 39,
        "version": 1, "editable": True, "refresh": "30s", "time": {"from": "now-3h", "to": "now"},
        "templating": {"list": [source, namespace]}, "panels": panels,
        "annotations": {"list": []}, "links": [],
    }  # fmt: skip


def dashboards() -> dict[str, dict[str, Any]]:
    """Every dashboard, by file name (without `.json`)."""
    return {uid: dashboard(uid, title, rows) for uid, (title, rows) in DASHBOARDS.items()}


def queries(board: dict[str, Any]) -> list[str]:
    """Every PromQL query of a dashboard as it ships (templates unresolved)."""
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])]


def files(chart: Any) -> dict[Any, str]:
    """The chart's generated dashboards and rules (path → text)."""
    out: dict[Any, str] = {
        chart / "dashboards" / f"{name}.json": json.dumps(board, indent=2) + "\n"
        for name, board in dashboards().items()
    }
    header = "# Generated by `make manifests` from tools/observability.py; do not edit by hand.\n"
    out[chart / "rules" / "pier-alerts.yaml"] = header + yaml.safe_dump(alert_rules(), sort_keys=False, width=200)
    return out
