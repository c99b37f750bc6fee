"""What should be done for one MCPSession, decided from the caches alone: no API call, no await.

`plan` compares the session with its pods, their nodes and what its bridge last said, and returns the
status the session should have and what to do to get there: pods to delete (a spec change replaces the
pod; a failed pod, a pod on a lost node and a duplicate go), a pod to create (or a warm pod to claim
first), Events to post, whether to reap the session, and when to look again. The operator's periodic pass
plans every session and hands only those with something to do to the workers; the workers plan again
and act. Planning costs microseconds, so a pass over 10,000 sessions costs a fraction of a second.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Protocol

from pier.core.catalog import Profile
from pier.core.kube import Obj
from pier.core.mcpsession import Condition, MCPSessionSpec, MCPSessionStatus, ServerInfo, stamp, status_patch
from pier.operator.bridges import Known
from pier.operator.cache import node_not_ready_since, pod_ready
from pier.operator.config import OperatorSettings
from pier.operator.pods import BRIDGE_PORT, GENERATION_ANNOTATION, SERVER_CONTAINER, pod_name
from pier.operator.pool import poolable


@dataclass(frozen=True)
class Parsed:
    """A session's spec as the operator reads it: the spec and its profile, or why it cannot be served."""

    spec: MCPSessionSpec | None = None
    profile: Profile | None = None
    error: str | None = None


class World(Protocol):
    """What a plan reads besides the session and its pods."""

    settings: OperatorSettings
    now: float  # POSIX time

    def node(self, name: str) -> Obj | None: ...

    def nodes_synced(self) -> bool: ...

    def bridge(self, session: str) -> Known | None: ...


@dataclass
class Event:
    reason: str
    message: str
    kind: str = "Normal"


@dataclass
class Deletion:
    pod: str
    event: Event


@dataclass
class Plan:
    old: MCPSessionStatus
    status: MCPSessionStatus
    parsed: Parsed
    deletions: list[Deletion] = field(default_factory=list)
    claim: bool = False  # a first pod: try a warm one before creating `create`
    create: str | None = None  # the pod to create
    events: list[Event] = field(default_factory=list)
    reap: str | None = None  # why the session is deleted
    ask_bridge: bool = False  # the reap waits for a fresh answer from the bridge
    track: tuple[str, float, float] | None = None  # (endpoint, ttl, ready since) for the bridge monitor
    look_again_s: float | None = None  # a backoff or a node's grace runs out then

    def changes(self) -> dict[str, Any]:
        return status_patch(self.old, self.status)

    @property
    def acts(self) -> bool:
        """Whether carrying the plan out touches the API."""
        return bool(self.deletions or self.create or self.claim or self.events or self.reap or self.changes())


def plan(name: str, session: Obj, parsed: Parsed, old: MCPSessionStatus, pods: list[Obj], world: World) -> Plan:
    """The plan for session `name` (see the module's doc)."""
    generation = session["metadata"].get("generation", 1)
    status = old.model_copy(update={"observed_generation": generation})
    result = Plan(old, status, parsed)
    if parsed.error is not None or parsed.spec is None:
        status.phase = "Failed"
        status.endpoint = None
        status.conditions = conditions(old, False, "InvalidSpec", parsed.error or "no spec", False, world.now)
        return result
    mine = [pod for pod in pods if _owned_by(pod, session["metadata"].get("uid"))]
    current = _sort(mine, generation, old, world, result)
    if current is None:
        _no_pod(name, session, pods, parsed, world, result)
    else:
        _observe(name, current, parsed.spec, world, result)
    return result


def _owned_by(pod: Obj, uid: str | None) -> bool:
    """Whether `pod` may serve the session of this `uid`: not when it belongs to an earlier session of the same
    name (deleted, then made again: its pods linger until the garbage collector deletes them), whose server's
    state is not this session's to inherit. A pod that names no owning session is judged by its labels alone."""
    owners = [ref.get("uid") for ref in pod["metadata"].get("ownerReferences") or () if ref.get("kind") == "MCPSession"]
    return not owners or uid is None or uid in owners


def _sort(pods: list[Obj], generation: int, old: MCPSessionStatus, world: World, result: Plan) -> Obj | None:
    """The pod that serves the session (None: none does); the others are planned for deletion."""
    candidates = []
    for pod in pods:
        meta = pod["metadata"]
        if meta.get("deletionTimestamp"):
            continue  # going already (a pod on an unreachable node may stay so for long: it no longer counts)
        phase = pod["status"].get("phase")
        lost = _node_lost(pod, world, result)
        if (meta.get("annotations") or {}).get(GENERATION_ANNOTATION) != str(generation):
            result.deletions.append(Deletion(meta["name"], Event("Replaced", "spec changed: replacing the pod")))
        elif phase in ("Failed", "Succeeded"):
            event = Event("PodFailed", f"pod {meta['name']} {phase}", "Warning")
            result.deletions.append(Deletion(meta["name"], event))
        elif lost is not None:
            event = Event("NodeLost", f"pod {meta['name']}: {lost}; starting a new one elsewhere", "Warning")
            result.deletions.append(Deletion(meta["name"], event))
        else:
            candidates.append(pod)
    if not candidates:
        return None
    # Two pods for one session (a race lost long ago, a restore): the one the status names stays, else a
    # Ready one, else the newest.
    candidates.sort(
        key=lambda p: (p["metadata"]["name"] == old.pod_name, pod_ready(p), p["metadata"].get("creationTimestamp", "")),
        reverse=True,
    )
    for extra in candidates[1:]:
        event = Event("Duplicate", f"pod {extra['metadata']['name']}: the session runs in {_name(candidates[0])}")
        result.deletions.append(Deletion(extra["metadata"]["name"], event))
    return candidates[0]


def _name(pod: Obj) -> str:
    return str(pod["metadata"]["name"])


def _node_lost(pod: Obj, world: World, result: Plan) -> str | None:
    """Why the pod's node counts as lost (NotReady or unreachable for `node_lost_after_s`, or deleted), or None."""
    node_name = pod["spec"].get("nodeName")
    if not node_name:
        return None
    node = world.node(node_name)
    if node is None:
        return f"node {node_name} is gone" if world.nodes_synced() else None
    since = node_not_ready_since(node)
    if since is None:
        return None
    grace = world.settings.node_lost_after_s - (world.now - since)
    if grace > 0:
        result.look_again_s = _sooner(result.look_again_s, grace)
        return None
    return f"node {node_name} has not been Ready since {stamp(dt.datetime.fromtimestamp(since, dt.UTC))}"


def _sooner(a: float | None, b: float) -> float:
    return b if a is None else min(a, b)


def _no_pod(name: str, session: Obj, pods: list[Obj], parsed: Parsed, world: World, result: Plan) -> None:
    """No pod serves the session: claim a warm one, create one, or wait out the replacement backoff."""
    old, status, settings = result.old, result.status, world.settings
    assert parsed.spec is not None
    generation = session["metadata"].get("generation", 1)
    if _refused(old, generation):
        return  # the API server refused this generation's pod: nothing to try until the spec changes
    replacements = old.replacements or 0
    node_lost = any(d.event.reason == "NodeLost" for d in result.deletions)
    if old.pod_name and not node_lost:
        # A pod existed and failed or vanished: its replacement waits out a bounded, growing backoff (a node's
        # loss is not the pod's fault: that one is replaced at once).
        backoff = min(settings.replace_backoff_s * 2**replacements, settings.replace_backoff_max_s)
        since = world.now - (
            dt.datetime.fromisoformat(old.last_replace_time).timestamp() if old.last_replace_time else 0
        )
        if since < backoff:
            result.look_again_s = _sooner(result.look_again_s, backoff - since)
            status.phase, status.endpoint = "Starting", None
            why = f"pod {old.pod_name} is gone; the next starts in {backoff - since:.0f} s"
            status.conditions = conditions(old, False, "BackOff", why, False, world.now)
            return
    if old.pod_name:
        replacements += 1
    elif poolable(parsed.spec, parsed.profile):
        result.claim = True  # a first pod: a warm one if one is ready (else the one planned below)
    taken = {p["metadata"]["name"] for p in pods}
    while pod_name(name, generation, replacements) in taken:  # a name still held by a pod on its way out
        replacements += 1
    result.create = pod_name(name, generation, replacements)
    result.events.append(Event("Replaced" if replacements else "Started", f"pod {result.create} created"))
    status.phase, status.endpoint, status.pod_name = "Starting", None, result.create
    status.replacements = replacements
    status.last_replace_time = stamp(dt.datetime.fromtimestamp(world.now, dt.UTC))
    status.conditions = conditions(old, False, "PodCreated", "waiting for the bridge to be ready", False, world.now)


def _refused(old: MCPSessionStatus, generation: int) -> bool:
    if old.phase != "Failed" or old.observed_generation != generation:
        return False
    return any(c.type == "Ready" and c.reason == "PodInvalid" for c in old.conditions or [])


# How long a session whose pod just became Ready waits for its bridge's first answer, so that one status write
# says Ready with the server's name and tools (rather than two writes a few milliseconds apart).
FIRST_ANSWER_WAIT_S = 3.0
# Why a pod is not Ready yet when all is well: the status keeps saying the pod was created, rather than being
# rewritten at every step of an ordinary start (each an API write).
_ORDINARY_START = frozenset({"Starting", "ContainerCreating", "PodInitializing"})


def _observe(name: str, pod: Obj, spec: MCPSessionSpec, world: World, result: Plan) -> None:
    """The status a serving (or starting) pod gives its session, and whether the session is idle for its TTL."""
    old, status = result.old, result.status
    ready = pod_ready(pod)
    ip = pod["status"].get("podIP")
    endpoint = f"http://{ip}:{BRIDGE_PORT}" if ip else None
    if ready and endpoint and _first_answer_pending(name, endpoint, world, result):
        result.track = (endpoint, float(spec.ttl_seconds), 0.0)
        return  # the status as it was, for a moment: the bridge's first answer comes with it
    restarts = sum(c.get("restartCount", 0) for c in pod["status"].get("containerStatuses") or []
                   if c.get("name") != SERVER_CONTAINER)  # fmt: skip
    status.pod_name = _name(pod)
    status.replacements = _replacement_of(name, pod) if status.replacements is None else status.replacements
    status.endpoint = endpoint if ready else None
    status.phase = "Ready" if ready else "Starting"
    known = world.bridge(name)
    if known is not None and known.endpoint != endpoint:
        known = None  # what an earlier pod's bridge said
    answered = known is not None and known.status is not None and ready
    if answered:
        assert known is not None
        assert known.status is not None
        _from_bridge(known, status, old, world)
        restarts += known.status.restarts
    else:
        # Unknown (not asked yet, or no answer): the count stays as last reported, never goes down.
        restarts = max(restarts, old.restarts or 0)
    status.restarts = restarts
    if restarts > (old.restarts or 0):
        result.events.append(Event("ServerCrashed", f"the server restarted ({restarts} restarts so far)", "Warning"))
    if ready and old.phase != "Ready":
        result.events.append(Event("Ready", f"serving at {endpoint}"))
    if ready:
        reason, message = "BridgeReady", "the bridge answers /readyz"
    else:
        reason, message = _why_not_ready(pod)
        previous = next((c for c in old.conditions or [] if c.type == "Ready"), None)
        if reason in _ORDINARY_START and old.phase == "Starting" and old.pod_name == _name(pod) and previous:
            reason, message = previous.reason or reason, previous.message or message
    running: bool | None = answered or ready
    if ready and known is not None and known.unreachable:
        running = None  # Ready to the kubelet, but no answer to the operator: unknown
        reason, message = "BridgeUnreachable", f"the kubelet finds it ready; {known.failures} status requests failed"
    status.conditions = conditions(old, ready, reason, message, running, world.now)
    if ready and endpoint:
        since = status.ready_since()
        result.track = (endpoint, float(spec.ttl_seconds), since)
        if known is not None and known.ready_since != since:
            # Idle from this Ready on: the monitor learns it only after this plan (tracked while the first answer
            # was pending, it had none), and a claimed warm pod's bridge has been idle since its warm-up.
            known = dataclasses.replace(known, ready_since=since)
        _reap_if_idle(spec, known, world, result)


def _replacement_of(session: str, pod: Obj) -> int:
    """Which replacement of its session a pod is, from its name (`pods.pod_name`); 0 for any other name (a
    claimed warm pod, the first). For a pod whose creator died before writing the status (killed mid-burst)."""
    generation = (pod["metadata"].get("annotations") or {}).get(GENERATION_ANNOTATION)
    prefix = f"{session}-g{generation}-"
    suffix = _name(pod).removeprefix(prefix)
    return int(suffix) if _name(pod).startswith(prefix) and suffix.isdigit() else 0


def _first_answer_pending(name: str, endpoint: str, world: World, result: Plan) -> bool:
    """Whether a session becoming Ready (or Ready at a new endpoint) still waits for its bridge's first answer."""
    old = result.old
    if old.phase == "Ready" and old.endpoint == endpoint:
        return False  # Ready already (an operator that restarted asks again, but changes nothing meanwhile)
    known = world.bridge(name)
    if known is None or known.endpoint != endpoint:
        result.look_again_s = _sooner(result.look_again_s, FIRST_ANSWER_WAIT_S)
        return True
    waited = world.now - known.since
    if known.status is None and not known.failures and waited < FIRST_ANSWER_WAIT_S:
        result.look_again_s = _sooner(result.look_again_s, FIRST_ANSWER_WAIT_S - waited)
        return True
    return False


def _from_bridge(known: Known, status: MCPSessionStatus, old: MCPSessionStatus, world: World) -> None:
    bridge = known.status
    assert bridge is not None
    info = bridge.server_info or {}
    # Empty values are left out: an empty string is no name.
    status.server_info = ServerInfo(
        name=info.get("name") or None, version=info.get("version") or None,
        protocol_version=bridge.protocol_version or None,
    )  # fmt: skip
    status.tools = bridge.tools
    if bridge.last_activity:
        # Rewritten only when activity moved on by the resolution: an API write per call would grow with use.
        before = dt.datetime.fromisoformat(old.last_activity_time).timestamp() if old.last_activity_time else 0.0
        if bridge.last_activity - before >= max(world.settings.status_activity_resolution_s, 1.0):
            status.last_activity_time = stamp(dt.datetime.fromtimestamp(bridge.last_activity, dt.UTC))


def _reap_if_idle(spec: MCPSessionSpec, known: Known | None, world: World, result: Plan) -> None:
    if not spec.ttl_seconds or known is None or known.status is None:
        return
    if known.reapable(world.now):
        idle = world.now - known.idle_since()
        result.reap = f"idle for {int(idle)} s (ttlSeconds {spec.ttl_seconds})"
    elif not known.status.busy and world.now >= known.idle_since() + spec.ttl_seconds:
        result.ask_bridge = True  # idle by what it said last: ask again before deciding


def _why_not_ready(pod: Obj) -> tuple[str, str]:
    for container in pod["status"].get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason"):
            return waiting["reason"], f"{container.get('name')}: {waiting.get('message') or waiting['reason']}"
    return "Starting", f"pod {_name(pod)} is {pod['status'].get('phase') or 'Pending'}"


def conditions(
    old: MCPSessionStatus, ready: bool, reason: str, message: str, running: bool | None, now: float
) -> list[Condition]:
    """The Ready and ServerRunning conditions; each keeps its transition time while its state holds."""
    previous: dict[str, Condition] = {c.type: c for c in old.conditions or []}
    result = []
    for kind, value in (("Ready", ready), ("ServerRunning", running)):
        state = "Unknown" if value is None else "True" if value else "False"
        before = previous.get(kind)
        since = (
            before.last_transition_time
            if before is not None and before.status == state
            else stamp(dt.datetime.fromtimestamp(now, dt.UTC))
        )
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
