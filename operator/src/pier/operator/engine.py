"""The operator at work: caches from watches, a queue of sessions to reconcile, workers, the periodic pass.

- **Caches** (`cache.Caches`): MCPSessions, the operator's pods and the nodes, each from one list and a
  watch. A change of a session, of one of its pods or of the node under them queues that session.
- **Workers** (`settings.workers` of them) take sessions off the queue, `plan` each from the caches and
  carry the plan out: the API is called only to change something, and every answer is written back to
  the cache at once, so the next plan sees what this one did (deterministic pod names make a repeated
  create a harmless 409, never a second pod). A failed reconcile comes back after a growing delay.
- **The pass** (every `sync_interval_s`) plans every cached session without an API call and queues the
  ones with something to do (a backoff or a node's grace run out, a TTL reached); it keeps the warm pools.
- **Bridges** (`bridges.BridgeMonitor`) are asked for their status when it matters, a bounded number at
  once; each answer queues its session.
- **Leadership** (`leader.LeaderElection`): only the replica holding the Lease works; the others keep
  their caches warm and take over when it goes.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import datetime as dt
import logging
import os
import socket
import time
from typing import Any

import aiohttp

from pier.core import tracing
from pier.core.catalog import Catalog
from pier.core.errors import PierError
from pier.core.kube import MERGE_PATCH, ApiError, KubeClient, Obj
from pier.core.mcpsession import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    SESSION_LABEL,
    TRACE_ANNOTATION,
    VERSION,
    MCPSessionSpec,
    MCPSessionStatus,
)
from pier.operator.bridges import BridgeMonitor, Known
from pier.operator.cache import Caches
from pier.operator.config import OperatorSettings
from pier.operator.leader import LeaderElection
from pier.operator.metrics import POD_PHASES, SESSION_PHASES, OperatorMetrics
from pier.operator.plan import Event, Parsed, Plan, conditions, plan
from pier.operator.pods import build_pod
from pier.operator.pool import Pools
from pier.operator.queue import WorkQueue

log = logging.getLogger("pier.operator")

_YIELD_EVERY = 500  # the pass lets the loop breathe (watch events, probes) every so many sessions


def _stamp(now: float) -> str:
    return dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Operator:
    """One operator process: `start()`, then `stop()`."""

    def __init__(
        self, settings: OperatorSettings, http: aiohttp.ClientSession, client: KubeClient, catalog: Catalog,
        metrics: OperatorMetrics,
    ) -> None:  # fmt: skip
        self.settings, self.http, self.client, self.catalog, self.metrics = settings, http, client, catalog, metrics
        ns = settings.namespace
        self.pods_path = f"/api/v1/namespaces/{ns}/pods"
        self.sessions_path = f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}"
        self.events_path = f"/api/v1/namespaces/{ns}/events"
        self.caches = Caches(client, ns)
        self.queue = WorkQueue()
        self.pools = Pools(self)
        self.bridge_token: str | None = None
        self.monitor = BridgeMonitor(
            http, None, settings.bridge_poll_concurrency, settings.bridge_refresh_s, self.queue.add,
            lambda outcome: metrics.bridge_asks.labels(outcome).inc(),
        )  # fmt: skip
        identity = settings.identity or f"{socket.gethostname()}-{os.getpid()}"
        self.election = LeaderElection(
            client, ns, settings.lease_name, identity, settings.lease_duration_s, self._leadership
        )
        self.now = time.time()
        self._parsed: dict[str, tuple[tuple[str, int], Parsed]] = {}
        self._status: dict[str, tuple[str, MCPSessionStatus]] = {}
        self._synced = asyncio.Event()
        self._wake_pass = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.caches.sessions.subscribe(self._session_changed)
        self.caches.pods.subscribe(self._pod_changed)
        self.caches.nodes.subscribe(self._node_changed)

    # -- life ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self.settings.bridge_token_secret:
            secret = await self.client.checked("GET", f"/api/v1/namespaces/{self.settings.namespace}/secrets/"
                                               f"{self.settings.bridge_token_secret}")  # fmt: skip
            self.bridge_token = base64.b64decode((secret.get("data") or {})["token"]).decode()
            self.monitor.token = self.bridge_token
        jobs: list[tuple[str, Any]] = [(f"pier-watch-{i.name}", i.run()) for i in self.caches.informers]
        jobs += [("pier-synced", self._wait_synced()), ("pier-leader", self.election.elect()),
                 ("pier-bridges", self.monitor.run()), ("pier-pass", self._passes())]  # fmt: skip
        jobs += [(f"pier-worker-{i}", self._work()) for i in range(self.settings.workers)]
        self._tasks = [asyncio.create_task(job, name=name) for name, job in jobs]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.queue.close()

    def health(self) -> dict[str, Any]:
        """For the liveness probe: raises if a part of the operator has died."""
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise RuntimeError(f"{task.get_name()} died: {task.exception()!r}")
        return {"leading": self.election.leading.is_set(), "synced": self._synced.is_set(), "queued": len(self.queue)}

    async def _wait_synced(self) -> None:
        await asyncio.gather(*(informer.synced.wait() for informer in self.caches.informers))
        log.info(
            "caches filled", extra={"sessions": len(self.caches.sessions.items), "pods": len(self.caches.pods.items)}
        )
        self._synced.set()
        self._wake_pass.set()

    def _leadership(self, leading: bool) -> None:
        self.metrics.leading.set(int(leading))
        if leading:
            self._wake_pass.set()  # a new leader looks at everything at once

    # -- what the plans read (plan.World) ---------------------------------------------------------------

    def node(self, name: str) -> Obj | None:
        return self.caches.nodes.get(name)

    def nodes_synced(self) -> bool:
        return self.caches.nodes.synced.is_set()

    def bridge(self, session: str) -> Known | None:
        return self.monitor.known.get(session)

    # -- cache events ---------------------------------------------------------------------------------

    def _session_changed(self, name: str, before: Obj | None, after: Obj | None) -> None:
        if after is None:
            self.monitor.forget(name)
            self._parsed.pop(name, None)
            self._status.pop(name, None)
        else:
            self.queue.add(name)

    def _pod_changed(self, name: str, before: Obj | None, after: Obj | None) -> None:
        for pod in (before, after):
            session = ((pod or {}).get("metadata", {}).get("labels") or {}).get(SESSION_LABEL)
            if session and session in self.caches.sessions.items:
                self.queue.add(session)

    def _node_changed(self, name: str, before: Obj | None, after: Obj | None) -> None:
        if (before or {}).get("status") != (after or {}).get("status") or after is None:
            for session in self.caches.sessions_on(name):
                self.queue.add(session)

    # -- planning ---------------------------------------------------------------------------------------

    def parse(self, name: str, session: Obj) -> Parsed:
        """The session's spec and profile (parsed once per generation)."""
        meta = session["metadata"]
        key = (str(meta.get("uid")), int(meta.get("generation") or 1))
        cached = self._parsed.get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            spec = MCPSessionSpec.model_validate(session.get("spec") or {})
            profile = self.catalog.get(spec.server.profile) if spec.server.profile else None
            parsed = Parsed(spec, profile)
        except PierError as exc:  # an unknown profile
            parsed = Parsed(error=exc.message)
        except ValueError as exc:  # a spec the CRD's schema let through but the model refuses
            parsed = Parsed(error=str(exc))
        self._parsed[name] = (key, parsed)
        return parsed

    def status_of(self, name: str, session: Obj) -> MCPSessionStatus:
        version = str(session["metadata"].get("resourceVersion"))
        cached = self._status.get(name)
        if cached is not None and cached[0] == version:
            return cached[1]
        try:
            status = MCPSessionStatus.model_validate(session.get("status") or {})
        except ValueError:  # written by someone else, wrongly: start from nothing
            status = MCPSessionStatus()
        self._status[name] = (version, status)
        return status

    def plan(self, name: str, session: Obj) -> Plan:
        return plan(name, session, self.parse(name, session), self.status_of(name, session),
                    self.caches.pods_of(name), self)  # fmt: skip

    def _follow_up(self, name: str, planned: Plan) -> None:
        """What a plan asks of the bridge monitor and the queue (no API call)."""
        if planned.track is not None:
            self.monitor.track(name, *planned.track)
        elif name in self.monitor.known:
            self.monitor.forget(name)
        if planned.ask_bridge:
            self.monitor.ask_now(name)
        if planned.look_again_s is not None:
            self.queue.add_after(name, planned.look_again_s + 0.1)

    # -- the pass -----------------------------------------------------------------------------------------

    async def _passes(self) -> None:
        while True:
            await self.election.leading.wait()
            await self._synced.wait()
            try:
                await self.run_pass()
            except Exception:  # the pass must go on: a bug here is logged, the next pass tries again
                log.exception("pass failed")
            self._wake_pass.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake_pass.wait(), self.settings.sync_interval_s)

    async def run_pass(self) -> int:
        """Plan every cached session; queue those with something to do; keep the pools. Returns how many
        were queued. No API call but the pools' own."""
        started = time.perf_counter()
        self.now = time.time()
        queued = 0
        phases: collections.Counter[str] = collections.Counter()
        for i, (name, session) in enumerate(list(self.caches.sessions.items.items())):
            if i % _YIELD_EVERY == _YIELD_EVERY - 1:
                await asyncio.sleep(0)
                self.now = time.time()
            phases[str((session.get("status") or {}).get("phase") or "Pending")] += 1
            if name in self.queue or session["metadata"].get("deletionTimestamp"):
                continue
            planned = self.plan(name, session)
            self._follow_up(name, planned)
            if planned.acts or planned.claim:
                self.queue.add(name)
                queued += 1
        for name in set(self.monitor.known) - set(self.caches.sessions.items):
            self.monitor.forget(name)
        self.metrics.pass_seconds.observe(time.perf_counter() - started)
        self.metrics.pass_queued.inc(queued)
        for phase in SESSION_PHASES:
            self.metrics.sessions.labels(phase).set(phases[phase])
        pods = collections.Counter(
            str((pod.get("status") or {}).get("phase") or "Unknown")
            for pod in self.caches.pods.items.values()
            if not pod["metadata"].get("deletionTimestamp")
        )
        for phase in {*POD_PHASES, *pods}:
            self.metrics.pods.labels(phase).set(pods[phase])
        for informer in self.caches.informers:
            self.metrics.cached.labels(informer.name).set(len(informer.items))
            self.metrics.relists.labels(informer.name).set(informer.relists)
        self.metrics.queue_depth.set(len(self.queue))
        await self.pools.maintain()
        return queued

    # -- the workers -------------------------------------------------------------------------------------

    async def _work(self) -> None:
        await self._synced.wait()
        while True:
            await self.election.leading.wait()
            name = await self.queue.get()
            if not self.election.leading.is_set():  # lost it while waiting: whoever leads now does this
                self.queue.done(name)
                self.queue.add(name)
                continue
            started = time.perf_counter()
            try:
                await self.reconcile(name)
            except (ApiError, aiohttp.ClientError, TimeoutError) as exc:
                delay = self.queue.retry(name)
                self.metrics.reconciles.labels("error").inc()
                log.warning(
                    "reconcile failed; again later", extra={"session": name, "error": str(exc), "delay_s": delay}
                )
            except Exception:
                self.queue.retry(name)
                self.metrics.reconciles.labels("error").inc()
                log.exception("reconcile failed", extra={"session": name})
            else:
                self.queue.succeeded(name)
                self.metrics.reconciles.labels("ok").inc()
            finally:
                self.metrics.reconcile_duration.observe(time.perf_counter() - started)
                self.queue.done(name)
                self.metrics.queue_depth.set(len(self.queue))

    async def reconcile(self, name: str) -> None:
        """Make the world match session `name` (from the caches; the API only for what must change)."""
        session = self.caches.sessions.get(name)
        if session is None or session["metadata"].get("deletionTimestamp"):
            self.monitor.forget(name)
            return
        self.now = time.time()
        planned = self.plan(name, session)
        with _reconcile_span(session, planned.old) as span:
            await self._carry_out(name, session, planned)
            span.set("pier.mcpsession.phase", planned.status.phase or "")

    async def _carry_out(self, name: str, session: Obj, planned: Plan) -> None:
        spec, profile = planned.parsed.spec, planned.parsed.profile
        if planned.claim and spec is not None and profile is not None:
            pod = await self.pools.claim(session, spec, profile)
            if pod is not None:
                tracing.add_event("warm pod claimed", {"k8s.pod.name": pod["metadata"]["name"]})
                await self.event(session, Event("Claimed", f"pod {pod['metadata']['name']} from the warm pool"))
                planned = self.plan(name, session)  # now with its pod
        for deletion in planned.deletions:
            await self.delete_pod(deletion.pod)
            self.metrics.replaced.labels(deletion.event.reason).inc()
            await self.event(session, deletion.event)
        if planned.create:
            await self._create_pod(session, planned)
        for event in planned.events:
            await self.event(session, event)
        await self._write_status(session, planned)
        self._follow_up(name, planned)
        if planned.reap:
            await self._reap(session, planned.reap)

    # -- the API ---------------------------------------------------------------------------------------

    async def _create_pod(self, session: Obj, planned: Plan) -> None:
        meta, status, parsed = session["metadata"], planned.status, planned.parsed
        assert parsed.spec is not None
        pod = build_pod(meta["name"], meta["uid"], meta.get("generation", 1), status.replacements or 0, parsed.spec,
                        parsed.profile, self.settings)  # fmt: skip
        attributes = {"k8s.namespace.name": meta["namespace"], "k8s.pod.name": pod["metadata"]["name"]}
        with tracing.span("Pod create", "client", attributes):
            code, answer = await self.client.request("POST", self.pods_path, pod)
        if code in (200, 201):
            self.caches.pods.put(answer)
        elif code in (400, 422):  # the spec makes a pod the API server refuses: no use trying again
            reason = str((answer or {}).get("message") if isinstance(answer, dict) else answer)[:800]
            planned.events[:] = [Event("PodInvalid", reason, "Warning")]
            status.phase, status.pod_name, status.endpoint = "Failed", planned.old.pod_name, None
            status.conditions = conditions(planned.old, False, "PodInvalid", reason, False, self.now)
        elif code != 409:  # 409: it exists (our cache has not seen it yet): the watch brings it
            raise ApiError(code, f"creating pod {pod['metadata']['name']}: HTTP {code}", answer)

    async def delete_pod(self, name: str) -> None:
        code, answer = await self.client.request("DELETE", f"{self.pods_path}/{name}")
        if code in (200, 202):
            if isinstance(answer, dict) and answer.get("kind") == "Pod":
                self.caches.pods.put(answer)  # it carries its deletionTimestamp now
        elif code != 404:
            raise ApiError(code, f"deleting pod {name}: HTTP {code}", answer)

    async def _write_status(self, session: Obj, planned: Plan) -> None:
        changes = planned.changes()
        if not changes:
            return  # nothing changed → no API write
        name = session["metadata"]["name"]
        code, answer = await self.client.request(
            "PATCH", f"{self.sessions_path}/{name}/status", {"status": changes}, content_type=MERGE_PATCH
        )
        if code == 200:
            self.caches.sessions.put(answer)
        elif code != 404:
            raise ApiError(code, f"writing the status of {name}: HTTP {code}", answer)

    async def _reap(self, session: Obj, why: str) -> None:
        name = session["metadata"]["name"]
        await self.event(session, Event("Reaped", why))
        code, answer = await self.client.request("DELETE", f"{self.sessions_path}/{name}")
        if code in (200, 202):
            self.metrics.reaped.inc()
            log.info("idle session reaped", extra={"session": name, "reason": why})
        elif code != 404:
            raise ApiError(code, f"deleting MCPSession {name}: HTTP {code}", answer)

    async def event(self, session: Obj, event: Event) -> None:
        """A Kubernetes Event on the session (`kubectl describe mcps` shows them); a failure is only logged."""
        meta = session["metadata"]
        now = _stamp(time.time())
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": self.settings.namespace},
            "involvedObject": {"apiVersion": API_VERSION, "kind": KIND, "name": meta["name"],
                               "namespace": self.settings.namespace, "uid": meta.get("uid")},
            "reason": event.reason, "message": event.message[:1000], "type": event.kind,
            "firstTimestamp": now, "lastTimestamp": now, "count": 1, "source": {"component": "pier-operator"},
        }  # fmt: skip
        try:
            code, answer = await self.client.request("POST", self.events_path, body)
        except ApiError as exc:
            code, answer = 0, exc.message
        if code not in (200, 201):
            log.warning(
                "could not post an Event", extra={"reason": event.reason, "status": code, "error": str(answer)[:200]}
            )


def _reconcile_span(session: Obj, old: MCPSessionStatus) -> tracing.Scope:
    """A span for a reconcile of a session not Ready yet: its first start under the span of the request
    that created it (the annotation the router wrote), later ones linked to it. A Ready session's
    reconciles are left out (thousands, for nothing a caller waits on)."""
    if old.phase == "Ready":
        return tracing.nothing()
    meta = session["metadata"]
    created_by = tracing.parse((meta.get("annotations") or {}).get(TRACE_ANNOTATION))
    first = not old.replacements
    attributes = {"k8s.namespace.name": meta["namespace"], "pier.mcpsession": meta["name"]}
    return tracing.span(
        "reconcile MCPSession", attributes=attributes, parent=created_by if first else tracing.ROOT,
        links=[] if first else [created_by],
    )  # fmt: skip
