"""Warm pools on Kubernetes: pods of a profile started before any user asks, bound to the first new
MCPSession of that profile instead of a pod being started for it.

`maintain` (every pass, from the pod cache) keeps each pooled profile at its `warm_pool` size: pods labelled
`pier.dev/pool: <profile>`, owned by no session. Pods of profiles no longer pooled, surplus pods and failed
ones are deleted. `claim` binds a Ready pooled pod to a session with one conditional merge patch (its
labels, owner and generation; `resourceVersion` as the precondition), so two sessions never get one pod,
and starts its replacement at once. A pooled pod is a session's pod in every other respect, so binding it
needs no restart; sessions that differ from their profile (their own command, environment, image,
resources or concurrency) are never served from the pool.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import TYPE_CHECKING, cast

from pier.core.catalog import Profile
from pier.core.kube import MERGE_PATCH, Obj
from pier.core.mcpsession import MCPSessionSpec
from pier.operator.cache import pod_ready
from pier.operator.pods import claim_patch, pooled_pod

if TYPE_CHECKING:
    from pier.operator.engine import Operator

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


def _usable(pod: Obj) -> bool:
    return not pod["metadata"].get("deletionTimestamp") and pod["status"].get("phase") not in ("Failed", "Succeeded")


class Pools:
    def __init__(self, operator: Operator) -> None:
        self.op = operator
        # Claims and upkeep one at a time: upkeep that counted a pod being claimed and its replacement would
        # delete a ready pooled pod as surplus.
        self.lock = asyncio.Lock()
        self.created: dict[str, float] = {}  # pooled pod → when it was created (for the refill time)

    async def maintain(self) -> None:
        """Bring every pool to its size: create what is missing, delete what is surplus or broken."""
        async with self.lock:
            await self._maintain()

    async def _maintain(self) -> None:
        op = self.op
        profiles = {p.name: p for p in op.catalog.profiles.values() if p.pooled}
        for name in set(op.caches.pooled) - set(profiles):  # pools nobody wants any more
            for pod in op.caches.pool_pods(name):
                if not pod["metadata"].get("deletionTimestamp"):
                    await op.delete_pod(pod["metadata"]["name"])
        for name, profile in profiles.items():
            pods = []
            for pod in op.caches.pool_pods(name):
                if pod["metadata"].get("deletionTimestamp"):
                    continue  # going already
                if not _usable(pod):
                    await op.delete_pod(pod["metadata"]["name"])
                else:
                    pods.append(pod)
            pods.sort(key=lambda pod: not pod_ready(pod))  # surplus: the least ready go
            for pod in pods[profile.warm_pool :]:
                await op.delete_pod(pod["metadata"]["name"])
            pods = pods[: profile.warm_pool]
            op.metrics.pools.pooled(name, profile.warm_pool)
            op.metrics.pools.ready.labels(name).set(sum(pod_ready(p) for p in pods))
            self._observe_refills(name, pods)
            for _ in range(profile.warm_pool - len(pods)):
                await self._create(profile)

    async def claim(self, session: Obj, spec: MCPSessionSpec, profile: Profile) -> Obj | None:
        """Bind a Ready pooled pod of `profile` to `session`; the pod, or None when none was ready."""
        op, meta = self.op, session["metadata"]
        async with self.lock:  # one claim at a time in this operator; the precondition guards the rest
            for pod in op.caches.pool_pods(profile.name):
                if not _usable(pod) or not pod_ready(pod):
                    continue
                patch = claim_patch(
                    meta["name"], meta["uid"], meta.get("generation", 1), spec.user_id, profile.name,
                    pod["metadata"]["resourceVersion"],
                )  # fmt: skip
                status, bound = await op.client.request(
                    "PATCH", f"{op.pods_path}/{pod['metadata']['name']}", patch, content_type=MERGE_PATCH
                )
                if status in (404, 409):  # gone, or changed meanwhile: try the next one
                    continue
                if status != 200:
                    log.warning(
                        "could not claim a pooled pod", extra={"status": status, "pod": pod["metadata"]["name"]}
                    )
                    continue
                op.caches.pods.put(bound)
                op.metrics.pools.claims.labels(profile.name).inc()
                log.info("pooled pod claimed", extra={"session": meta["name"], "pod": pod["metadata"]["name"]})
                await self._create(profile)  # its replacement, at once
                return cast(Obj, bound)
        op.metrics.pools.misses.labels(profile.name).inc()
        return None

    async def _create(self, profile: Profile) -> None:
        pod = pooled_pod(profile, self.op.settings, secrets.token_hex(3))
        status, answer = await self.op.client.request("POST", self.op.pods_path, pod)
        if status in (200, 201):
            self.op.caches.pods.put(answer)
            self.created[pod["metadata"]["name"]] = time.monotonic()
        elif status != 409:  # 409: a name taken by chance: the next pass tries again
            log.warning("could not create a pooled pod", extra={"status": status, "profile": profile.name})

    def _observe_refills(self, profile: str, pods: list[Obj]) -> None:
        """How long pooled pods took from creation to Ready (seen at the pass after they got there)."""
        for pod in pods:
            created = self.created.get(pod["metadata"]["name"])
            if created is not None and pod_ready(pod):
                self.op.metrics.pools.refill_seconds.labels(profile).observe(time.monotonic() - created)
                del self.created[pod["metadata"]["name"]]
        for name in [n for n in self.created if n not in self.op.caches.pods.items]:
            del self.created[name]  # deleted before it was ready
