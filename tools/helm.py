"""The Helm chart's values, as a model: the one source of `values.yaml`, `values.schema.json` and deploy/.

`python -m tools.helm` (or `make manifests`) writes, from code:
- `charts/pier/values.yaml` (every default, each with its description as a comment),
- `charts/pier/values.schema.json` (Helm validates every install and upgrade against it),
- `charts/pier/crds/mcpsessions.yaml` (the MCPSession CRD, from `pier.core.mcpsession`),
- `deploy/` (the chart rendered with `deploy/values.yaml`, for `kubectl apply -k deploy/`).
Tests check the committed files are what this produces.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "pier"
DEPLOY = ROOT / "deploy"
RELEASE = "pier"  # deploy/ is the chart installed as release "pier" in namespace "pier"
Manifest = dict[str, Any]  # a Kubernetes object or fragment, validated by the API server, not here


class Values(BaseModel):
    """Helm's conventions: camelCase keys; unknown keys are refused (a typo is an error, not a no-op)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Image(Values):
    repository: str = Field(default="ghcr.io/pier-dev/pier", description="one image runs every component")
    tag: str = Field(default="", description="defaults to the chart's appVersion")
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"


class Scheduling(Values):
    """What every component's pods share: placement, resources and extra settings."""

    resources: Manifest = Field(default_factory=dict, description="container resources")
    env: dict[str, str] = Field(default_factory=dict, description="extra PIER_* settings (README: Configuration)")
    extra_env: list[Manifest] = Field(default_factory=list, description="extra EnvVar objects (secretKeyRef…)")
    pod_annotations: dict[str, str] = Field(default_factory=dict)
    pod_labels: dict[str, str] = Field(default_factory=dict)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Manifest] = Field(default_factory=list)
    affinity: Manifest = Field(default_factory=dict)
    topology_spread_constraints: list[Manifest] = Field(
        default_factory=list, description="replaces the default spread (`spread`) when given"
    )
    spread: bool = Field(
        default=True, description="spread replicas over nodes and zones when it can (ScheduleAnyway), by default"
    )
    priority_class_name: str = ""


class Disruption(Values):
    enabled: bool = Field(default=True, description="a PodDisruptionBudget (only when more than one replica)")
    max_unavailable: int = Field(default=1, ge=0)


class Service(Values):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    port: int = Field(default=80, ge=1, le=65535, description="the Service's port (the router listens on 8000)")
    annotations: dict[str, str] = Field(default_factory=dict)


class IngressPath(Values):
    path: str = "/"
    path_type: Literal["Prefix", "Exact", "ImplementationSpecific"] = "Prefix"


class IngressHost(Values):
    host: str
    paths: list[IngressPath] = Field(default_factory=lambda: [IngressPath()])


class Ingress(Values):
    enabled: bool = False
    class_name: str = ""
    annotations: dict[str, str] = Field(
        default_factory=dict, description="e.g. a proxy read timeout above the call timeout, for SSE and long polls"
    )
    hosts: list[IngressHost] = Field(default_factory=lambda: [IngressHost(host="pier.example.com")])
    tls: list[Manifest] = Field(default_factory=list, description="IngressTLS objects (hosts, secretName)")


class Autoscaling(Values):
    enabled: bool = Field(default=False, description="a HorizontalPodAutoscaler instead of a fixed replicaCount")
    min_replicas: int = Field(default=2, ge=1)
    max_replicas: int = Field(default=10, ge=1)
    target_cpu_utilization_percentage: int = Field(default=70, ge=1, le=100)


class RouterTls(Values):
    existing_secret: str = Field(default="", description="a kubernetes.io/tls Secret: the router serves HTTPS")
    client_ca_secret: str = Field(default="", description="Secret with `ca.crt`: require client certificates")


class Oidc(Values):
    """Sign-in with the company's identity provider (README: Sign-in)."""

    issuer: str = Field(default="", description="a trusted OpenID issuer (its JWT access tokens are accepted)")
    audience: str = Field(default="", description="the `aud` its tokens must name (default: publicUrl)")
    user_claim: str = Field(default="sub", description="the claim naming the Pier user")
    scopes: list[str] = Field(default_factory=list, description="scopes every token must carry")
    issuers: list[Manifest] = Field(
        default_factory=list, description="more issuers: objects with issuer, audience, user_claim, scopes"
    )


class Router(Scheduling):
    replica_count: int = Field(default=2, ge=1, description="ignored when autoscaling is on")
    processes: int = Field(
        default=1, ge=1, le=64,
        description="router processes per pod on its port (scale is by replicas; more for big nodes; no router.tls)",
    )  # fmt: skip
    public_url: str = Field(
        default="", description="the router's URL as callers reach it: token audience, OAuth resource metadata"
    )
    oidc: Oidc = Field(default_factory=Oidc)
    resources: Manifest = Field(
        default_factory=lambda: {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}
    )
    service: Service = Field(default_factory=Service)
    ingress: Ingress = Field(default_factory=Ingress)
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    pdb: Disruption = Field(default_factory=Disruption)
    tls: RouterTls = Field(default_factory=RouterTls)


class Operator(Scheduling):
    replica_count: int = Field(
        default=2, ge=1,
        description="replicas elect one worker through a Lease; the others keep their caches warm and take over",
    )  # fmt: skip
    resources: Manifest = Field(
        # Above what `make k8s-scale --quick` measured at 500 sessions (82.8 MiB RSS at rest; README: Sizing);
        # not yet checked against a larger run.
        default_factory=lambda: {"requests": {"cpu": "100m", "memory": "192Mi"}, "limits": {"memory": "512Mi"}},
        description="container resources (README: Sizing gives them per 1,000 sessions)",
    )
    pdb: Disruption = Field(default_factory=Disruption)


class Webhook(Values):
    url: str = Field(default="", description="where finished jobs are POSTed (profiles may override)")
    secret: str = Field(default="", description="Standard Webhooks signing secret (whsec_…); stored in a Secret")
    existing_secret: str = Field(default="", description="a Secret with key `secret` instead")


class JobsAutoscaling(Values):
    enabled: bool = Field(
        default=False, description="scale workers on the job stream's backlog (a KEDA ScaledObject, or an HPA)"
    )
    min_replicas: int = Field(default=2, ge=1)
    max_replicas: int = Field(default=10, ge=1)
    queued_per_worker: int = Field(
        default=20, ge=1, description="jobs no worker has taken yet, per worker, above which workers are added"
    )
    oldest_queued_seconds: int = Field(
        default=10, ge=1, description="age of the oldest job no worker has taken yet above which workers are added"
    )
    keda: Literal["auto", "always", "never"] = Field(
        default="auto",
        description="a KEDA ScaledObject when KEDA's CRD is installed (auto), always (rendering without a cluster), "
        "or never (an HPA on the external metrics pier_jobs_queue_lag and pier_jobs_oldest_queued_age_seconds)",
    )
    polling_interval_seconds: int = Field(default=15, ge=1, description="how often KEDA reads the backlog")


class Jobs(Scheduling):
    replica_count: int = Field(
        default=2, ge=1, description="workers (ignored when autoscaling is on); a stopped one's jobs are reclaimed"
    )
    resources: Manifest = Field(
        default_factory=lambda: {"requests": {"cpu": "50m", "memory": "96Mi"}, "limits": {"memory": "256Mi"}}
    )
    autoscaling: JobsAutoscaling = Field(default_factory=JobsAutoscaling)
    pdb: Disruption = Field(default_factory=Disruption)
    webhook: Webhook = Field(default_factory=Webhook)


class Auth(Values):
    existing_secret: str = Field(default="", description="a Secret with key `keys.yaml` (app_keys, user_keys)")
    app_keys: list[str] = Field(default_factory=list, description="keys that may act for any user")
    user_keys: dict[str, str] = Field(default_factory=dict, description="user key → the one user_id it serves")
    generate_app_key: bool = Field(
        default=True, description="with no keys given, generate one app key (NOTES.txt shows how to read it)"
    )


class BridgeToken(Values):
    existing_secret: str = Field(
        default="", description="a Secret with key `token`; else one is generated (kept across upgrades)"
    )


class Persistence(Values):
    enabled: bool = True
    size: str = "1Gi"
    storage_class: str = Field(default="", description='"" = the cluster\'s default StorageClass')


class RedisAuth(Values):
    enabled: bool = True
    existing_secret: str = Field(
        default="", description="a Secret with key `password` (URL-safe characters); else one is generated"
    )


class RedisImage(Values):
    repository: str = "redis"
    tag: str = "7.4-alpine"
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"


class Redis(Values):
    enabled: bool = Field(default=True, description="bundled Redis (one pod, AOF on); false = externalRedis")
    image: RedisImage = Field(default_factory=RedisImage)
    auth: RedisAuth = Field(default_factory=RedisAuth)
    persistence: Persistence = Field(default_factory=Persistence)
    resources: Manifest = Field(
        default_factory=lambda: {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}}
    )
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Manifest] = Field(default_factory=list)
    affinity: Manifest = Field(default_factory=dict)


class ExternalRedis(Values):
    url: str = Field(default="", description="redis:// or rediss:// URL; stored in a Secret")
    existing_secret: str = Field(default="", description="a Secret with key `url` instead")


# Session pods may reach DNS and the internet, never the cluster's private ranges (other pods, cloud metadata).
_PRIVATE = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "100.64.0.0/10"]
_DEFAULT_EGRESS: list[Manifest] = [
    {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]},
    {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": _PRIVATE}}]},
]


class PriorityClass(Values):
    create: bool = Field(
        default=True, description="a PriorityClass for session pods (`<namespace>-<release>-pier-sessions`)"
    )
    name: str = Field(default="", description="use this existing PriorityClass instead (with create: false)")
    value: int = Field(
        default=100, ge=-2147483648, le=1000000000,
        description="above ordinary workloads (0): a full cluster makes room for users' sessions; keep Pier's own "
        "components above it (their priorityClassName)",
    )  # fmt: skip
    preemption_policy: Literal["PreemptLowerPriority", "Never"] = "PreemptLowerPriority"


class Sessions(Values):
    """Where the operator puts session pods (each runs one tenant's server), and how they face a lost node."""

    node_selector: dict[str, str] = Field(default_factory=dict, description="e.g. a node pool for tenant code")
    tolerations: list[Manifest] = Field(default_factory=list)
    runtime_class_name: str = Field(default="", description="e.g. gvisor: sandbox untrusted servers")
    priority_class: PriorityClass = Field(default_factory=PriorityClass)
    node_lost_after_seconds: int = Field(
        default=10, ge=0, description="a node NotReady or unreachable this long: its sessions get new pods elsewhere"
    )
    node_loss_toleration_seconds: int = Field(
        default=30, ge=0,
        description="session pods tolerate a lost node's taints this long (Kubernetes' default: 300 s)",
    )  # fmt: skip
    readiness_period_seconds: int = Field(
        default=2, ge=1, le=300, description="how often kubelets probe session bridges (raise it at 100+ per node)"
    )


class NetworkPolicy(Values):
    enabled: bool = Field(
        default=True,
        description="session pods: ingress only from router, job pool and operator; Redis: only from router and jobs",
    )
    session_egress: list[Manifest] = Field(
        default_factory=lambda: [dict(rule) for rule in _DEFAULT_EGRESS],
        description="egress rules of session pods; a profile's own `egress` replaces them for its sessions",
    )


class ServiceMonitor(Values):
    enabled: bool = Field(
        default=False,
        description="Prometheus Operator ServiceMonitors for router and job pool, a PodMonitor for the operator",
    )
    interval: str = "30s"
    labels: dict[str, str] = Field(default_factory=dict, description="labels your Prometheus selects on")


class SessionPodMonitor(Values):
    enabled: bool = Field(
        default=False,
        description="a PodMonitor for the session pods' bridges (`pier_bridge_*`); the sessions' NetworkPolicy "
        "then admits Prometheus",
    )
    interval: str = "30s"
    labels: dict[str, str] = Field(default_factory=dict, description="labels your Prometheus selects on")
    prometheus_namespace: str = Field(
        default="monitoring", description="the namespace Prometheus scrapes from (admitted to the bridges' port)"
    )


class Dashboards(Values):
    enabled: bool = Field(
        default=False, description="Grafana dashboards (overview, operator) as ConfigMaps for Grafana's sidecar"
    )
    labels: dict[str, str] = Field(
        default_factory=lambda: {"grafana_dashboard": "1"}, description="what Grafana's dashboard sidecar selects"
    )
    annotations: dict[str, str] = Field(default_factory=dict, description="e.g. the sidecar's folder annotation")
    namespace: str = Field(default="", description="where the ConfigMaps go (default: the release's namespace)")


class PrometheusRule(Values):
    enabled: bool = Field(default=False, description="a PrometheusRule with Pier's alerts (README: Alerts)")
    labels: dict[str, str] = Field(default_factory=dict, description="labels your Prometheus selects rules on")


class Metrics(Values):
    service_monitor: ServiceMonitor = Field(default_factory=ServiceMonitor)
    session_pod_monitor: SessionPodMonitor = Field(default_factory=SessionPodMonitor)
    dashboards: Dashboards = Field(default_factory=Dashboards)
    prometheus_rule: PrometheusRule = Field(default_factory=PrometheusRule)


class Tracing(Values):
    """OpenTelemetry traces of router, job pool and operator (README: Traces)."""

    otlp_endpoint: str = Field(
        default="",
        description="OTLP/HTTP endpoint (OTEL_EXPORTER_OTLP_ENDPOINT), e.g. http://collector:4318; empty: off",
    )
    headers_secret: str = Field(
        default="", description="a Secret with key `headers` (OTEL_EXPORTER_OTLP_HEADERS: the collector's credentials)"
    )
    sampler: str = Field(default="parentbased_always_on", description="OTEL_TRACES_SAMPLER")
    sampler_arg: str = Field(default="", description="OTEL_TRACES_SAMPLER_ARG, e.g. 0.1 for a ratio sampler")
    resource_attributes: dict[str, str] = Field(
        default_factory=dict, description="more resource attributes (k8s.namespace.name and k8s.pod.name are set)"
    )


class ServiceAccounts(Values):
    annotations: dict[str, str] = Field(default_factory=dict, description="on the operator's and router's accounts")


class ChartValues(Values):
    """Every value of charts/pier (documented in the README's values table and in values.yaml)."""

    name_override: str = Field(default="", description="replaces the chart name in object names")
    fullname_override: str = Field(default="", description="replaces `<release>-pier` in object names")
    kube_version: str = Field(default="", description="override the cluster version the templates target")
    common_labels: dict[str, str] = Field(default_factory=dict, description="added to every object")
    image: Image = Field(default_factory=Image)
    image_pull_secrets: list[Manifest] = Field(
        default_factory=list, description="LocalObjectReferences ({name}) for every pod, session pods included"
    )
    profiles: dict[str, Manifest] = Field(
        default_factory=lambda: {
            "demo": {
                "description": "Pier's demo server: echo, slow, counter, count, fail, crash",
                "command": ["python", "-m", "pier.examples.demo_server"],
                "trust_annotations": True,
            }
        },
        description="the profile catalog (README: Profiles); `egress` sets a profile's session egress rules",
    )
    default_profile: str = Field(default="demo", description="profile of bridgekit-style calls naming none")
    auth: Auth = Field(default_factory=Auth)
    bridge_token: BridgeToken = Field(default_factory=BridgeToken)
    router: Router = Field(default_factory=Router)
    operator: Operator = Field(default_factory=Operator)
    sessions: Sessions = Field(default_factory=Sessions)
    jobs: Jobs = Field(default_factory=Jobs)
    redis: Redis = Field(default_factory=Redis)
    external_redis: ExternalRedis = Field(default_factory=ExternalRedis)
    network_policy: NetworkPolicy = Field(default_factory=NetworkPolicy)
    metrics: Metrics = Field(default_factory=Metrics)
    tracing: Tracing = Field(default_factory=Tracing)
    service_accounts: ServiceAccounts = Field(default_factory=ServiceAccounts)
    pod_security_context: Manifest = Field(
        description="router, operator and job pool pods (Redis runs as its image's user, 999)",
        default_factory=lambda: {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "fsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    )
    container_security_context: Manifest = Field(
        description="every container of router, operator, job pool and Redis",
        default_factory=lambda: {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    )


# -- values.schema.json ------------------------------------------------------------------------------


def schema() -> dict[str, Any]:
    """JSON Schema of the values (draft 2020-12, which Helm 3.18+/4 validate with).

    Catalog entries are checked against the router's own `Profile` model (less `name`: it is the key).
    """
    from pier.core.catalog import Profile

    raw = ChartValues.model_json_schema(by_alias=True, mode="validation")
    profile = Profile.model_json_schema(mode="validation")
    raw.setdefault("$defs", {}).update(profile.pop("$defs", {}))
    profile["properties"].pop("name")
    profile["required"] = [field for field in profile.get("required", []) if field != "name"]
    raw["$defs"]["Profile"] = profile
    raw["properties"]["profiles"]["additionalProperties"] = {"$ref": "#/$defs/Profile"}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "Pier Helm chart values", **raw}


# -- values.yaml ---------------------------------------------------------------------------------------


def _comment(text: str | None, indent: str) -> list[str]:
    return [f"{indent}# {line}" for line in (text or "").splitlines()]


def _yaml_lines(model: type[BaseModel], data: dict[str, Any], indent: str) -> list[str]:
    lines: list[str] = []
    # A component's own fields (replicaCount, service…) before the scheduling ones it inherits.
    own = [name for name in model.model_fields if name in model.__annotations__]
    for name in own + [name for name in model.model_fields if name not in own]:
        field = model.model_fields[name]
        key = field.alias or name
        value = data[key]
        lines += _comment(field.description, indent)
        nested = field.annotation if isinstance(field.annotation, type) else None
        if nested is not None and issubclass(nested, BaseModel):
            lines.append(f"{indent}{key}:")
            lines += _yaml_lines(nested, value, indent + "  ")
        elif isinstance(value, dict | list) and value:
            dumped = yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=False).splitlines()
            lines += [indent + line for line in dumped]
        else:
            lines.append(indent + yaml.safe_dump({key: value}, default_flow_style=True).strip()[1:-1])
    return lines


def values_yaml() -> str:
    """The chart's values.yaml: the defaults of `ChartValues`, each under its description."""
    data = ChartValues().model_dump(by_alias=True)
    header = [
        "# Pier's chart values. Generated by `make manifests` from tools/helm.py; do not edit by hand.",
        "# values.schema.json (same source) checks every install and upgrade.",
        "",
    ]
    return "\n".join(header + _yaml_lines(ChartValues, data, "")) + "\n"


# -- the README's values table ----------------------------------------------------------------------


def _default(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return f"`{text}`" if len(text) <= 50 else "see values.yaml"


def _rows(model: type[BaseModel], data: dict[str, Any], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        nested = field.annotation if isinstance(field.annotation, type) else None
        if nested is not None and issubclass(nested, BaseModel):
            rows += _rows(nested, data[key], f"{prefix}{key}.")
        elif not (issubclass(model, Scheduling) and name not in model.__annotations__):  # shared: listed once
            rows.append(f"| `{prefix}{key}` | {_default(data[key])} | {field.description or ''} |")
    return rows


def values_table() -> str:
    """The README's table of chart values (a test checks the README carries exactly this)."""
    rows = ["| value | default | what it does |", "|---|---|---|"]
    rows += _rows(ChartValues, ChartValues().model_dump(by_alias=True), "")
    shared = Scheduling().model_dump(by_alias=True)
    for name, field in Scheduling.model_fields.items():
        if name != "resources":  # each component has its own default resources (above)
            key = field.alias or name
            rows.append(
                f"| `router`, `operator`, `jobs`: `.{key}` | {_default(shared[key])} | {field.description or ''} |"
            )
    return "\n".join(rows) + "\n"


# -- deploy/ ---------------------------------------------------------------------------------------------


def _rendered(values: dict[str, Any] | None, name: str, namespace: str) -> dict[str, str]:
    import helm_python  # test/dev dependency: only generation and the tests render

    chart = helm_python.Chart.load(CHART)
    try:
        return chart.render(values or {}, name=name, namespace=namespace, is_install=True)
    finally:
        chart.close()


def render_notes(values: dict[str, Any] | None = None, name: str = RELEASE, namespace: str = RELEASE) -> str:
    """What `helm install` prints (NOTES.txt)."""
    return _rendered(values, name, namespace)[f"{CHART.name}/templates/NOTES.txt"]


def render(values: dict[str, Any] | None = None, name: str = RELEASE, namespace: str = RELEASE) -> list[Manifest]:
    """The chart rendered by the Helm engine (helm-python-sdk), as objects in a stable order; CRDs excluded."""
    rendered = _rendered(values, name, namespace)
    objects: list[Manifest] = []
    for path in sorted(rendered):
        if path.endswith(".yaml"):
            objects += [doc for doc in yaml.safe_load_all(rendered[path]) if doc]
    return objects


def crds() -> dict[str, str]:
    """The chart's CRDs (file name → YAML), generated from `pier.core.mcpsession`."""
    from tools import crd as mcpsession_crd

    return {"mcpsessions.yaml": mcpsession_crd.render()}


def deploy_files() -> dict[str, str]:
    """deploy/'s generated files: the chart rendered with deploy/values.yaml, and a kustomization."""
    values = yaml.safe_load((DEPLOY / "values.yaml").read_text())
    header = "# Generated by `make manifests` (the chart rendered with deploy/values.yaml); do not edit by hand.\n"
    files = {f"crds/{name}": text for name, text in crds().items()}
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": RELEASE}}
    files["pier.yaml"] = header + yaml.safe_dump_all([namespace, *render(values)], sort_keys=False)
    files["kustomization.yaml"] = header + yaml.safe_dump(
        {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [f"crds/{name}" for name in crds()] + ["pier.yaml"],
        },
        sort_keys=False,
    )
    return files


def chart_files() -> dict[Path, str]:
    """The chart's generated files and their expected content."""
    from tools import observability

    files = {CHART / "values.yaml": values_yaml(), CHART / "values.schema.json": json.dumps(schema(), indent=2) + "\n"}
    files |= observability.files(CHART)
    return files | {CHART / "crds" / name: text for name, text in crds().items()}


def main() -> int:
    # deploy/ is rendered from the chart, so the chart's own files are written first.
    for files in (chart_files, lambda: {DEPLOY / name: text for name, text in deploy_files().items()}):
        for path, text in files().items():
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists() or path.read_text() != text:
                path.write_text(text)
                print(f"wrote {path.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
