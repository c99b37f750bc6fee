"""The chart's values sets every chart test renders or installs (tests/k8s/test_chart.py, test_chart_install.py)."""

from __future__ import annotations

from typing import Any

# The values sets the issue names, plus the knobs that change what is rendered.
VALUES_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "external-redis": {"redis": {"enabled": False}, "externalRedis": {"url": "rediss://:secret@redis.example:6380/2"}},
    "ha": {
        "operator": {"replicaCount": 3},
        "jobs": {"replicaCount": 4},
        "router": {"autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 12}},
        "redis": {"persistence": {"storageClass": "fast-ssd", "size": "8Gi"}},
        "imagePullSecrets": [{"name": "registry"}],
        "sessions": {
            "nodeSelector": {"pool": "tenants"},
            "tolerations": [{"key": "tenants", "operator": "Exists", "effect": "NoSchedule"}],
            "runtimeClassName": "gvisor",
        },
    },
    "autoscaled": {
        "router": {"autoscaling": {"enabled": True}},
        "jobs": {"autoscaling": {"enabled": True, "keda": "never", "minReplicas": 3, "queuedPerWorker": 50}},
        "sessions": {"priorityClass": {"create": False, "name": "tenants-high"}, "nodeLostAfterSeconds": 20},
        "operator": {
            "replicaCount": 1,
            "topologySpreadConstraints": [
                {
                    "maxSkew": 1,
                    "topologyKey": "kubernetes.io/hostname",
                    "whenUnsatisfiable": "DoNotSchedule",
                    "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "operator"}},
                }
            ],
        },
    },
    "keda": {"jobs": {"autoscaling": {"enabled": True, "keda": "always", "maxReplicas": 20}}},
    "ingress": {
        "router": {
            "ingress": {
                "enabled": True,
                "className": "nginx",
                "annotations": {"nginx.ingress.kubernetes.io/proxy-read-timeout": "300"},
                "hosts": [{"host": "mcp.example.com"}],
                "tls": [{"hosts": ["mcp.example.com"], "secretName": "mcp-tls"}],
            },
            "tls": {"existingSecret": "router-cert"},
        },
        "jobs": {"webhook": {"url": "https://hooks.example/pier", "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}},
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
        "profiles": {
            "fetch": {"command": ["uvx", "mcp-server-fetch"], "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}]},
            "everything": {"command": ["npx", "-y", "@modelcontextprotocol/server-everything"], "ttl_s": 600},
            "demo": None,  # Helm merges maps: null removes a default entry
        },
        "defaultProfile": "everything",
    },
    "observability": {
        "metrics": {
            "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
            "sessionPodMonitor": {"enabled": True},
            "dashboards": {"enabled": True, "annotations": {"grafana_folder": "Pier"}},
            "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}},
        },
        "tracing": {
            "otlpEndpoint": "http://otel-collector.monitoring:4318",
            "headersSecret": "otel-headers",
            "sampler": "parentbased_traceidratio",
            "samplerArg": "0.25",
            "resourceAttributes": {"deployment.environment": "production"},
        },
    },
}
