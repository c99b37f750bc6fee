"""Warm pools on Kubernetes: pods of a profile started before any user asks, bound to the first new
MCPSession of that profile instead of a pod being started for it.

`maintain` (every resync) keeps each pooled profile at its `warm_pool` size: pods labelled
`pier.dev/pool: <profile>`, owned by no session. Pods of profiles no longer pooled, surplus pods and
failed ones are deleted. `claim` binds a Ready pooled pod to a session with one conditional merge
patch (its labels, owner and generation; `resourceVersion` as the precondition), so two sessions
never get one pod, and starts its replacement at once. A pooled pod is a session's pod in every
other respect, so binding it needs no restart; sessions that differ from their profile (their own
command, environment, image, resources or concurrency) are never served from the pool.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from pier.core.catalog import Profile
from pier.core.mcpsession import POOL_LABEL, MCPSessionSpec
from pier.operator.pods import claim_patch, pooled_pod

log = logging.getLogger("pier.operator.pool")


def poolable(spec: MCPSessionSpec, profile: Profile | None) -> bool:
    """Whether a session is exactly its profile's, so a pooled pod of that profile can serve it."""
    server = spec.server
    return (
        profile is not None
        and profile.pooled
        and not (server.command or server.env or server.env_from or server.image or server.resources)
        and spec.max_concurrent_calls == profile.max_concurrent_calls
    )


def _ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or []))


def _usable(pod: Any) -> bool:
    return not pod.metadata.deletion_timestamp and pod.status.phase not in ("Failed", "Succeeded")


async def _pooled_pods(memo: kopf.Memo) -> list[Any]:
    listing = await asyncio.to_thread(memo.core.list_namespaced_pod, memo.settings.namespace, label_selector=POOL_LABEL)
    return list(listing.items)


async def maintain(memo: kopf.Memo) -> None:
    """Bring every pool to its size: create what is missing, delete what is surplus or broken."""
    # Under the claims' lock: a listing taken while a claim binds a pod and creates its replacement
    # would count both, and delete a ready pooled pod as surplus.
    async with memo.pool_lock:
        await _maintain(memo)


async def _maintain(memo: kopf.Memo) -> None:
    profiles = {p.name: p for p in memo.catalog.profiles.values() if p.pooled}
    by_profile: dict[str, list[Any]] = {name: [] for name in profiles}
    for pod in await _pooled_pods(memo):
        if pod.metadata.deletion_timestamp:
            continue  # going already
        name = str((pod.metadata.labels or {}).get(POOL_LABEL))
        if name not in profiles or not _usable(pod):
            await _delete(memo, pod)
            continue
        by_profile[name].append(pod)
    for name, profile in profiles.items():
        pods = sorted(by_profile[name], key=lambda pod: not _ready(pod))  # surplus: the least ready go
        for pod in pods[profile.warm_pool :]:
            await _delete(memo, pod)
        pods = pods[: profile.warm_pool]
        memo.pool_metrics.pooled(name, profile.warm_pool)
        memo.pool_metrics.ready.labels(name).set(sum(_ready(p) for p in pods))
        _observe_refills(memo, name, pods)
        for _ in range(profile.warm_pool - len(pods)):
            await _create(memo, profile)


async def claim(memo: kopf.Memo, session: dict[str, Any], spec: MCPSessionSpec, profile: Profile) -> Any | None:
    """Bind a Ready pooled pod of `profile` to `session`; the pod, or None when none was ready."""
    meta = session["metadata"]
    async with memo.pool_lock:  # one claim at a time in this operator; the precondition guards the rest
        for pod in await _pooled_pods(memo):
            labels = pod.metadata.labels or {}
            if labels.get(POOL_LABEL) != profile.name or not _usable(pod) or not _ready(pod):
                continue
            patch = claim_patch(
                meta["name"], meta["uid"], meta.get("generation", 1), spec.user_id, profile.name,
                pod.metadata.resource_version,
            )  # fmt: skip
            try:
                bound = await asyncio.to_thread(
                    memo.core.patch_namespaced_pod, pod.metadata.name, pod.metadata.namespace, patch
                )
            except ApiException as exc:
                if exc.status in (404, 409):  # gone, or changed meanwhile: try the next one
                    continue
                raise
            memo.pool_metrics.claims.labels(profile.name).inc()
            log.info("pooled pod claimed", extra={"session": meta["name"], "pod": pod.metadata.name})
            await _create(memo, profile)  # its replacement, at once
            return bound
    memo.pool_metrics.misses.labels(profile.name).inc()
    return None


async def _create(memo: kopf.Memo, profile: Profile) -> None:
    pod = pooled_pod(profile, memo.settings, secrets.token_hex(3))
    try:
        await asyncio.to_thread(memo.core.create_namespaced_pod, memo.settings.namespace, pod)
    except ApiException as exc:
        if exc.status != 409:  # a name taken by chance: the next resync tries again
            raise
    memo.pool_created[pod["metadata"]["name"]] = time.monotonic()


def _observe_refills(memo: kopf.Memo, profile: str, pods: list[Any]) -> None:
    """How long pooled pods took from creation to Ready (seen at the resync after they got there)."""
    for pod in pods:
        created = memo.pool_created.get(pod.metadata.name)
        if created is not None and _ready(pod):
            memo.pool_metrics.refill_seconds.labels(profile).observe(time.monotonic() - created)
            del memo.pool_created[pod.metadata.name]


async def _delete(memo: kopf.Memo, pod: Any) -> None:
    try:
        await asyncio.to_thread(memo.core.delete_namespaced_pod, pod.metadata.name, pod.metadata.namespace)
    except ApiException as exc:
        if exc.status != 404:
            raise
