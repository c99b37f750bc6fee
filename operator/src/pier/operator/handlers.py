"""kopf handlers for MCPSession: small functions around one level-triggered `reconcile`.

Every trigger (create, resume, spec update, a change of one of its pods, the periodic resync)
runs the same reconcile, which compares what exists with what should and fixes the difference:
a pod for the current generation (old generations deleted: a spec change replaces the pod), a
failed or vanished pod replaced with bounded backoff, the status kept true, Kubernetes Events on
transitions, and idle sessions deleted after their TTL (activity comes from the bridge's
/v1/status, so no API write happens per call, and a long call in flight is activity).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import logging
import random
import time
from typing import Any

import aiohttp
import kopf
from aiohttp import web
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import ValidationError

from pier.core import tracing
from pier.core.callapi import BridgeStatus, Endpoint, HttpBridge
from pier.core.catalog import Catalog, Profile
from pier.core.errors import PierError
from pier.core.mcpsession import (
    GROUP,
    PLURAL,
    SESSION_LABEL,
    TRACE_ANNOTATION,
    VERSION,
    Condition,
    MCPSessionSpec,
    MCPSessionStatus,
    ServerInfo,
    parse_stamp,
    stamp,
    status_patch,
)  # fmt: skip
from pier.core.web import tcp_site
from pier.operator import pool
from pier.operator.config import OperatorSettings
from pier.operator.metrics import OperatorMetrics
from pier.operator.pods import BRIDGE_PORT, GENERATION_ANNOTATION, SERVER_CONTAINER, build_pod

log = logging.getLogger("pier.operator")
MANAGED_BY = "app.kubernetes.io/managed-by=pier-operator"  # every pod it makes, sessions' and pooled


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Replicas get distinct priorities: the highest works, the others stand by (kopf peering). The
    # newest start wins, so a restarted operator never waits out a departed peer's record, and a
    # rolling update hands over at once; centiseconds (plus a random tie-break) keep replicas apart.
    settings.peering.priority = int(time.time() * 100) * 100 + random.randint(0, 99)  # < 2**53: exact in JSON
    settings.peering.name = "pier"
    settings.posting.enabled = False  # the handlers post their own Events (see `_event`)
    settings.watching.server_timeout = 300
    ours = OperatorSettings()
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    memo.settings = ours
    memo.core = client.CoreV1Api()
    memo.custom = client.CustomObjectsApi()
    memo.catalog = Catalog.load(ours.profiles, ours.profiles_inline)
    memo.http = aiohttp.ClientSession()
    memo.bridge_token = await asyncio.to_thread(_bridge_token, memo.core, ours)
    await asyncio.to_thread(_ensure_peering, memo.custom, ours.namespace)
    memo.metrics = OperatorMetrics()
    memo.pool_metrics = memo.metrics.pool
    memo.pool_lock = asyncio.Lock()
    memo.pool_created = {}  # pooled pod name → when it was created (for the refill time)
    host = memo.get("listen_host", "0.0.0.0")
    memo.metrics_runner = await _serve_metrics(memo.metrics.registry, host, ours.metrics_port)
    memo.resync = asyncio.create_task(resync_forever(memo), name="pier-resync")


async def _serve_metrics(registry: CollectorRegistry, host: str, port: int) -> web.AppRunner | None:
    """`/metrics` of the operator (reconciles, sessions and pods, warm pools), beside kopf's liveness
    endpoint; port 0: none."""
    if not port:
        return None

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, shutdown_timeout=5)  # a scrape in flight must not hold up the operator's exit
    await runner.setup()
    await tcp_site(runner, host, port).start()
    return runner


def _ensure_peering(custom: client.CustomObjectsApi, namespace: str) -> None:
    """The KopfPeering object replicas meet in (created here: a CRD and its object cannot share one apply)."""
    body = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "pier", "namespace": namespace}}
    try:
        custom.create_namespaced_custom_object("kopf.dev", "v1", namespace, "kopfpeerings", body)
    except ApiException as exc:
        if exc.status != 409:
            raise


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    memo.resync.cancel()
    await asyncio.gather(memo.resync, return_exceptions=True)
    if memo.metrics_runner is not None:
        await memo.metrics_runner.cleanup()
    await memo.http.close()


def _bridge_token(core: client.CoreV1Api, settings: OperatorSettings) -> str | None:
    if not settings.bridge_token_secret:
        return None
    secret = core.read_namespaced_secret(settings.bridge_token_secret, settings.namespace)
    return base64.b64decode((secret.data or {})["token"]).decode()


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
async def session_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await reconcile(dict(body), memo)


@kopf.on.event("", "v1", "pods", labels={SESSION_LABEL: kopf.PRESENT})
async def pod_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    name, namespace = body["metadata"]["labels"][SESSION_LABEL], body["metadata"]["namespace"]
    try:
        session = await asyncio.to_thread(
            memo.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name
        )
    except ApiException as exc:
        if exc.status == 404:
            return  # the session is gone; its pods go with it (owner references)
        raise
    await reconcile(session, memo)


async def resync_forever(memo: kopf.Memo) -> None:
    """Every `sync_interval_s`: reconcile every session and reap the idle ones.

    A plain background task rather than a kopf timer: timers make kopf put a finalizer on every
    object, and nothing here needs one (pods go with their owner by garbage collection).
    """
    settings: OperatorSettings = memo.settings
    while True:
        await asyncio.sleep(settings.sync_interval_s)
        try:
            listing = await asyncio.to_thread(
                memo.custom.list_namespaced_custom_object, GROUP, VERSION, settings.namespace, PLURAL
            )
        except ApiException as exc:
            log.warning("cannot list MCPSessions", extra={"error": str(exc)})
            continue
        phases = []
        for session in listing["items"]:
            try:
                status = await reconcile(session, memo)
                await reap_if_idle(session, status, memo)
                phases.append(status.phase)
            except Exception:  # one session's trouble must not stop the others, nor the loop
                log.exception("resync failed", extra={"session": session["metadata"]["name"]})
                phases.append(_read_status(session).phase)
        memo.metrics.count_sessions(phases)
        await _count_pods(memo)
        try:
            await pool.maintain(memo)
        except Exception:  # the pools are a convenience: their trouble must not stop the loop
            log.exception("warm pools not maintained")


async def _count_pods(memo: kopf.Memo) -> None:
    """The operator's pods by phase (one listing per resync)."""
    try:
        pods = await asyncio.to_thread(
            memo.core.list_namespaced_pod, memo.settings.namespace, label_selector=MANAGED_BY
        )
    except ApiException as exc:
        log.warning("cannot list pods", extra={"error": str(exc)})
        return
    memo.metrics.count_pods(pod.status.phase for pod in pods.items if not pod.metadata.deletion_timestamp)


async def reconcile(session: dict[str, Any], memo: kopf.Memo) -> MCPSessionStatus:
    """Make the world match the session; returns the status written. Counted and timed; a session not
    Ready yet is traced (its first start in the trace of the request that created it)."""
    metrics: OperatorMetrics = memo.metrics
    started = time.monotonic()
    with _reconcile_span(session) as span:
        try:
            status = await _reconcile(session, memo)
        except Exception:
            metrics.reconciles.labels("error").inc()
            raise
        finally:
            metrics.reconcile_duration.observe(time.monotonic() - started)
        metrics.reconciles.labels("ok").inc()
        span.set("pier.mcpsession.phase", status.phase or "")
        return status


def _reconcile_span(session: dict[str, Any]) -> tracing.Scope:
    """A span for a reconcile with something to do: a session's start (its first one under the creating
    request's span, from the annotation the router wrote; later ones linked to it). A Ready session's
    periodic reconcile is left out (thousands every few seconds)."""
    old = _read_status(session)
    if old.phase == "Ready" or session["metadata"].get("deletionTimestamp"):
        return tracing.nothing()
    meta = session["metadata"]
    created_by = tracing.parse((meta.get("annotations") or {}).get(TRACE_ANNOTATION))
    first = not old.replacements
    attributes = {"k8s.namespace.name": meta["namespace"], "pier.mcpsession": meta["name"]}
    return tracing.span(
        "reconcile MCPSession", attributes=attributes, parent=created_by if first else tracing.ROOT,
        links=[] if first else [created_by],
    )  # fmt: skip


async def _reconcile(session: dict[str, Any], memo: kopf.Memo) -> MCPSessionStatus:
    meta = session["metadata"]
    name, namespace, generation = meta["name"], meta["namespace"], meta.get("generation", 1)
    old = _read_status(session)
    if meta.get("deletionTimestamp"):
        return old
    status = old.model_copy(update={"observed_generation": generation})
    try:
        spec = MCPSessionSpec.model_validate(session["spec"])
        profile = memo.catalog.get(spec.server.profile) if spec.server.profile else None
    except (ValidationError, PierError) as exc:  # an unknown profile, or a spec the schema let through
        status.phase = "Failed"
        status.conditions = _conditions(old, False, "InvalidSpec", str(exc), False)
        await _write_status(session, old, status, memo)
        return status

    pods = await asyncio.to_thread(memo.core.list_namespaced_pod, namespace, label_selector=f"{SESSION_LABEL}={name}")
    current = None
    for pod in pods.items:
        annotations = pod.metadata.annotations or {}
        if pod.metadata.deletion_timestamp:
            continue
        if annotations.get(GENERATION_ANNOTATION) != str(generation):
            await _delete_pod(memo, pod, session, "Replaced", "spec changed: replacing the pod")
        elif pod.status.phase in ("Failed", "Succeeded"):
            await _delete_pod(memo, pod, session, "PodFailed", f"pod {pod.metadata.name} {pod.status.phase}")
        else:
            current = pod

    if current is None and status.pod_name is None and profile is not None and pool.poolable(spec, profile):
        current = await pool.claim(memo, session, spec, profile)  # a first pod: a warm one, if one is ready
        if current is not None:
            tracing.add_event("warm pod claimed", {"k8s.pod.name": current.metadata.name})
            await _event(memo, session, "Claimed", f"pod {current.metadata.name} from the warm pool")
    if current is None:
        await _start_pod(session, spec, profile, status, memo)
    else:
        await _observe_pod(current, status, old, session, memo)
    await _write_status(session, old, status, memo)
    return status


def _read_status(session: dict[str, Any]) -> MCPSessionStatus:
    try:
        return MCPSessionStatus.model_validate(session.get("status") or {})
    except ValidationError:  # written by someone else, wrongly: start from nothing
        return MCPSessionStatus()


async def _start_pod(
    session: dict[str, Any], spec: MCPSessionSpec, profile: Profile | None, status: MCPSessionStatus, memo: kopf.Memo
) -> None:
    meta = session["metadata"]
    replacements = status.replacements or 0
    settings: OperatorSettings = memo.settings
    if status.pod_name:
        # A pod existed: this is a replacement, which waits out a bounded, growing backoff.
        backoff = min(settings.replace_backoff_s * 2**replacements, settings.replace_backoff_max_s)
        last = status.last_replace_time
        if last and (_now() - parse_stamp(last)).total_seconds() < backoff:
            return
        replacements += 1
    pod = build_pod(meta["name"], meta["uid"], meta.get("generation", 1), replacements, spec, profile, settings)
    attributes = {"k8s.namespace.name": meta["namespace"], "k8s.pod.name": pod["metadata"]["name"]}
    with tracing.span("Pod create", "client", attributes):
        try:
            await asyncio.to_thread(memo.core.create_namespaced_pod, meta["namespace"], pod)
        except ApiException as exc:
            if exc.status != 409:  # someone (another trigger) created it just now
                raise
    reason = "Replaced" if replacements else "Started"
    await _event(memo, session, reason, f"pod {pod['metadata']['name']} created")
    status.phase = "Starting"
    status.pod_name = pod["metadata"]["name"]
    status.endpoint = None
    status.replacements = replacements
    status.last_replace_time = stamp(_now())
    status.conditions = _conditions(status, False, "PodCreated", "waiting for the bridge to be ready", False)


async def _observe_pod(
    pod: Any, status: MCPSessionStatus, old: MCPSessionStatus, session: dict[str, Any], memo: kopf.Memo
) -> None:
    ready = any(c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or []))
    # The bridge counts every exit of its server, the server container's in attach mode too (it reattaches):
    # adding the kubelet's restart count of that container would count each of its crashes twice.
    statuses = pod.status.container_statuses or []
    restarts = sum(cs.restart_count for cs in statuses if cs.name != SERVER_CONTAINER)
    endpoint = f"http://{pod.status.pod_ip}:{BRIDGE_PORT}" if pod.status.pod_ip else None
    status.pod_name = pod.metadata.name
    status.endpoint = endpoint if ready else None
    bridge = await _bridge_status(memo, endpoint) if ready and endpoint else None
    if bridge is not None:
        info = bridge.server_info or {}
        # Empty values are left out: the kubernetes client sends "" as null, which the schema refuses.
        status.server_info = ServerInfo(
            name=info.get("name") or None, version=info.get("version") or None,
            protocol_version=bridge.protocol_version or None,
        )  # fmt: skip
        status.tools = bridge.tools
        restarts += bridge.restarts
        if bridge.last_activity:
            status.last_activity_time = stamp(dt.datetime.fromtimestamp(bridge.last_activity, dt.UTC))
    status.restarts = restarts
    if restarts > (old.restarts or 0):
        await _event(memo, session, "ServerCrashed", f"the server restarted ({restarts} restarts so far)", "Warning")
    status.phase = "Ready" if ready else "Starting"
    if ready and old.phase != "Ready":
        await _event(memo, session, "Ready", f"serving at {endpoint}")
    reason, message = ("BridgeReady", "the bridge answers /readyz") if ready else _why_not_ready(pod)
    status.conditions = _conditions(old, ready, reason, message, bridge is not None or ready)


def _why_not_ready(pod: Any) -> tuple[str, str]:
    for cs in pod.status.container_statuses or []:
        waiting = cs.state.waiting if cs.state else None
        if waiting is not None and waiting.reason:
            return waiting.reason, f"{cs.name}: {waiting.message or waiting.reason}"
    return "Starting", f"pod {pod.metadata.name} is {pod.status.phase}"


def _conditions(old: MCPSessionStatus, ready: bool, reason: str, message: str, running: bool) -> list[Condition]:
    previous: dict[str, Condition] = {c.type: c for c in old.conditions or []}
    result = []
    for kind, value in (("Ready", ready), ("ServerRunning", running)):
        state = "True" if value else "False"
        before = previous.get(kind)
        since = before.last_transition_time if before is not None and before.status == state else stamp(_now())
        result.append(
            Condition.model_validate(
                {
                    "type": kind,
                    "status": state,
                    "reason": reason,
                    "message": message[:1000],
                    "lastTransitionTime": since,
                }
            )
        )
    return result


async def _event(memo: kopf.Memo, session: dict[str, Any], reason: str, message: str, kind: str = "Normal") -> None:
    """A Kubernetes Event on the session (`kubectl describe mcps` shows them)."""
    meta = session["metadata"]
    now = _now()
    event = client.CoreV1Event(
        metadata=client.V1ObjectMeta(generate_name=f"{meta['name']}.", namespace=meta["namespace"]),
        involved_object=client.V1ObjectReference(
            api_version=f"{GROUP}/{VERSION}", kind="MCPSession", name=meta["name"],
            namespace=meta["namespace"], uid=meta["uid"],
        ),
        reason=reason, message=message[:1000], type=kind, first_timestamp=now, last_timestamp=now, count=1,
        source=client.V1EventSource(component="pier-operator"),
    )  # fmt: skip
    try:
        await asyncio.to_thread(memo.core.create_namespaced_event, meta["namespace"], event)
    except ApiException as exc:  # an Event is worth a log line, not a failed reconcile
        log.warning("could not post an Event", extra={"reason": reason, "error": str(exc)})


async def _bridge_status(memo: kopf.Memo, endpoint: str) -> BridgeStatus | None:
    bridge = HttpBridge(memo.http, Endpoint(endpoint, memo.bridge_token))
    try:
        return await bridge.status(timeout=3)
    except PierError:
        return None


async def _delete_pod(memo: kopf.Memo, pod: Any, session: dict[str, Any], reason: str, message: str) -> None:
    try:
        await asyncio.to_thread(memo.core.delete_namespaced_pod, pod.metadata.name, pod.metadata.namespace)
    except ApiException as exc:
        if exc.status != 404:
            raise
    await _event(memo, session, reason, message)


async def _write_status(
    session: dict[str, Any], old: MCPSessionStatus, status: MCPSessionStatus, memo: kopf.Memo
) -> None:
    changes = status_patch(old, status)
    if not changes:
        return  # nothing changed → no API write
    meta = session["metadata"]
    try:
        await asyncio.to_thread(
            memo.custom.patch_namespaced_custom_object_status,
            GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], {"status": changes},
        )  # fmt: skip
    except ApiException as exc:
        if exc.status != 404:
            raise


async def reap_if_idle(session: dict[str, Any], status: MCPSessionStatus, memo: kopf.Memo) -> None:
    """Delete a session whose bridge has had nothing in flight and no activity for `ttlSeconds`
    since the session became Ready."""
    ttl = int((session.get("spec") or {}).get("ttlSeconds") or 0)
    if not ttl or not status.serving:
        return
    assert status.endpoint is not None
    bridge = await _bridge_status(memo, status.endpoint)
    if bridge is None:
        return  # activity unknown: never reap on a guess
    idle_s = bridge.idle_for(_now().timestamp(), status.ready_since())
    if bridge.busy or idle_s < ttl:
        return
    meta = session["metadata"]
    await _event(memo, session, "Reaped", f"idle for {int(idle_s)} s (ttlSeconds {ttl})")
    try:
        await asyncio.to_thread(
            memo.custom.delete_namespaced_custom_object, GROUP, VERSION, meta["namespace"], PLURAL, meta["name"]
        )
    except ApiException as exc:
        if exc.status != 404:
            raise
