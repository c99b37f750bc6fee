"""The Pod that runs one MCPSession: a bridge container, and the server's own when it has an image;
and the pods of a warm pool, which are the same pods bound to no session yet."""

from __future__ import annotations

import posixpath
from typing import Any

from pier.core.catalog import Profile
from pier.core.mcpsession import (
    API_VERSION,
    CONNECTION_TOKEN_KEY,
    KIND,
    POOL_LABEL,
    PROFILE_LABEL,
    SESSION_LABEL,
    USER_LABEL,
    MCPSessionSpec,
    ServerSpec,
    connection_secret_name,
    label_value,
)
from pier.operator.config import OperatorSettings

BRIDGE_PORT = 8080
BRIDGE_CONTAINER = "bridge"
SERVER_CONTAINER = "server"  # attach mode: the server's own container
TOKEN_VOLUME = "pier-token"  # the user's upstream token, from their connection Secret
IO_DIR = "/pier/io"  # the emptyDir shared by the bridge and the server container (attach mode)
TMP_DIR = "/tmp"
GENERATION_ANNOTATION = "pier.dev/generation"
_DEFAULT_BRIDGE_RESOURCES = {"requests": {"cpu": "20m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}}


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
    token_env, token_mounts, token_volumes = _token(spec, profile)
    env += token_env

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
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}, *token_volumes]
    bridge: dict[str, Any] = {
        "name": BRIDGE_CONTAINER,
        "image": settings.bridge_image,
        "ports": [{"name": "http", "containerPort": BRIDGE_PORT}],
        "readinessProbe": _probe("/readyz", settings.session_readiness_period_s, 3),
        "livenessProbe": _probe("/healthz", settings.session_liveness_period_s, 3),
        "securityContext": _hardened(),
        "volumeMounts": mounts,
    }
    containers = [bridge]
    init_containers: list[dict[str, Any]] = []
    if image is None:
        # Child mode: the server is the bridge's child, in the bridge's image, with the server's env.
        bridge["command"] = [*pier, "sidecar", "--", *command]
        bridge["env"] = bridge_env + env
        bridge["envFrom"] = env_from
        bridge["resources"] = resources or _DEFAULT_BRIDGE_RESOURCES
        bridge["volumeMounts"] = [*mounts, *token_mounts]
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
                "volumeMounts": [io_mount, {"name": "tmp", "mountPath": TMP_DIR}, *token_mounts],
            }
        )
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(name, generation, replacement),
            "labels": session_labels(name, spec.user_id, server.profile or "inline"),
            "annotations": {GENERATION_ANNOTATION: str(generation)},
            "ownerReferences": [owner(name, uid)],
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


def _token(spec: MCPSessionSpec, profile: Profile | None) -> tuple[list[Any], list[Any], list[Any]]:
    """The user's upstream token for the server, from their connection Secret (written by the router): a
    variable and/or a file (the kubelet rewrites a mounted Secret's file in place when it changes). Only its
    `token` key reaches the pod, never the refresh token beside it."""
    delivery = profile.token_delivery if profile is not None else None
    if delivery is None or profile is None:
        return [], [], []
    secret = connection_secret_name(spec.user_id, profile.name)
    env, mounts, volumes = [], [], []
    if delivery.env is not None:
        ref = {"name": secret, "key": CONNECTION_TOKEN_KEY}
        env.append({"name": delivery.env, "valueFrom": {"secretKeyRef": ref}})
    if delivery.file is not None:
        directory, name = posixpath.split(delivery.file)
        items = [{"key": CONNECTION_TOKEN_KEY, "path": name}]
        volumes.append({"name": TOKEN_VOLUME, "secret": {"secretName": secret, "items": items, "defaultMode": 0o440}})
        mounts.append({"name": TOKEN_VOLUME, "mountPath": directory, "readOnly": True})
    return env, mounts, volumes


def session_labels(session: str, user: str, profile: str) -> dict[str, str]:
    return {
        SESSION_LABEL: session,
        USER_LABEL: label_value(user),
        PROFILE_LABEL: profile,
        "app.kubernetes.io/name": "pier-session",
        "app.kubernetes.io/managed-by": "pier-operator",
    }


def owner(session: str, uid: str) -> dict[str, Any]:
    """The MCPSession as its pod's owner: deleting the session deletes the pod."""
    return {"apiVersion": API_VERSION, "kind": KIND, "name": session, "uid": uid, "controller": True,
            "blockOwnerDeletion": True}  # fmt: skip


# -- warm pools ---------------------------------------------------------------------------------


def pooled_pod(profile: Profile, settings: OperatorSettings, suffix: str) -> dict[str, Any]:
    """A pod of `profile` bound to no session yet: a session's pod, but labelled for the pool."""
    spec = MCPSessionSpec(
        user_id="pool", server=ServerSpec(profile=profile.name), max_concurrent_calls=profile.max_concurrent_calls
    )
    pod = build_pod(f"pool-{profile.name}", "", 0, 0, spec, profile, settings)
    # Nobody waits for a pooled pod's start, its first user's call will: the bridge warms the server up.
    bridge = next(c for c in pod["spec"]["containers"] if c["name"] == BRIDGE_CONTAINER)
    bridge["env"].append({"name": "PIER_SIDECAR_WARM_UP", "value": "true"})
    pod["metadata"] = {
        "name": f"pool-{profile.name}-{suffix}",
        "labels": {
            POOL_LABEL: profile.name,
            PROFILE_LABEL: profile.name,
            "app.kubernetes.io/name": "pier-session",
            "app.kubernetes.io/managed-by": "pier-operator",
        },
    }
    return pod


def claim_patch(
    session: str, uid: str, generation: int, user: str, profile: str, resource_version: str
) -> dict[str, Any]:
    """The merge patch that binds a pooled pod to a session: its labels, owner and generation.

    `resourceVersion` makes it conditional: of two claims of one pod, the second fails (409).
    """
    labels: dict[str, str | None] = {**session_labels(session, user, profile), POOL_LABEL: None}
    return {
        "metadata": {
            "resourceVersion": resource_version,
            "labels": labels,
            "annotations": {GENERATION_ANNOTATION: str(generation)},
            "ownerReferences": [owner(session, uid)],
        }
    }


NODE_LOSS_TAINTS = ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")


def tolerations(settings: OperatorSettings) -> list[dict[str, Any]]:
    """The platform's tolerations, and a brief one of a lost node's taints (unless the platform set its own).

    Without them Kubernetes adds 300 s ones: a session on a dead node would wait five minutes for eviction.
    The operator usually replaces such a pod sooner (`node_lost_after_s`); this is the cluster's own backstop.
    """
    own = list(settings.session_tolerations)
    given = {t.get("key") for t in own if t.get("effect") in (None, "", "NoExecute")}
    for key in NODE_LOSS_TAINTS:
        if key not in given:
            own.append({"key": key, "operator": "Exists", "effect": "NoExecute",
                        "tolerationSeconds": settings.node_loss_toleration_s})  # fmt: skip
    return own


def _placement(settings: OperatorSettings) -> dict[str, Any]:
    """Where session pods run and what they pull with: the platform's choice, never the caller's."""
    placement: dict[str, Any] = {"tolerations": tolerations(settings)}
    if settings.image_pull_secrets:
        placement["imagePullSecrets"] = [{"name": name} for name in settings.image_pull_secrets]
    if settings.session_node_selector:
        placement["nodeSelector"] = settings.session_node_selector
    if settings.session_runtime_class:
        placement["runtimeClassName"] = settings.session_runtime_class
    if settings.session_priority_class:
        placement["priorityClassName"] = settings.session_priority_class
    return placement
