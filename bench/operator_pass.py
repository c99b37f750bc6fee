"""The operator's pass and caches at 10,000 and 50,000 sessions, in-process (part of `make k8s-scale`).

The simulated cluster cannot hold 10,000 sessions on two cores (README: Sizing); what a pass over them costs and
what the operator's caches hold do not depend on the cluster, only on the objects in them. So the operator's own
`Operator` is filled here with that many sessions, Ready pods and their nodes, as the API server sends them (a
session as the router makes it with the status the operator writes; a pod as the operator makes it with the
status a kubelet reports), through its informers' own slimming and indexes. Then its real `run_pass` is timed:
every session planned, none with anything to do, so no request is sent (the API client points nowhere).

    python -m bench.operator_pass [--sessions 10000 50000]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import time
import tracemalloc
from typing import Any

import aiohttp

from pier.core.catalog import Catalog, Profile
from pier.core.mcpsession import MCPSessionSpec, new_session
from pier.operator.config import OperatorSettings
from pier.operator.engine import Operator
from pier.operator.metrics import OperatorMetrics
from pier.operator.pods import build_pod

PROFILE = Profile(name="demo", command=["python", "-m", "pier.examples.demo_server"])
_STAMP = "2026-12-07T04:30:25Z"


def session_and_pod(i: int, nodes: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Session `i` and its Ready pod, with the metadata the API server adds (managedFields included)."""
    session = new_session(f"user-{i:06d}", PROFILE, 3600)
    name = session["metadata"]["name"]
    fields: dict[str, Any] = {"f:spec": {"f:userId": {}, "f:server": {"f:profile": {}}}}
    managed = [{"manager": "pier-router", "operation": "Update", "apiVersion": "pier.dev/v1alpha1", "time": _STAMP,
                "fieldsType": "FieldsV1", "fieldsV1": fields}]  # fmt: skip
    session["metadata"].update(namespace="pier", uid=f"uid-{i}", generation=1, resourceVersion=str(10 * i + 1),
                               creationTimestamp=_STAMP, managedFields=managed)  # fmt: skip
    endpoint = f"http://10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}:8080"
    conditions = [{"type": t, "status": "True", "reason": "BridgeReady", "message": "the bridge answers /readyz",
                   "lastTransitionTime": _STAMP} for t in ("Ready", "ServerRunning")]  # fmt: skip
    session["status"] = {"phase": "Ready", "endpoint": endpoint, "podName": f"{name}-g1-0", "observedGeneration": 1,
                         "restarts": 0, "replacements": 0, "lastReplaceTime": _STAMP, "tools": 7,
                         "serverInfo": {"name": "pier-demo", "version": "1.0", "protocolVersion": "2025-11-25"},
                         "conditions": conditions}  # fmt: skip
    spec = MCPSessionSpec.model_validate(session["spec"])
    pod = build_pod(name, f"uid-{i}", 1, 0, spec, PROFILE, OperatorSettings())
    pod["metadata"].update(namespace="pier", uid=f"pod-{i}", resourceVersion=str(10 * i + 2),
                           creationTimestamp=_STAMP, managedFields=managed * 3)  # fmt: skip
    pod["spec"]["nodeName"] = f"node-{i % nodes}"
    pod["status"] = {
        "phase": "Running", "podIP": endpoint[7:-5], "hostIP": "10.0.0.1", "qosClass": "Burstable",
        "startTime": _STAMP,
        "conditions": [{"type": t, "status": "True", "lastTransitionTime": _STAMP, "lastProbeTime": None}
                       for t in ("Initialized", "Ready", "ContainersReady", "PodScheduled")],
        "containerStatuses": [{"name": "bridge", "ready": True, "restartCount": 0, "started": True,
                               "image": "ghcr.io/pier-dev/pier:0.1.0", "imageID": "sha256:" + "0" * 64,
                               "containerID": "containerd://" + "f" * 64,
                               "state": {"running": {"startedAt": _STAMP}}, "lastState": {}}],
    }  # fmt: skip
    return session, pod


def node(i: int) -> dict[str, Any]:
    return {
        "metadata": {"name": f"node-{i}", "uid": f"node-uid-{i}", "resourceVersion": str(i)},
        "spec": {},
        "status": {"conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": _STAMP}]},
    }


async def fill(operator: Operator, count: int, nodes: int) -> None:
    """`count` sessions with Ready pods on `nodes` nodes into the operator's caches, as its informers would put
    them, then what its workers do with what the informers announced: a reconcile each, with nothing to change."""
    for n in range(nodes):
        operator.caches.nodes.put(node(n))
    for i in range(count):
        session, pod = session_and_pod(i, nodes)
        operator.caches.sessions.put(session)
        operator.caches.pods.put(pod)
    for informer in operator.caches.informers:
        informer.synced.set()
    while len(operator.queue):
        name = await operator.queue.get()
        await operator.reconcile(name)
        operator.queue.done(name)


class _CollectorClock:
    """The collector's collections and time while in the block (`gc.callbacks`)."""

    def __init__(self) -> None:
        self.collections = 0
        self.seconds = 0.0
        self._started = 0.0

    def _on_gc(self, phase: str, _: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.collections += 1
            self.seconds += time.perf_counter() - self._started

    def __enter__(self) -> None:
        gc.callbacks.append(self._on_gc)

    def __exit__(self, *_: object) -> None:
        gc.callbacks.remove(self._on_gc)


async def measure(count: int, nodes: int = 100) -> dict[str, Any]:
    settings = OperatorSettings(namespace="pier", bridge_refresh_s=3600)
    async with aiohttp.ClientSession() as http:
        operator = Operator(settings, http, None, Catalog([PROFILE]), OperatorMetrics())  # type: ignore[arg-type]
        gc.collect()
        tracemalloc.start()
        await fill(operator, count, nodes)  # (the API client is None: a request would fail the run)
        gc.collect()
        cached, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()  # (it slows every allocation: the passes are timed without it)
        started = time.perf_counter()
        gc.collect()  # what one full collection costs with these caches: a pause of the whole operator
        full_collection = time.perf_counter() - started
        operator.election.leading.set()
        times = []
        in_collector = _CollectorClock()
        with in_collector:
            for _ in range(5):
                started = time.perf_counter()
                queued = await operator.run_pass()
                times.append(time.perf_counter() - started)
                assert queued == 0, f"{queued} sessions had something to do"  # the steady state: nothing
        operator.queue.close()
        sample = session_and_pod(0, nodes)
    return {
        "sessions": count,
        "pass_seconds": {
            "first": round(times[0], 3),
            "median": round(statistics.median(times), 3),
            "max": round(max(times), 3),
        },
        "collector": {
            "full_collection_ms": round(full_collection * 1000, 1),
            "during_passes": {"collections": in_collector.collections, "ms": round(in_collector.seconds * 1000, 1)},
            "tracked_objects": len(gc.get_objects()),
        },
        "cache_mib": round(cached / 1024**2, 1),
        "per_session_kib": round(cached / count / 1024, 2),
        "api_object_bytes": {"session": len(json.dumps(sample[0])), "pod": len(json.dumps(sample[1]))},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, nargs="+", default=[10_000, 50_000])
    args = parser.parse_args()
    for count in args.sessions:
        print(json.dumps(asyncio.run(measure(count))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
