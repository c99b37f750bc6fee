"""The operator's decisions, from cached objects alone (operator/…/plan.py): no cluster, no await.

The inputs are objects as the operator's caches hold them (`cache.slim_*` of what the API server sends); the
cluster tests (tests/k8s/) show the same decisions carried out against a real API server and node.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from pier.core.callapi import BridgeStatus
from pier.core.catalog import Catalog, Profile
from pier.core.mcpsession import MCPSessionSpec, MCPSessionStatus, stamp
from pier.operator.bridges import Known
from pier.operator.cache import slim_node, slim_pod, slim_session
from pier.operator.config import OperatorSettings
from pier.operator.plan import Parsed, Plan, plan
from pier.operator.queue import WorkQueue

pytestmark = pytest.mark.unit
NOW = 1_800_000_000.0
DEMO = Profile(name="demo", command=["python", "-m", "pier.examples.demo_server"])


def _at(seconds_ago: float) -> str:
    return stamp(dt.datetime.fromtimestamp(NOW - seconds_ago, dt.UTC))


@dataclass
class World:
    settings: OperatorSettings = field(default_factory=OperatorSettings)
    now: float = NOW
    nodes: dict[str, Any] = field(default_factory=dict)
    bridges: dict[str, Known] = field(default_factory=dict)

    def node(self, name: str) -> Any:
        return self.nodes.get(name)

    def nodes_synced(self) -> bool:
        return True

    def bridge(self, session: str) -> Known | None:
        return self.bridges.get(session)


def _session(status: dict[str, Any] | None = None, generation: int = 1, ttl: int = 3600) -> dict[str, Any]:
    return slim_session({
        "metadata": {"name": "s", "namespace": "pier", "uid": "u-1", "generation": generation, "resourceVersion": "7",
                     "managedFields": [{"manager": "kubectl"}]},
        "spec": {"userId": "alice", "server": {"profile": "demo"}, "ttlSeconds": ttl},
        "status": status or {},
    })  # fmt: skip


def _pod(name: str = "s-g1-0", ready: bool = True, node: str = "n1", phase: str = "Running", **extra: Any) -> dict:
    return slim_pod({
        "metadata": {"name": name, "labels": {"pier.dev/session": "s"}, "resourceVersion": "9",
                     "annotations": {"pier.dev/generation": str(extra.pop("generation", 1)), "other": "dropped"},
                     **extra},
        "spec": {"nodeName": node, "containers": [{"name": "bridge"}]},
        "status": {"phase": phase, "podIP": "10.1.2.3",
                   "conditions": [{"type": "Ready", "status": str(ready), "lastTransitionTime": _at(60)},
                                  {"type": "ContainersReady", "status": "True"}],
                   "containerStatuses": [{"name": "bridge", "restartCount": 1, "ready": ready,
                                          "image": "x", "state": {"running": {}}}]},
    })  # fmt: skip


def _node(ready: str = "True", since_s: float = 600) -> dict:
    return slim_node({
        "metadata": {"name": "n1", "resourceVersion": "3"},
        "spec": {"taints": [{"key": "node.kubernetes.io/unreachable", "effect": "NoExecute", "timeAdded": "x"}]},
        "status": {"conditions": [{"type": "MemoryPressure", "status": "False"},
                                  {"type": "Ready", "status": ready, "lastTransitionTime": _at(since_s)}],
                   "images": [{"names": ["a" * 100]}]},
    })  # fmt: skip


def _parsed(profile: Profile = DEMO, **spec: Any) -> Parsed:
    body = {"userId": "alice", "server": {"profile": profile.name}, **spec}
    return Parsed(MCPSessionSpec.model_validate(body), profile)


def _plan(session: dict, pods: list[dict], world: World | None = None, parsed: Parsed | None = None) -> Plan:
    old = MCPSessionStatus.model_validate(session["status"])
    return plan("s", session, parsed or _parsed(ttl_seconds=session["spec"]["ttlSeconds"]), old, pods,
                world or World(nodes={"n1": _node()}))  # fmt: skip


def _ready_status(**extra: Any) -> dict[str, Any]:
    conditions = [{"type": "Ready", "status": "True", "reason": "BridgeReady", "message": "the bridge answers /readyz",
                   "lastTransitionTime": _at(100)},
                  {"type": "ServerRunning", "status": "True", "reason": "BridgeReady",
                   "message": "the bridge answers /readyz", "lastTransitionTime": _at(100)}]  # fmt: skip
    return {"phase": "Ready", "podName": "s-g1-0", "endpoint": "http://10.1.2.3:8080", "observedGeneration": 1,
            "restarts": 1, "replacements": 0, "conditions": conditions, **extra}  # fmt: skip


def test_the_caches_keep_only_what_decisions_read():
    session = _session()
    assert "managedFields" not in session["metadata"]
    pod = _pod()
    assert pod["metadata"]["annotations"] == {"pier.dev/generation": "1"}
    assert [c["type"] for c in pod["status"]["conditions"]] == ["Ready"]
    assert pod["status"]["containerStatuses"] == [{"name": "bridge", "restartCount": 1, "ready": True}]
    node = _node()
    assert node["status"] == {"ready": {"status": "True", "lastTransitionTime": _at(600)}}
    assert node["spec"]["taints"] == [{"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"}]


def test_a_new_session_gets_a_pod_and_the_status_says_so():
    planned = _plan(_session(), [])
    assert planned.create == "s-g1-0"
    assert not planned.claim  # the profile keeps no warm pool
    assert [e.reason for e in planned.events] == ["Started"]
    changes = planned.changes()
    assert changes["phase"] == "Starting"
    assert changes["podName"] == "s-g1-0"
    assert changes["observedGeneration"] == 1
    assert {c["type"]: c["status"] for c in changes["conditions"]} == {"Ready": "False", "ServerRunning": "False"}


def test_a_pooled_profile_claims_first():
    pooled = DEMO.model_copy(update={"warm_pool": 2})
    assert _plan(_session(), [], parsed=_parsed(pooled)).claim
    # A session that differs from its profile is never served from the pool.
    assert not _plan(_session(), [], parsed=_parsed(pooled, maxConcurrentCalls=3)).claim


def test_a_ready_pod_and_a_settled_status_mean_nothing_to_do():
    """The steady state: the pass plans it and touches no API."""
    planned = _plan(_session(_ready_status()), [_pod()])
    assert planned.changes() == {}
    assert not planned.acts
    assert planned.track == ("http://10.1.2.3:8080", 3600.0, NOW - 100)


def test_a_session_becoming_ready_says_so_in_one_write_with_its_servers_name():
    """The pod is Ready: the status waits a moment for the bridge's first answer, so one write carries Ready, the
    server's name and its tools (each write is an API request: a burst of sessions makes thousands)."""
    starting = _session({"phase": "Starting", "podName": "s-g1-0", "observedGeneration": 1, "restarts": 1,
                         "conditions": [{"type": "Ready", "status": "False", "reason": "PodCreated",
                                         "message": "waiting", "lastTransitionTime": _at(5)}]})  # fmt: skip
    waiting = _plan(starting, [_pod()])
    assert waiting.changes() == {}  # not yet asked: nothing written, the bridge asked now
    assert waiting.track == ("http://10.1.2.3:8080", 3600.0, 0.0)
    assert waiting.look_again_s == pytest.approx(3)  # and the session looked at again, answer or not
    bridge = Known("http://10.1.2.3:8080", 3600, 0.0, since=NOW - 0.1, asked_at=NOW)
    bridge.status = BridgeStatus(state="ready", ready=True, mode="child", tools=7, server_info={"name": "demo"})
    answered = _plan(starting, [_pod()], World(nodes={"n1": _node()}, bridges={"s": bridge})).changes()
    assert (answered["phase"], answered["tools"], answered["serverInfo"]["name"]) == ("Ready", 7, "demo")
    assert answered["endpoint"] == "http://10.1.2.3:8080"
    # A bridge that does not answer does not hold the session back.
    bridge.status, bridge.failures = None, 1
    silent = _plan(starting, [_pod()], World(nodes={"n1": _node()}, bridges={"s": bridge})).changes()
    assert silent["phase"] == "Ready"
    assert "serverInfo" not in silent


def test_an_ordinary_start_is_not_rewritten_step_by_step_but_trouble_is_shown():
    created = {"status": "False", "reason": "PodCreated", "message": "waiting", "lastTransitionTime": _at(5)}
    starting = _session(
        {
            "phase": "Starting",
            "podName": "s-g1-0",
            "observedGeneration": 1,
            "restarts": 1,
            "replacements": 0,
            "conditions": [{"type": "Ready", **created}, {"type": "ServerRunning", **created}],
        }
    )
    pending = _pod(ready=False, phase="Pending")
    assert _plan(starting, [pending]).changes() == {}
    pulling = _pod(ready=False, phase="Pending")
    pulling["status"]["containerStatuses"][0]["state"] = {"waiting": {"reason": "ImagePullBackOff", "message": "no"}}
    ready = _plan(starting, [pulling]).changes()["conditions"][0]
    assert (ready["reason"], ready["message"]) == ("ImagePullBackOff", "bridge: no")


def test_what_the_bridge_says_reaches_the_status_and_activity_only_coarsely():
    bridge = Known("http://10.1.2.3:8080", 3600, NOW - 100, asked_at=NOW)
    bridge.status = BridgeStatus(state="ready", ready=True, mode="child", restarts=2, tools=7,
                                 server_info={"name": "pier-demo", "version": "1"}, protocol_version="2025-06-18",
                                 last_activity=NOW - 10)  # fmt: skip
    world = World(nodes={"n1": _node()}, bridges={"s": bridge})
    changes = _plan(_session(_ready_status()), [_pod()], world).changes()
    assert changes["serverInfo"] == {"name": "pier-demo", "version": "1", "protocolVersion": "2025-06-18"}
    assert changes["tools"] == 7
    assert changes["restarts"] == 3  # the kubelet's one restart of the bridge, and the bridge's two of its server
    assert changes["lastActivityTime"] == _at(10)
    # Activity a minute later is not worth an API write (the resolution is five minutes by default).
    settled = _session(_ready_status(restarts=3, tools=7, lastActivityTime=_at(10),
                                     serverInfo=changes["serverInfo"]))  # fmt: skip
    bridge.status.last_activity = NOW
    assert _plan(settled, [_pod()], world).changes() == {}


def test_a_crash_counted_by_the_bridge_is_an_event_once():
    bridge = Known("http://10.1.2.3:8080", 3600, NOW - 100, asked_at=NOW)
    bridge.status = BridgeStatus(state="ready", ready=True, mode="child", restarts=1, tools=7)
    world = World(nodes={"n1": _node()}, bridges={"s": bridge})
    planned = _plan(_session(_ready_status()), [_pod()], world)
    assert [e.reason for e in planned.events] == ["ServerCrashed"]
    # Without an answer (the bridge not asked yet, or silent), the count is never lowered.
    quiet = _plan(_session(_ready_status(restarts=5)), [_pod()])
    assert "restarts" not in quiet.changes()
    assert not quiet.events


def test_an_idle_session_is_reaped_only_on_a_fresh_answer():
    session = _session(_ready_status(), ttl=60)
    bridge = Known("http://10.1.2.3:8080", 60, NOW - 100, asked_at=NOW - 50)
    bridge.status = BridgeStatus(state="ready", ready=True, mode="child", last_activity=NOW - 90)
    world = World(nodes={"n1": _node()}, bridges={"s": bridge})
    stale = _plan(session, [_pod()], world)
    assert stale.reap is None  # idle by the answer of 50 s ago, but that answer predates the deadline
    assert stale.ask_bridge
    bridge.asked_at = NOW
    assert _plan(session, [_pod()], world).reap == "idle for 90 s (ttlSeconds 60)"
    bridge.status.in_flight = 1  # a long call is activity
    assert _plan(session, [_pod()], world).reap is None
    bridge.status.in_flight = 0
    bridge.failures = 3  # no answer: never reaped on a guess, and the status says so
    bridge.status = None
    unknown = _plan(session, [_pod()], world)
    assert unknown.reap is None
    assert unknown.changes()["conditions"][1]["status"] == "Unknown"
    assert _plan(_session(_ready_status(), ttl=0), [_pod()], world).reap is None  # ttl 0: never


def test_a_failed_pod_is_replaced_after_a_growing_backoff():
    status = _ready_status(replacements=2, lastReplaceTime=_at(3))
    planned = _plan(_session(status), [_pod(phase="Failed", ready=False)])
    assert [(d.pod, d.event.reason) for d in planned.deletions] == [("s-g1-0", "PodFailed")]
    assert planned.create is None  # 2 s * 2² = 8 s since the last replacement: 5 s to go
    assert planned.look_again_s == pytest.approx(5)
    assert planned.changes()["phase"] == "Starting"
    assert "endpoint" in planned.changes()  # removed: the router stops using the dead pod at once
    later = _plan(_session(_ready_status(replacements=2, lastReplaceTime=_at(9))), [_pod(phase="Failed")])
    assert later.create == "s-g1-3"
    assert [e.reason for e in later.events] == ["Replaced"]


def test_a_pod_on_a_lost_node_is_replaced_at_once_after_the_grace():
    status = _ready_status(replacements=0, lastReplaceTime=_at(1))  # a backoff would apply to a failed pod
    early = _plan(_session(status), [_pod()], World(nodes={"n1": _node("Unknown", since_s=4)}))
    assert not early.deletions
    assert early.look_again_s == pytest.approx(6)  # node_lost_after_s 10: looks again when the grace ends
    lost = _plan(_session(status), [_pod()], World(nodes={"n1": _node("Unknown", since_s=12)}))
    assert [(d.pod, d.event.reason, d.event.kind) for d in lost.deletions] == [("s-g1-0", "NodeLost", "Warning")]
    assert lost.create == "s-g1-1"
    assert lost.changes()["phase"] == "Starting"
    gone = _plan(_session(status), [_pod()], World(nodes={}))  # the node object itself was deleted
    assert [d.event.reason for d in gone.deletions] == ["NodeLost"]
    # The old pod, stuck terminating on the dead node, keeps its name: the next replacement skips it.
    stuck = _pod(deletionTimestamp=_at(5))
    after = _plan(_session(_ready_status(podName="s-g1-0", replacements=0, lastReplaceTime=_at(60))), [stuck],
                  World(nodes={}))  # fmt: skip
    assert after.create == "s-g1-1"


def test_a_spec_change_and_a_duplicate_lose_their_pods():
    changed = _plan(_session(_ready_status(), generation=2), [_pod()])
    assert [d.event.reason for d in changed.deletions] == ["Replaced"]
    assert changed.create == "s-g2-1"
    older, newer = _pod("s-g1-0", creationTimestamp=_at(50)), _pod("s-g1-1", creationTimestamp=_at(5))
    planned = _plan(_session(_ready_status(podName="s-g1-0")), [newer, older])
    assert [(d.pod, d.event.reason) for d in planned.deletions] == [("s-g1-1", "Duplicate")]


def test_a_spec_the_operator_cannot_serve_fails_once_and_stays_quiet():
    session = _session()
    planned = _plan(session, [], parsed=Parsed(error="no server profile 'nope'"))
    assert planned.changes()["phase"] == "Failed"
    assert planned.create is None
    settled = _session(planned.status.as_object())
    again = _plan(settled, [], parsed=Parsed(error="no server profile 'nope'"))
    assert again.changes() == {}
    assert not again.acts


def test_a_pod_the_api_server_refused_is_not_tried_again_until_the_spec_changes():
    refused = {"phase": "Failed", "observedGeneration": 1, "conditions": [
        {"type": "Ready", "status": "False", "reason": "PodInvalid", "message": "bad", "lastTransitionTime": _at(1)},
        {"type": "ServerRunning", "status": "False", "reason": "PodInvalid", "message": "bad",
         "lastTransitionTime": _at(1)}]}  # fmt: skip
    assert not _plan(_session(refused), []).acts
    assert _plan(_session(refused, generation=2), []).create == "s-g2-0"


def test_planning_ten_thousand_sessions_reads_only_memory():
    """The pass's work, at the scale the issue names: every session planned, none with anything to do. A
    figure, not a threshold (bench: `make k8s-scale` measures the real pass)."""
    world = World(nodes={"n1": _node()})
    session, pod = _session(_ready_status()), _pod()
    parsed, old = _parsed(), MCPSessionStatus.model_validate(session["status"])
    started = time.perf_counter()
    acting = sum(plan("s", session, parsed, old, [pod], world).acts for _ in range(10_000))
    elapsed = time.perf_counter() - started
    assert acting == 0
    print(f"\n10,000 plans: {elapsed:.2f} s")


async def test_the_work_queue_holds_a_name_once_and_never_twice_at_work():
    queue = WorkQueue(retry_base_s=0.01)
    for name in ("a", "b", "a"):
        queue.add(name)
    assert len(queue) == 2
    first = await queue.get()
    queue.add(first)  # changed while in work: again afterwards, not alongside
    assert await queue.get() == "b"
    assert len(queue) == 0
    queue.done(first)
    assert await queue.get() == first
    assert queue.retry(first) == pytest.approx(0.01)
    assert queue.retry(first) == pytest.approx(0.02)  # doubling
    queue.done(first)
    assert await queue.get() == first  # back after its delay
    queue.close()


def test_catalog_profiles_parse_for_plans():
    assert Catalog([DEMO]).get("demo") is DEMO


def test_a_cached_session_keeps_piers_annotations_only():
    """The trace of the request that created a session reaches its first reconcile through the cache."""
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    cached = slim_session({
        "metadata": {"name": "s", "namespace": "pier", "managedFields": [{"manager": "kubectl"}],
                     "annotations": {"pier.dev/traceparent": traceparent, "kubectl.kubernetes.io/last-applied": "{}"}},
        "spec": {}, "status": {},
    })  # fmt: skip
    assert cached["metadata"] == {
        "name": "s",
        "namespace": "pier",
        "annotations": {"pier.dev/traceparent": traceparent},
    }
    assert "annotations" not in _session()["metadata"]


def test_a_claimed_warm_pod_is_idle_from_its_claim_not_from_its_warm_up():
    session = _session(ttl=3)
    pending = _plan(session, [_pod()])  # Ready at once (a warm pod): its bridge's first answer is awaited
    assert pending.track is not None
    endpoint, ttl, since = pending.track
    bridge = Known(endpoint, ttl, since, asked_at=NOW + 0.05)
    bridge.status = BridgeStatus(state="ready", ready=True, mode="child", last_activity=NOW - 9)  # warmed up 9 s ago
    answered = _plan(session, [_pod()], World(nodes={"n1": _node()}, bridges={"s": bridge}, now=NOW + 0.06))
    assert answered.status.phase == "Ready"
    assert answered.reap is None


@pytest.mark.parametrize(("pod", "replacements"), [("s-g1-0", 0), ("s-g1-3", 3), ("warm-demo-x7k2p", 0)])
def test_a_pod_found_without_a_status_gets_the_replacement_count_its_name_says(pod: str, replacements: int):
    """The operator that created the pod died before writing the status (killed mid-burst): the next one adopts
    the pod, and the status says which replacement it is, never nothing."""
    planned = _plan(_session(), [_pod(name=pod, ready=False)])
    assert planned.create is None
    assert planned.status.pod_name == pod
    assert planned.status.replacements == replacements
    assert planned.changes()["replacements"] == replacements


def test_a_pod_of_an_earlier_session_of_the_same_name_is_not_taken_over():
    """Deleted and made again (a router does so for the user's next call): the old pod lingers until the garbage
    collector deletes it, and its server's state is not the new session's."""

    def owned_by(uid: str) -> list[dict[str, str]]:
        return [{"apiVersion": "pier.dev/v1alpha1", "kind": "MCPSession", "name": "s", "uid": uid}]

    earlier = _plan(_session(), [_pod(ownerReferences=owned_by("u-0"))])
    assert earlier.create is not None  # a pod of its own
    assert earlier.changes()["phase"] == "Starting"
    assert not earlier.deletions  # the old one is the garbage collector's to delete
    # Its own pod, owned by its uid, is served as ever.
    assert not _plan(_session(_ready_status()), [_pod(ownerReferences=owned_by("u-1"))]).acts
