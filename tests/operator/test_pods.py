"""The MCPSession schema and Pod construction, without a cluster (the cluster tests are test_k8s.py)."""

from __future__ import annotations

import subprocess
import sys

import pydantic
import pytest
import yaml

from pier.core.catalog import Profile
from pier.core.mcpsession import MCPSessionSpec, MCPSessionStatus, connection_secret_name, label_value
from pier.operator.config import OperatorSettings
from pier.operator.pods import IO_DIR, build_pod
from tests.servers import ROOT
from tools.crd import crd, render


def test_the_committed_crd_is_the_generated_one():
    for path in (ROOT / "charts" / "pier" / "crds" / "mcpsessions.yaml", ROOT / "deploy" / "crds" / "mcpsessions.yaml"):
        assert path.read_text() == render(), "run: make manifests"


def _walk(schema: dict, path: str = "$"):
    yield path, schema
    for name, child in (schema.get("properties") or {}).items():
        yield from _walk(child, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")


def test_the_crd_schema_is_structural():
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), f"{path} has no type"
        assert "$ref" not in node, path
        assert "anyOf" not in node, path
        for option in node.get("oneOf", []):
            assert set(option) == {"required"}, f"{path}: oneOf may only constrain, not type"


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ({"server": {"profile": "demo"}}, "userId"),
        ({"userId": "alice", "server": {}}, "exactly one"),
        ({"userId": "alice", "server": {"profile": "demo", "command": ["x"]}}, "exactly one"),
        ({"userId": "alice", "server": {"profile": "Not_Valid"}}, "pattern"),
        ({"userId": "alice", "server": {"command": []}}, "at least 1"),
        ({"userId": "alice", "server": {"profile": "demo"}, "ttlSeconds": -1}, "greater than or equal"),
    ],
)
def test_invalid_specs_are_refused_with_a_reason(spec, problem):
    with pytest.raises(pydantic.ValidationError) as refused:
        MCPSessionSpec.model_validate(spec)
    assert problem in str(refused.value)


def test_child_mode_pod_runs_the_server_inside_the_hardened_bridge():
    secret_env = {"name": "T", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}
    server = {"command": ["node", "/srv/index.js", "stdio"], "env": [secret_env]}
    spec = MCPSessionSpec.model_validate({"userId": "alice@example.com", "server": server})
    pod = build_pod("s1", "uid-1", 3, 0, spec, None, OperatorSettings(bridge_token_secret="pier-bridge"))
    [bridge] = pod["spec"]["containers"]
    assert bridge["command"] == ["pier", "sidecar", "--", "node", "/srv/index.js", "stdio"]
    assert secret_env in bridge["env"]
    token = next(e for e in bridge["env"] if e["name"] == "PIER_SIDECAR_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == {"name": "pier-bridge", "key": "token"}
    assert bridge["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert bridge["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert bridge["securityContext"] == {
        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": True,
    }  # fmt: skip
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    [owner] = pod["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("MCPSession", "uid-1", True)
    assert pod["metadata"]["labels"]["pier.dev/session"] == "s1"
    assert pod["metadata"]["labels"]["pier.dev/user"] == label_value("alice@example.com")
    assert pod["metadata"]["name"] == "s1-g3-0"
    assert pod["spec"]["automountServiceAccountToken"] is False


def test_image_mode_pod_wires_the_server_container_through_fifos():
    profile = Profile(name="py", command=["python", "/app/server.py"], image="python:3.12-slim",
                      resources={"limits": {"memory": "512Mi"}})  # fmt: skip
    spec = MCPSessionSpec.model_validate({"userId": "bob", "server": {"profile": "py"}})
    pod = build_pod("s2", "uid-2", 1, 0, spec, profile, OperatorSettings())
    [prepare] = pod["spec"]["initContainers"]
    bridge, server = pod["spec"]["containers"]
    assert prepare["command"][-2:] == ["--prepare-attach", IO_DIR]
    assert bridge["command"][-2:] == ["--attach", IO_DIR]
    assert server["image"] == "python:3.12-slim"
    assert server["command"] == ["/bin/sh", f"{IO_DIR}/fifo-wrapper.sh", IO_DIR, "python", "/app/server.py"]
    assert server["resources"] == {"limits": {"memory": "512Mi"}}
    assert {"name": "io", "emptyDir": {}} in pod["spec"]["volumes"]


@pytest.mark.parametrize("image", [None, "node:22-slim"])
def test_a_users_upstream_token_reaches_the_server_from_their_connection_secret_alone(image):
    oauth = {"issuer": "https://auth.example.com", "client_id": "pier", "env": "GITHUB_TOKEN",
             "file": "/run/pier/github/token"}  # fmt: skip
    profile = Profile(name="github", command=["github-mcp"], image=image, upstream_oauth=oauth)
    spec = MCPSessionSpec.model_validate({"userId": "alice", "server": {"profile": "github"}})
    pod = build_pod("s4", "uid-4", 1, 0, spec, profile, OperatorSettings())
    server = pod["spec"]["containers"][-1]  # the bridge (its child is the server), or the server's own
    secret = connection_secret_name("alice", "github")
    assert {"name": "GITHUB_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": "token"}}} in server["env"]
    [volume] = [v for v in pod["spec"]["volumes"] if "secret" in v]
    # Only the token key is projected: the refresh token beside it never reaches the pod.
    assert volume["secret"] == {
        "secretName": secret,
        "items": [{"key": "token", "path": "token"}],
        "defaultMode": 0o440,
    }
    assert {"name": volume["name"], "mountPath": "/run/pier/github", "readOnly": True} in server["volumeMounts"]
    assert secret != connection_secret_name("bob", "github")
    # Without a token in the profile, nothing of it.
    plain = build_pod("s5", "uid-5", 1, 0, spec, Profile(name="github", command=["x"]), OperatorSettings())
    assert not [v for v in plain["spec"]["volumes"] if "secret" in v]


def test_session_pods_run_where_the_platform_says():
    spec = MCPSessionSpec.model_validate({"userId": "carol", "server": {"command": ["srv"]}})
    default = build_pod("s3", "uid-3", 1, 0, spec, None, OperatorSettings())["spec"]
    assert not {"imagePullSecrets", "nodeSelector", "runtimeClassName", "priorityClassName"} & set(default)
    # A lost node's taints are tolerated briefly (Kubernetes would add 300 s), never for good.
    assert default["tolerations"] == [
        {"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30}
        for key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")
    ]
    settings = OperatorSettings(
        image_pull_secrets=["registry"], session_node_selector={"pool": "tenants"},
        session_tolerations=[{"key": "tenants", "operator": "Exists", "effect": "NoSchedule"},
                             {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
                              "tolerationSeconds": 120}],
        session_runtime_class="gvisor", session_priority_class="pier-sessions", node_loss_toleration_s=20,
        session_readiness_period_s=10,
    )  # fmt: skip
    pod = build_pod("s3", "uid-3", 1, 0, spec, None, settings)["spec"]
    assert pod["imagePullSecrets"] == [{"name": "registry"}]
    assert pod["nodeSelector"] == {"pool": "tenants"}
    # The platform's own toleration of a taint wins; the other lost-node taint gets the brief one.
    assert [(t["key"], t.get("tolerationSeconds")) for t in pod["tolerations"]] == [
        ("tenants", None),
        ("node.kubernetes.io/unreachable", 120),
        ("node.kubernetes.io/not-ready", 20),
    ]
    assert pod["runtimeClassName"] == "gvisor"
    assert pod["priorityClassName"] == "pier-sessions"
    assert pod["containers"][0]["readinessProbe"]["periodSeconds"] == 10


def test_label_values_are_always_valid():
    for text in ("alice", "alice@example.com", "x" * 200, "-weird-", "é"):
        value = label_value(text)
        assert len(value) <= 63
        assert value == "" or (value[0].isalnum() and value[-1].isalnum())
        assert all(c.isalnum() or c in "._-" for c in value)


def test_crd_yaml_parses_back():
    assert yaml.safe_load(render())["metadata"]["name"] == "mcpsessions.pier.dev"


def test_the_operator_folder_never_shadows_the_stdlib_operator():
    # `python -m` from the repository root puts the root first on sys.path; with -S nothing imports the
    # stdlib `operator` before that, so a top-level `operator/__init__.py` would break every such command.
    done = subprocess.run(
        [sys.executable, "-S", "-c", "import operator; print(operator.__file__)"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert done.stdout.strip().endswith("operator.py")


def test_a_session_is_idle_only_from_when_it_became_ready():
    ready = MCPSessionStatus.model_validate(
        {
            "phase": "Ready",
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-11-30T12:00:05Z"}],
        }
    )
    assert ready.ready_since() == 1796040005.0
    starting = {"type": "Ready", "status": "False", "lastTransitionTime": "2026-11-30T12:00:05Z"}
    assert MCPSessionStatus.model_validate({"conditions": [starting]}).ready_since() == 0.0
