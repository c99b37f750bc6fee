"""What the operator knows of the cluster: its MCPSessions, their pods (and the warm pools'), and the nodes,
each an `Informer` of slimmed objects, with the indexes the reconcile looks things up by.

Objects are kept as the API server sends them, less what no decision here reads: at 10,000 sessions the
sessions and their pods cost the operator tens of megabytes, not the hundreds their full bodies would.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from pier.core.kube import Informer, KubeClient, Obj
from pier.core.mcpsession import GROUP, PLURAL, POOL_LABEL, SESSION_LABEL, VERSION

MANAGED_BY = "app.kubernetes.io/managed-by=pier-operator"  # session pods and pooled pods alike
_POD_META = ("name", "namespace", "uid", "resourceVersion", "labels", "annotations", "deletionTimestamp",
             "creationTimestamp", "ownerReferences")  # fmt: skip
_POD_CONDITIONS = ("Ready", "PodScheduled")


_SESSION_META = ("name", "namespace", "uid", "generation", "resourceVersion", "deletionTimestamp", "creationTimestamp")


def slim_session(obj: Obj) -> Obj:
    meta = obj.get("metadata") or {}
    kept = {k: meta[k] for k in _SESSION_META if k in meta}
    # Pier's own (the trace of the request that created it: the first reconcile joins it).
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k.startswith("pier.dev/")}
    if annotations:
        kept["annotations"] = annotations
    return {
        "metadata": kept,
        "spec": obj.get("spec") or {},
        "status": obj.get("status") or {},
    }


def _container(status: dict[str, Any]) -> dict[str, Any]:
    waiting = (status.get("state") or {}).get("waiting")
    kept: dict[str, Any] = {k: status[k] for k in ("name", "restartCount", "ready") if k in status}
    if waiting:
        kept["state"] = {"waiting": {k: waiting[k] for k in ("reason", "message") if k in waiting}}
    return kept


def slim_pod(obj: Obj) -> Obj:
    meta, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
    annotations = meta.get("annotations") or {}
    kept_meta = {k: meta[k] for k in _POD_META if k in meta}
    kept_meta["annotations"] = {k: v for k, v in annotations.items() if k.startswith("pier.dev/")}
    return {
        "metadata": kept_meta,
        "spec": {"nodeName": spec.get("nodeName")} if spec.get("nodeName") else {},
        "status": {
            "phase": status.get("phase"),
            "podIP": status.get("podIP"),
            "conditions": [
                {k: c.get(k) for k in ("type", "status", "lastTransitionTime")}
                for c in status.get("conditions") or []
                if c.get("type") in _POD_CONDITIONS
            ],
            "containerStatuses": [_container(c) for c in status.get("containerStatuses") or []],
        },
    }


def slim_node(obj: Obj) -> Obj:
    meta, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
    return {
        "metadata": {k: meta[k] for k in ("name", "uid", "resourceVersion") if k in meta},
        "spec": {
            "taints": [{k: t.get(k) for k in ("key", "effect")} for t in spec.get("taints") or []],
            "unschedulable": bool(spec.get("unschedulable")),
        },
        "status": {"ready": {k: ready.get(k) for k in ("status", "lastTransitionTime")} if ready else None},
    }


def pod_ready(pod: Obj) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions") or [])


def node_not_ready_since(node: Obj) -> float | None:
    """When the node stopped being Ready (POSIX time), or None while it is Ready."""
    ready = node["status"].get("ready") or {}
    if ready.get("status") == "True":
        return None
    stamp = ready.get("lastTransitionTime")
    return dt.datetime.fromisoformat(stamp).timestamp() if stamp else 0.0


class Caches:
    """The three informers and the indexes over them (pods by session, by node and by warm pool)."""

    def __init__(self, client: KubeClient, namespace: str) -> None:
        self.sessions = Informer(
            client, f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}", transform=slim_session,
            name="mcpsessions",
        )  # fmt: skip
        self.pods = Informer(
            client, f"/api/v1/namespaces/{namespace}/pods", label_selector=MANAGED_BY, transform=slim_pod, name="pods"
        )
        self.nodes = Informer(client, "/api/v1/nodes", transform=slim_node, name="nodes")
        self.by_session: dict[str, set[str]] = {}
        self.by_node: dict[str, set[str]] = {}
        self.pooled: dict[str, set[str]] = {}  # profile → its warm pods
        self.pods.subscribe(self._index)

    @property
    def informers(self) -> tuple[Informer, Informer, Informer]:
        return self.sessions, self.pods, self.nodes

    def synced(self) -> bool:
        return all(informer.synced.is_set() for informer in self.informers)

    def pods_of(self, session: str) -> list[Obj]:
        return [self.pods.items[name] for name in self.by_session.get(session, ()) if name in self.pods.items]

    def sessions_on(self, node: str) -> set[str]:
        sessions = set()
        for name in self.by_node.get(node, ()):
            pod = self.pods.items.get(name)
            session = ((pod or {}).get("metadata", {}).get("labels") or {}).get(SESSION_LABEL)
            if session:
                sessions.add(session)
        return sessions

    def pool_pods(self, profile: str) -> list[Obj]:
        return [self.pods.items[name] for name in self.pooled.get(profile, ()) if name in self.pods.items]

    def _index(self, name: str, before: Obj | None, after: Obj | None) -> None:
        for pod, index in ((before, self._discard), (after, self._add)):
            if pod is not None:
                index(name, pod)

    def _keys(self, pod: Obj) -> list[tuple[dict[str, set[str]], str]]:
        labels = pod["metadata"].get("labels") or {}
        keys = []
        if labels.get(SESSION_LABEL):
            keys.append((self.by_session, labels[SESSION_LABEL]))
        if labels.get(POOL_LABEL):
            keys.append((self.pooled, labels[POOL_LABEL]))
        if pod["spec"].get("nodeName"):
            keys.append((self.by_node, pod["spec"]["nodeName"]))
        return keys

    def _discard(self, name: str, pod: Obj) -> None:
        for index, key in self._keys(pod):
            members = index.get(key)
            if members is not None:
                members.discard(name)
                if not members:
                    del index[key]

    def _add(self, name: str, pod: Obj) -> None:
        for index, key in self._keys(pod):
            index.setdefault(key, set()).add(name)


Listener = Callable[[str, Obj | None, Obj | None], None]
