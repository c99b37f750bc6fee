"""The Pod that runs one MCPSession: a bridge container, and the server's own when it has an image."""

from __future__ import annotations

import hashlib
import re
from typing import Any

from pier.operator.config import OperatorSettings
from pier.operator.models import GROUP, KIND, PROFILE_LABEL, SESSION_LABEL, USER_LABEL, VERSION, MCPSessionSpec
from pier.router.profiles import Profile

BRIDGE_PORT = 8080
SERVER_CONTAINER = "server"  # attach mode: the server's own container
IO_DIR = "/pier/io"  # the emptyDir shared by the bridge and the server container (attach mode)
TMP_DIR = "/tmp"
GENERATION_ANNOTATION = "pier.dev/generation"
_DEFAULT_BRIDGE_RESOURCES = {"requests": {"cpu": "20m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}}


def label_value(text: str) -> str:
    """A valid label value (≤ 63 characters of [A-Za-z0-9._-]) that still tells who it is."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", text).strip("._-")
    if len(cleaned) <= 63 and cleaned == text:
        return cleaned
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    prefix = cleaned[:50].strip("._-")
    return f"{prefix}-{digest}" if prefix else digest


def pod_name(session: str, generation: int, replacement: int) -> str:
    return f"{session}-g{generation}-{replacement}"


def _hardened() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
    }


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": BRIDGE_PORT},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 2,
    }


def build_pod(
    name: str,
    uid: str,
    generation: int,
    replacement: int,
    spec: MCPSessionSpec,
    profile: Profile | None,
    settings: OperatorSettings,
) -> dict[str, Any]:
    """The Pod manifest for MCPSession `name` (owned by it, so deleting the session deletes it)."""
    server = spec.server
    command = server.command or (profile.command if profile else [])
    image = server.image or (profile.image if profile else None)
    env = list(server.env or []) + [{"name": k, "value": v} for k, v in (profile.env if profile else {}).items()]
    env_from = list(server.env_from or [])
    resources = server.resources or (profile.resources if profile else None)
    pier = settings.bridge_command

    bridge_env: list[dict[str, Any]] = [
        {"name": "PIER_SIDECAR_HOST", "value": "0.0.0.0"},
        {"name": "PIER_SIDECAR_PORT", "value": str(BRIDGE_PORT)},
        {"name": "PIER_SIDECAR_MAX_CONCURRENT_CALLS", "value": str(spec.max_concurrent_calls)},
        {"name": "HOME", "value": TMP_DIR},  # npx/uvx-style servers write caches under $HOME
    ]
    if settings.bridge_token_secret:
        bridge_env.append(
            {
                "name": "PIER_SIDECAR_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": settings.bridge_token_secret, "key": "token"}},
            }
        )
    mounts = [{"name": "tmp", "mountPath": TMP_DIR}]
    bridge: dict[str, Any] = {
        "name": "bridge",
        "image": settings.bridge_image,
        "ports": [{"name": "http", "containerPort": BRIDGE_PORT}],
        "readinessProbe": _probe("/readyz", 2, 3),
        "livenessProbe": _probe("/healthz", 10, 3),
        "securityContext": _hardened(),
        "volumeMounts": mounts,
    }
    containers = [bridge]
    init_containers: list[dict[str, Any]] = []
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    if image is None:
        # Child mode: the server is the bridge's child, in the bridge's image, with the server's env.
        bridge["command"] = [*pier, "sidecar", "--", *command]
        bridge["env"] = bridge_env + env
        bridge["envFrom"] = env_from
        bridge["resources"] = resources or _DEFAULT_BRIDGE_RESOURCES
    else:
        io_mount = {"name": "io", "mountPath": IO_DIR}
        volumes.append({"name": "io", "emptyDir": {}})
        init_containers.append(
            {
                "name": "prepare",
                "image": settings.bridge_image,
                "command": [*pier, "sidecar", "--prepare-attach", IO_DIR],
                "securityContext": _hardened(),
                "volumeMounts": [io_mount],
                "resources": _DEFAULT_BRIDGE_RESOURCES,
            }
        )
        bridge["command"] = [*pier, "sidecar", "--attach", IO_DIR]
        bridge["env"] = bridge_env
        bridge["resources"] = _DEFAULT_BRIDGE_RESOURCES
        bridge["volumeMounts"] = [*mounts, io_mount]
        containers.append(
            {
                "name": SERVER_CONTAINER,
                "image": image,
                # Only /bin/sh is assumed in the server's image: the wrapper wires it to the FIFOs.
                "command": ["/bin/sh", f"{IO_DIR}/fifo-wrapper.sh", IO_DIR, *command],
                "env": [*env, {"name": "HOME", "value": TMP_DIR}],
                "envFrom": env_from,
                "resources": resources or {},
                # Arbitrary server images often write outside /tmp: root FS stays writable there.
                "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                "volumeMounts": [io_mount, {"name": "tmp", "mountPath": TMP_DIR}],
            }
        )
    profile_name = server.profile or "inline"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(name, generation, replacement),
            "labels": {
                SESSION_LABEL: name,
                USER_LABEL: label_value(spec.user_id),
                PROFILE_LABEL: profile_name,
                "app.kubernetes.io/name": "pier-session",
                "app.kubernetes.io/managed-by": "pier-operator",
            },
            "annotations": {GENERATION_ANNOTATION: str(generation)},
            "ownerReferences": [
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": KIND,
                    "name": name,
                    "uid": uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "restartPolicy": "Always",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 30,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 10001,
                "runAsGroup": 10001,
                "fsGroup": 10001,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "initContainers": init_containers,
            "containers": containers,
            "volumes": volumes,
            **_placement(settings),
        },
    }


def _placement(settings: OperatorSettings) -> dict[str, Any]:
    """Where session pods run and what they pull with: the platform's choice, never the caller's."""
    placement: dict[str, Any] = {}
    if settings.image_pull_secrets:
        placement["imagePullSecrets"] = [{"name": name} for name in settings.image_pull_secrets]
    if settings.session_node_selector:
        placement["nodeSelector"] = settings.session_node_selector
    if settings.session_tolerations:
        placement["tolerations"] = settings.session_tolerations
    if settings.session_runtime_class:
        placement["runtimeClassName"] = settings.session_runtime_class
    return placement
