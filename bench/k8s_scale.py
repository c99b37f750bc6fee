"""`make k8s-scale`: Pier on a simulated cluster of 100 nodes, with thousands of sessions.

    python -m bench.k8s_scale [--sessions 10000] [--nodes 100] [--burst 1000] [--quick]

The real kube-apiserver, kube-controller-manager and kube-scheduler (v1.20.2, tests/k8s/cluster.py) with
kubemark's hollow nodes (tests/k8s/hollow.py: real kubelets on a fake container runtime), Pier's operator and
a router with the Kubernetes backend as processes of their own (with the ServiceAccount tokens of deploy/: its
RBAC exactly), one Redis, and one real bridge behind every hollow pod's address. Phases:

1. fill: `sessions - burst` MCPSessions applied at a steady rate (as users arrive), until all are Ready;
2. burst: `burst` more within 10 s (a warm pool of the profile on), until all are Ready;
3. steady: nothing happens for `steady_s`: what the operator and the router cost, and the API server's
   own count of their requests (APF FlowSchemas attribute them);
4. router: its memory with every session in its watch, and warm calls' latency through it;
5. reaping: sessions with a short TTL, and how late after their TTL they go;
6. node loss: one hollow node silenced (SIGSTOP: it stops heartbeating), its sessions followed to new pods;
7. faults: the operator killed in the middle of a burst; a burst with unknown profiles and specs the API
   server refuses mixed in; the API server answering 429/500 to the operator for 30 s.

Results: bench/results/k8s-scale.{json,md}. A hollow pod runs no process: every session's bridge is the
same real bridge (see tests/k8s/hollow.py), so per-session bridge memory and server start are not measured
here (bench/results/latest.md measures a bridge; the k8s tier a real pod's cold start).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.processes import Proc, cpu_seconds, free_port, rss_mib, spawn, wait_http
from bench.stats import percentile
from pier.cli.redis_server import RedisServer
from pier.core.catalog import Profile
from pier.core.kube import ApiAccess, Informer, KubeClient, Obj
from pier.core.mcpsession import GROUP, PLURAL, SESSION_LABEL, VERSION, new_session, session_name
from tests.k8s.cluster import ControlPlane, build_k8s
from tests.k8s.faulty_api import FaultyApi
from tests.k8s.hollow import HollowNodes, SharedBridge, build_kubemark

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
NAMESPACE = "pier"
PROFILE = "demo"
# Session pods' probes: every hollow pod's probe reaches the one shared bridge (a real cluster spreads them over
# its kubelets), so they are lengthened here. A kubelet's first readiness probe of a new pod comes one period after
# it took the pod (its container did not exist yet at the period's start): "Ready" includes up to this period,
# which the default (2 s) does not; "Running" (its containers started) does not include it.
READINESS_PERIOD_S = 10
PROBES = {"PIER_SESSION_READINESS_PERIOD_S": str(READINESS_PERIOD_S), "PIER_SESSION_LIVENESS_PERIOD_S": "60"}
_ACCESS = {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}
_T0 = time.monotonic()


def log(line: str) -> None:
    print(f"{time.monotonic() - _T0:7.1f}s {line}", flush=True)


def _now() -> float:
    return time.time()


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {"n": 0}
    return {"n": len(ordered), "p50": round(percentile(ordered, 50), 3), "p90": round(percentile(ordered, 90), 3),
            "p99": round(percentile(ordered, 99), 3), "max": round(ordered[-1], 3)}  # fmt: skip


# -- what the bench sees of every session ---------------------------------------------------------


@dataclass
class Seen:
    applied: float = 0.0  # the create request sent
    pod: float = 0.0  # a pod of the session first seen (created, or a warm one claimed)
    bound: float = 0.0  # that pod bound to a node
    running: float = 0.0  # that pod's containers started (the kubelet says Running)
    ready: float = 0.0  # the session first Ready
    deleted: float = 0.0
    claimed: bool = False
    pods: set[str] = field(default_factory=set)  # every pod ever seen for it
    nodes: dict[str, str] = field(default_factory=dict)  # pod → node
    ready_again: list[float] = field(default_factory=list)  # Ready after having been not Ready
    was_ready: bool = False


class Observer:
    """Watches of the bench's own (as the cluster admin): when each session got its pod, its node, Ready."""

    def __init__(self, client: KubeClient) -> None:
        self.seen: dict[str, Seen] = {}
        self.sessions = Informer(client, f"/apis/{GROUP}/{VERSION}/namespaces/{NAMESPACE}/{PLURAL}", name="sessions")
        self.pods = Informer(client, f"/api/v1/namespaces/{NAMESPACE}/pods", name="pods")
        self.sessions.subscribe(self._session)
        self.pods.subscribe(self._pod)
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.tasks = [asyncio.create_task(i.run()) for i in (self.sessions, self.pods)]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def of(self, name: str) -> Seen:
        return self.seen.setdefault(name, Seen())

    def _session(self, name: str, before: Obj | None, after: Obj | None) -> None:
        seen, now = self.of(name), _now()
        if after is None:
            seen.deleted = seen.deleted or now
            return
        ready = (after.get("status") or {}).get("phase") == "Ready"
        if ready and not seen.ready:
            seen.ready = now
        elif ready and not seen.was_ready:
            seen.ready_again.append(now)
        seen.was_ready = ready

    def _pod(self, name: str, before: Obj | None, after: Obj | None) -> None:
        if after is None:
            return
        session = (after["metadata"].get("labels") or {}).get(SESSION_LABEL)
        if not session:
            return
        seen, now = self.of(session), _now()
        node = (after.get("spec") or {}).get("nodeName")
        if name not in seen.pods:
            seen.pods.add(name)
            if not seen.pod:
                seen.pod = now
                seen.claimed = bool(node)  # a pod bound before it was ours: a warm one, claimed
        if node and name not in seen.nodes:
            seen.nodes[name] = node
            if not seen.bound:
                seen.bound = now
        if (after.get("status") or {}).get("phase") == "Running" and not seen.running:
            seen.running = now

    def ready(self, names: list[str]) -> int:
        return sum(1 for n in names if self.of(n).ready)

    def latencies(self, names: list[str]) -> dict[str, Any]:
        items = [self.of(n) for n in names]
        done = [s for s in items if s.ready and s.applied]
        return {
            "sessions": len(names),
            "ready": len(done),
            "apply_to_pod_s": summary([s.pod - s.applied for s in done if s.pod]),
            "apply_to_bound_s": summary([s.bound - s.applied for s in done if s.bound]),
            "apply_to_running_s": summary([s.running - s.applied for s in done if s.running]),
            "apply_to_ready_s": summary([s.ready - s.applied for s in done]),
            "claimed_warm": sum(s.claimed for s in items),
        }


# -- numbers from processes and from the API server --------------------------------------------------


def cpu_s(pids: list[int]) -> float:
    return sum(sum(cpu_seconds(pid)) for pid in pids)


def rss(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += rss_mib(pid)
    return total


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    families: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            families.setdefault(sample.name, []).append((sample.labels, sample.value))
    return families


def total(families: dict[str, list[tuple[dict[str, str], float]]], name: str, **match: str) -> float:
    return sum(v for labels, v in families.get(name, []) if all(labels.get(k) == x for k, x in match.items()))


# -- the bench ------------------------------------------------------------------------------------------


@dataclass
class Config:
    sessions: int
    nodes: int
    burst: int
    warm_pool: int
    steady_s: float
    reap_count: int
    reap_ttl_s: int
    faults: bool
    fault_burst: int
    steps: int


class ScaleBench:
    def __init__(self, cfg: Config, work: Path) -> None:
        self.cfg, self.work = cfg, work
        self.results: dict[str, Any] = {"config": cfg.__dict__}
        self.cp: ControlPlane
        self.procs: dict[str, Proc] = {}
        self.users = 0

    # -- the cluster -----------------------------------------------------------------------------------

    async def setup(self) -> None:
        log("building or finding the binaries (kubemark among them)")
        await asyncio.to_thread(build_k8s, ("kube-apiserver", "kube-controller-manager", "kubectl", "kube-scheduler"))
        await asyncio.to_thread(build_kubemark)
        self.cp = ControlPlane(self.work / "control-plane", start_timeout=180)
        await asyncio.to_thread(self.cp.start)
        self.scheduler = await asyncio.to_thread(self.cp.start_scheduler)
        self.cp.apply_crds(ROOT / "deploy" / "crds")
        access = [o for o in yaml.safe_load_all((ROOT / "deploy" / "pier.yaml").read_text()) if o["kind"] in _ACCESS]
        self.cp.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(access))
        self.cp.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([_flow_schema(c) for c in ("operator", "router")]))
        self.bridge = SharedBridge(self.work / "bridge")
        await asyncio.to_thread(self.bridge.start)
        log(f"starting {self.cfg.nodes} hollow nodes")
        started = time.monotonic()
        self.nodes = HollowNodes(self.cp, self.work / "nodes", self.cfg.nodes, start_timeout=600)
        await asyncio.to_thread(self.nodes.start)
        self.results["hollow_nodes"] = {"count": self.cfg.nodes, "ready_after_s": round(time.monotonic() - started, 1)}
        await asyncio.sleep(10)
        self.results["idle"] = await self.sample(30)  # no session yet: what the cluster costs by itself
        self.admin = KubeClient(self.http, ApiAccess(self.cp.kubeconfig), retry_for_s=30)
        self.observer = Observer(self.admin)
        self.observer.start()
        self.redis = RedisServer(self.work / "redis")
        await self.redis.__aenter__()
        await self.start_operator()
        await self.start_router()
        await asyncio.sleep(5)
        self.results["operator_empty_rss_mib"] = round(rss([self.procs["operator"].pid]), 1)
        self.results["router_empty_rss_mib"] = round(rss([self.procs["router"].pid]), 1)
        # A kubelet probes pods it finds in its first probe period at a random point of that period: the pods of
        # the bench come after that.
        await asyncio.sleep(max(0.0, float(PROBES["PIER_SESSION_READINESS_PERIOD_S"]) - (time.monotonic() - started)))

    def _catalog(self) -> str:
        demo = {"command": ["python", "-m", "pier.examples.demo_server"], "warm_pool": self.cfg.warm_pool,
                # A session pod's requests, small enough for 100 sessions on a hollow node (1 CPU, 3.75 GiB).
                "resources": {"requests": {"cpu": "5m", "memory": "16Mi"}, "limits": {"memory": "256Mi"}}}  # fmt: skip
        return yaml.safe_dump({"profiles": {PROFILE: demo}})

    async def start_operator(self, kubeconfig: Path | None = None) -> None:
        self.operator_metrics = free_port()
        env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig or self.cp.token_kubeconfig(NAMESPACE, "pier-operator")),
            "PIER_NAMESPACE": NAMESPACE,
            "PIER_PROFILES_INLINE": self._catalog(),
            "PIER_BRIDGE_IMAGE": "pier-hollow:none",  # never pulled: hollow pods run nothing
            "PIER_METRICS_PORT": str(self.operator_metrics),
            "PIER_LOG_LEVEL": "WARNING",
            "PIER_LEASE_DURATION_S": "10",
            **PROBES,
        }
        self.procs["operator"] = await spawn(
            "operator", [sys.executable, "-m", "pier.cli", "operator", "--health-port", "0"], self.work / "logs", env
        )
        await wait_http(f"http://127.0.0.1:{self.operator_metrics}/metrics", self.procs["operator"], timeout=120)

    async def start_router(self) -> None:
        self.router_port = free_port()
        env = {
            **os.environ,
            "PIER_BACKEND": "kubernetes",
            "PIER_NAMESPACE": NAMESPACE,
            "PIER_KUBECONFIG": str(self.cp.token_kubeconfig(NAMESPACE, "pier-router")),
            "PIER_REDIS_URL": self.redis.url,
            "PIER_PROFILES_INLINE": self._catalog(),
            "PIER_PORT": str(self.router_port),
            "PIER_LOG_LEVEL": "WARNING",
            "PIER_AUDIT_LOG": "false",
        }
        self.procs["router"] = await spawn(
            "router", [sys.executable, "-m", "pier.cli", "router"], self.work / "logs", env
        )
        await wait_http(f"http://127.0.0.1:{self.router_port}/healthz", self.procs["router"], timeout=120)

    async def teardown(self) -> None:
        with contextlib.suppress(Exception):
            await self.observer.stop()
        for proc in self.procs.values():
            await proc.stop()
        with contextlib.suppress(Exception):
            await self.redis.__aexit__(None, None, None)
        for part in ("nodes", "bridge", "scheduler"):
            with contextlib.suppress(Exception):
                await asyncio.to_thread(getattr(self, part).stop)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.cp.stop)

    # -- applying sessions --------------------------------------------------------------------------------

    def _bodies(self, count: int, ttl_s: int = 3600, spec: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        profile = Profile(name=PROFILE, command=["x"])
        bodies = []
        for _ in range(count):
            user = f"u{self.users:06d}"
            self.users += 1
            body = new_session(user, profile, ttl_s)
            body["spec"].update(spec or {})
            bodies.append(body)
        return bodies

    async def apply(self, bodies: list[dict[str, Any]], per_s: float, concurrency: int = 32) -> list[str]:
        """Create every MCPSession, `per_s` a second at most (as `kubectl apply` of many users would)."""
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{NAMESPACE}/{PLURAL}"
        slots = asyncio.Semaphore(concurrency)
        start = time.monotonic()
        failures: list[str] = []

        async def create(body: dict[str, Any]) -> None:
            try:
                self.observer.of(body["metadata"]["name"]).applied = _now()
                status, answer = await self.admin.request("POST", path, body)
                if status not in (200, 201):
                    failures.append(f"{status}: {str(answer)[:200]}")
            finally:
                slots.release()

        tasks = []
        for i, body in enumerate(bodies):
            await asyncio.sleep(max(0.0, start + i / per_s - time.monotonic()))
            await slots.acquire()
            tasks.append(asyncio.create_task(create(body)))
        await asyncio.gather(*tasks)
        if failures:
            raise RuntimeError(f"{len(failures)} creates failed, e.g. {failures[0]}")
        return [b["metadata"]["name"] for b in bodies]

    async def wait_ready(self, names: list[str], timeout: float, what: str) -> float:
        started = time.monotonic()
        while (ready := self.observer.ready(names)) < len(names):
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"{what}: {ready} of {len(names)} Ready after {timeout:.0f} s")
            self._check_alive()
            await asyncio.sleep(1)
        return time.monotonic() - started

    async def sample(self, seconds: float) -> dict[str, float]:
        """CPU (% of one core) of the cluster's parts over `seconds`, and their memory."""
        parts = {"hollow_kubelets": self.nodes.pids(), "kube_apiserver": [self.cp.pids["kube-apiserver"]],
                 "etcd": [self.cp.pids["etcd"]], "controller_manager": [self.cp.pids["kube-controller-manager"]],
                 "scheduler": [self.scheduler.popen.pid], "shared_bridge": self.bridge.pids()}  # fmt: skip
        parts.update({name: [proc.pid] for name, proc in self.procs.items()})
        before = {name: cpu_s(pids) for name, pids in parts.items()}
        await asyncio.sleep(seconds)
        result: dict[str, float] = {}
        for name, pids in parts.items():
            result[f"{name}_cpu_percent"] = round((cpu_s(pids) - before[name]) / seconds * 100, 1)
            result[f"{name}_rss_mib"] = round(rss(pids), 0)
        return result

    def _check_alive(self) -> None:
        for proc in self.procs.values():
            if proc.proc.returncode is not None:
                raise RuntimeError(f"{proc.name} exited ({proc.proc.returncode}):\n{proc.tail()}")

    async def operator_metrics_now(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        async with self.http.get(f"http://127.0.0.1:{self.operator_metrics}/metrics") as response:
            return parse_metrics(await response.text())

    async def apiserver_metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        text = await asyncio.to_thread(lambda: self.cp.kubectl("get", "--raw", "/metrics", timeout=60).stdout)
        return parse_metrics(text)

    # -- phases ---------------------------------------------------------------------------------------------

    async def fill(self) -> list[str]:
        """`sessions - burst` sessions in `steps` equal steps; after each, a minute at rest is measured: how the
        operator's cost and the API server's load grow (or do not) with the sessions."""
        count, steps = self.cfg.sessions - self.cfg.burst, self.cfg.steps
        names: list[str] = []
        cpu0, started = cpu_s([self.procs["operator"].pid]), time.monotonic()
        self.results["ladder"] = []
        for step in range(steps):
            size = count // steps + (1 if step < count % steps else 0)
            log(f"fill {step + 1}/{steps}: {size} sessions at 40/s ({len(names) + size} in all)")
            batch = await self.apply(self._bodies(size), per_s=40)
            await self.wait_ready(batch, timeout=max(900, size / 5), what="fill")
            names += batch
            rest = await self.measure_rest(len(names), 60)
            self.results["ladder"].append(rest)
            log(f"at rest with {len(names)}: {json.dumps(rest)}")
        elapsed = time.monotonic() - started
        self.results["fill"] = {**self.observer.latencies(names), "seconds": round(elapsed, 1),
                                "operator_cpu_s": round(cpu_s([self.procs["operator"].pid]) - cpu0, 1)}  # fmt: skip
        return names

    async def burst(self) -> list[str]:
        count = self.cfg.burst
        log(f"burst: {count} sessions within 10 s (warm pool {self.cfg.warm_pool})")
        before = await self.operator_metrics_now()
        cpu0, started = cpu_s([self.procs["operator"].pid]), time.monotonic()
        names = await self.apply(self._bodies(count), per_s=count / 10, concurrency=64)
        applied_in = time.monotonic() - started
        await self.wait_ready(names, timeout=900, what="burst")
        after = await self.operator_metrics_now()
        self.results["burst"] = {
            **self.observer.latencies(names),
            "applied_within_s": round(applied_in, 1),
            "all_ready_after_s": round(time.monotonic() - started, 1),
            "operator_cpu_s": round(cpu_s([self.procs["operator"].pid]) - cpu0, 1),
            "warm_pool_claims": total(after, "pier_operator_pool_claims_total")
            - total(before, "pier_operator_pool_claims_total"),
            "warm_pool_misses": total(after, "pier_operator_pool_misses_total")
            - total(before, "pier_operator_pool_misses_total"),
        }
        log(f"burst: all Ready after {self.results['burst']['all_ready_after_s']} s")
        return names

    async def steady(self, sessions: int) -> None:
        seconds = self.cfg.steady_s
        log(f"steady: {sessions} sessions, nothing happening, {seconds:.0f} s")
        self.results["steady_parts"] = await self.sample(60)
        self.results["steady"] = await self.measure_rest(sessions, seconds)
        log(f"steady: {json.dumps(self.results['steady'])}")

    async def measure_rest(self, sessions: int, seconds: float) -> dict[str, Any]:
        """`seconds` with nothing happening: the operator's and router's cost and the API server's count."""
        await asyncio.sleep(15)  # the last writes settle
        op, router = self.procs["operator"].pid, self.procs["router"].pid
        api0, ours0, cpu0 = await self.apiserver_metrics(), await self.operator_metrics_now(), cpu_s([op])
        router_cpu0, nodes_cpu0, t0 = cpu_s([router]), cpu_s(self.nodes.pids()), time.monotonic()
        await asyncio.sleep(seconds)
        api1, ours1, cpu1 = await self.apiserver_metrics(), await self.operator_metrics_now(), cpu_s([op])
        minutes = (time.monotonic() - t0) / 60
        flows = {}
        for component in ("operator", "router"):
            name, schema = "apiserver_flowcontrol_dispatched_requests_total", f"pier-{component}"
            count = total(api1, name, flow_schema=schema) - total(api0, name, flow_schema=schema)
            flows[component] = {"per_min": round(count / minutes, 1),
                                "per_session_per_min": round(count / minutes / sessions, 5)}  # fmt: skip
        verbs: dict[str, float] = {}
        for labels, value in ours1.get("pier_operator_api_requests_total", []):
            before = total(ours0, "pier_operator_api_requests_total", verb=labels["verb"], code=labels["code"])
            if value - before:
                verbs[labels["verb"]] = round(verbs.get(labels["verb"], 0) + (value - before) / minutes, 1)
        passes = total(ours1, "pier_operator_pass_seconds_count") - total(ours0, "pier_operator_pass_seconds_count")
        pass_time = total(ours1, "pier_operator_pass_seconds_sum") - total(ours0, "pier_operator_pass_seconds_sum")
        asks = total(ours1, "pier_operator_bridge_status_requests_total") - \
            total(ours0, "pier_operator_bridge_status_requests_total")  # fmt: skip
        all_requests = total(api1, "apiserver_request_total") - total(api0, "apiserver_request_total")
        return {
            "sessions": sessions,
            "minutes": round(minutes, 2),
            "apiserver_requests_by_flow_schema": flows,
            "apiserver_requests_all_per_min": round(all_requests / minutes, 1),
            "operator_requests_per_min_by_verb": verbs,
            "operator_cpu_percent": round((cpu1 - cpu0) / (minutes * 60) * 100, 2),
            "operator_rss_mib": round(rss([op]), 1),
            "operator_pass_mean_s": round(pass_time / passes, 4) if passes else None,
            "operator_pass_max_bucket_s": _largest_bucket(ours1, "pier_operator_pass_seconds_bucket"),
            "bridge_status_requests_per_s": round(asks / (minutes * 60), 2),
            "router_cpu_percent": round((cpu_s([router]) - router_cpu0) / (minutes * 60) * 100, 2),
            "router_rss_mib": round(rss([router]), 1),
            "hollow_nodes_cpu_percent": round((cpu_s(self.nodes.pids()) - nodes_cpu0) / (minutes * 60) * 100, 1),
            "hollow_nodes_rss_mib": round(rss(self.nodes.pids()), 0),
            "apiserver_rss_mib": round(rss([self.cp.pids["kube-apiserver"]]), 0),
            "etcd_rss_mib": round(rss([self.cp.pids["etcd"]]), 0),
        }

    async def router_calls(self, names: list[str], users: int = 50, calls: int = 500) -> None:
        log("router: warm calls with every session in its watch")
        base = f"http://127.0.0.1:{self.router_port}/v1/users"
        chosen = random.sample(range(self.users), k=min(users, self.users))
        chosen = [u for u in chosen if self.observer.of(session_name(f"u{u:06d}", PROFILE)).ready][:users]

        async def call(user: int) -> float:
            started = time.perf_counter()
            async with self.http.post(f"{base}/u{user:06d}/servers/{PROFILE}/tools/echo/call",
                                      json={"arguments": {"message": "hi"}}) as response:  # fmt: skip
                body = await response.json()
                assert response.status == 200, body
            return (time.perf_counter() - started) * 1000

        first = [await call(u) for u in chosen]  # each user's first call through this router: its tools fetched
        warm = [await call(chosen[i % len(chosen)]) for i in range(calls)]
        self.results["router"] = {
            "sessions_in_watch": len(names),
            "rss_mib": round(rss([self.procs["router"].pid]), 1),
            "first_call_ms": summary(first),
            "warm_call_ms": summary(warm),
        }
        log(f"router: {json.dumps(self.results['router'])}")

    async def reaping(self) -> None:
        count, ttl = self.cfg.reap_count, self.cfg.reap_ttl_s
        log(f"reaping: {count} sessions with ttlSeconds {ttl}")
        names = await self.apply(self._bodies(count, ttl_s=ttl), per_s=50)
        await self.wait_ready(names, timeout=600, what="reaping sessions")
        started = time.monotonic()
        while any(not self.observer.of(n).deleted for n in names) and time.monotonic() - started < ttl + 300:  # noqa: ASYNC110
            await asyncio.sleep(1)
        late = []
        for name in names:
            seen = self.observer.of(name)
            if seen.deleted:
                late.append(seen.deleted - (seen.ready + ttl))
        self.results["reaping"] = {"sessions": count, "ttl_s": ttl, "reaped": len(late),
                                   "late_after_ttl_s": summary(late)}  # fmt: skip
        log(f"reaping: {json.dumps(self.results['reaping'])}")

    async def node_loss(self) -> None:
        by_node: dict[str, list[str]] = {}
        for name, seen in self.observer.seen.items():
            if seen.was_ready and not seen.deleted and seen.nodes:
                by_node.setdefault(list(seen.nodes.values())[-1], []).append(name)
        node = max(by_node, key=lambda n: len(by_node[n]))
        victims = by_node[node]
        log(f"node loss: silencing {node} ({len(victims)} sessions)")
        for name in victims:
            self.observer.of(name).ready_again.clear()
        silenced = _now()
        self.nodes.silence(node)
        try:
            started = time.monotonic()
            while time.monotonic() - started < 300:
                moved = [n for n in victims if self.observer.of(n).ready_again]
                if len(moved) == len(victims):
                    break
                await asyncio.sleep(1)
        finally:
            self.nodes.revive(node)
        moved_s = [self.observer.of(n).ready_again[0] - silenced for n in victims if self.observer.of(n).ready_again]
        elsewhere = sum(1 for n in victims if list(self.observer.of(n).nodes.values())[-1] != node)
        self.results["node_loss"] = {
            "node": node, "sessions": len(victims), "ready_again": len(moved_s), "on_another_node": elsewhere,
            "silenced_to_ready_again_s": summary(moved_s),
        }  # fmt: skip
        log(f"node loss: {json.dumps(self.results['node_loss'])}")

    async def faults(self) -> None:
        size = self.cfg.fault_burst
        # A clean burst and a burst with bad sessions mixed in, the same size: the good ones' latency side by side.
        clean = await self.apply(self._bodies(size), per_s=size / 10, concurrency=64)
        await self.wait_ready(clean, timeout=600, what="clean burst")
        good = self._bodies(size)
        bad = self._bodies(size // 5, spec={"server": {"profile": "nope"}})  # an unknown profile
        invalid = self._bodies(
            size // 10, spec={"server": {"profile": PROFILE, "resources": {"limits": {"cpu": "lots"}}}}
        )
        mixed = good + bad + invalid
        random.shuffle(mixed)
        await self.apply(mixed, per_s=len(mixed) / 10, concurrency=64)
        good_names = [b["metadata"]["name"] for b in good]
        await self.wait_ready(good_names, timeout=600, what="good sessions among bad ones")
        failed = await self._phases([b["metadata"]["name"] for b in bad + invalid])
        self.results["bad_input"] = {
            "clean_burst": self.observer.latencies(clean),
            "good_among_bad": self.observer.latencies(good_names),
            "bad_sessions": len(bad) + len(invalid),
            "bad_sessions_failed": failed.get("Failed", 0),
        }
        log(f"bad input: {json.dumps(self.results['bad_input'])}")
        await self.restart_mid_burst(size)
        await self.api_outage(size // 5)

    async def _phases(self, names: list[str]) -> dict[str, int]:
        await asyncio.sleep(10)
        phases: dict[str, int] = {}
        for name in names:
            obj = self.observer.sessions.get(name) or {}
            phase = (obj.get("status") or {}).get("phase") or "none"
            phases[phase] = phases.get(phase, 0) + 1
        return phases

    async def restart_mid_burst(self, size: int) -> None:
        log(f"faults: the operator killed in the middle of a burst of {size}")
        bodies = self._bodies(size)
        applying = asyncio.create_task(self.apply(bodies, per_s=size / 10, concurrency=64))
        await asyncio.sleep(5)
        self.procs["operator"].proc.send_signal(signal.SIGKILL)
        await self.procs["operator"].proc.wait()
        killed = time.monotonic()
        await self.start_operator()
        names = await applying
        await self.wait_ready(names, timeout=600, what="burst across an operator restart")
        pods_per_session = [len(self.observer.of(n).pods) for n in names]
        live = await self.admin.checked("GET", f"/api/v1/namespaces/{NAMESPACE}/pods",
                                        params={"labelSelector": SESSION_LABEL})  # fmt: skip
        counts: dict[str, int] = {}
        for pod in live["items"]:
            if not pod["metadata"].get("deletionTimestamp"):
                session = pod["metadata"]["labels"][SESSION_LABEL]
                counts[session] = counts.get(session, 0) + 1
        self.results["operator_restart"] = {
            "sessions": len(names),
            "ready": self.observer.ready(names),
            "restart_to_all_ready_s": round(time.monotonic() - killed, 1),
            "pods_ever_created_per_session_max": max(pods_per_session),
            "sessions_with_more_than_one_live_pod": sum(1 for c in counts.values() if c > 1),
            "latency": self.observer.latencies(names),
        }
        log(f"operator restart: {json.dumps(self.results['operator_restart'])}")

    async def api_outage(self, size: int) -> None:
        log(f"faults: the API server answers the operator 429/500 for 30 s while {size} sessions arrive")
        await self.procs.pop("operator").stop()
        async with FaultyApi(self.cp) as proxy:
            await self.start_operator(proxy.kubeconfig(self.cp.token_kubeconfig(NAMESPACE, "pier-operator")))
            await asyncio.sleep(5)
            proxy.fail_for(30)
            fault_started = time.monotonic()
            names = await self.apply(self._bodies(size), per_s=size / 10)
            await asyncio.sleep(max(0.0, 30 - (time.monotonic() - fault_started)))
            ended = time.monotonic()
            await self.wait_ready(names, timeout=600, what="sessions applied during the outage")
            self.results["api_outage"] = {
                "sessions": len(names),
                "ready": self.observer.ready(names),
                "outage_end_to_all_ready_s": round(time.monotonic() - ended, 1),
                "refused_during_outage": {str(k): v for k, v in proxy.answered.items() if k in (429, 500)},
                "pods_ever_created_per_session_max": max(len(self.observer.of(n).pods) for n in names),
            }
            log(f"api outage: {json.dumps(self.results['api_outage'])}")
            await self.procs.pop("operator").stop()
        await self.start_operator()

    # -- the run --------------------------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as self.http:
            try:
                await self.setup()
                names = await self.fill()
                names += await self.burst()
                await self.steady(len(names))
                await self.router_calls(names)
                await self.reaping()
                await self.node_loss()
                if self.cfg.faults:
                    await self.faults()
                ours = await self.operator_metrics_now()
                self.results["operator_final"] = {
                    "rss_mib": round(rss([self.procs["operator"].pid]), 1),
                    "sessions_cached": total(ours, "pier_operator_cached_objects", resource="mcpsessions"),
                    "pods_cached": total(ours, "pier_operator_cached_objects", resource="pods"),
                }
            finally:
                await self.teardown()
        return self.results


def _largest_bucket(families: dict[str, list[tuple[dict[str, str], float]]], name: str) -> float | None:
    """The upper bound of the smallest histogram bucket holding every observation (a bound on the max)."""
    buckets = sorted((float(labels["le"]), value) for labels, value in families.get(name, []))
    count = buckets[-1][1] if buckets else 0
    return next((le for le, value in buckets if value >= count), None)


def _flow_schema(component: str) -> dict[str, Any]:
    """An APF FlowSchema matching one component's ServiceAccount (at the priority level service accounts get
    anyway): the API server's own metrics then count that component's requests apart."""
    return {
        "apiVersion": "flowcontrol.apiserver.k8s.io/v1beta1",
        "kind": "FlowSchema",
        "metadata": {"name": f"pier-{component}"},
        "spec": {
            "priorityLevelConfiguration": {"name": "workload-low"},
            "matchingPrecedence": 500,
            "distinguisherMethod": {"type": "ByUser"},
            "rules": [
                {
                    "subjects": [
                        {
                            "kind": "ServiceAccount",
                            "serviceAccount": {"name": f"pier-{component}", "namespace": NAMESPACE},
                        }
                    ],
                    "resourceRules": [
                        {
                            "verbs": ["*"],
                            "apiGroups": ["*"],
                            "resources": ["*"],
                            "namespaces": ["*"],
                            "clusterScope": True,
                        }
                    ],
                    "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}],
                }
            ],
        },
    }


# -- the report ----------------------------------------------------------------------------------------------


def write_report(results: dict[str, Any], name: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(report(results))
    return RESULTS / f"{name}.md"


def _row(name: str, stats: dict[str, Any]) -> str:
    if not stats.get("n"):
        return f"| {name} | - | - | - |"
    return f"| {name} | {stats['p50']} | {stats['p99']} | {stats['max']} |"


def _pp(stats: dict[str, Any]) -> str:
    """p50 / p99 of a summary."""
    return f"{stats.get('p50', '-')} / {stats.get('p99', '-')}"


def _latency_rows(r: dict[str, Any]) -> list[str]:
    rows = [
        "| phase | sessions | apply→pod | apply→bound | apply→Running | apply→Ready | Ready max | warm pods claimed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for phase in ("fill", "burst"):
        p = r[phase]
        rows.append(
            f"| {phase} | {p['sessions']} | {_pp(p['apply_to_pod_s'])} | {_pp(p['apply_to_bound_s'])} | "
            f"{_pp(p['apply_to_running_s'])} | {_pp(p['apply_to_ready_s'])} | {p['apply_to_ready_s'].get('max')} | "
            f"{p['claimed_warm']} |"
        )
    b = r["burst"]
    per_1000 = b["operator_cpu_s"] / b["sessions"] * 1000
    rows += [
        "",
        f"apply→pod: the operator made (or bound a warm) pod; →bound: the scheduler placed it; →Running: the kubelet "
        f"started it; →Ready: the kubelet's readiness probe passed and the operator wrote Ready (it includes up to "
        f"one probe period, {READINESS_PERIOD_S} s here, 2 s by default: see PROBES in bench/k8s_scale.py).",
        "",
        f"Burst: {b['sessions']} applied within {b['applied_within_s']} s; all Ready after "
        f"{b['all_ready_after_s']} s; warm pool claims {b['warm_pool_claims']:.0f}, misses "
        f"{b['warm_pool_misses']:.0f}; operator CPU {b['operator_cpu_s']} s ({per_1000:.1f} s per 1,000 sessions).",
    ]
    return rows


def _steady_rows(s: dict[str, Any]) -> list[str]:
    n = s["sessions"]
    flows = s["apiserver_requests_by_flow_schema"]
    op, router = flows["operator"], flows["router"]
    return [
        f"## Steady state: {n} sessions, {s['minutes']} minutes of nothing happening",
        "",
        "| what | figure | per 1,000 sessions |",
        "|---|---:|---:|",
        f"| operator API requests/min (API server's count) | {op['per_min']} | "
        f"{op['per_session_per_min'] * 1000:.2f} |",
        f"| router API requests/min (API server's count) | {router['per_min']} | "
        f"{router['per_session_per_min'] * 1000:.2f} |",
        f"| operator requests/min by verb (its count, watches too) | {s['operator_requests_per_min_by_verb']} | |",
        f"| operator CPU (% of a core) | {s['operator_cpu_percent']} | {s['operator_cpu_percent'] / n * 1000:.3f} |",
        f"| operator memory (RSS, MiB) | {s['operator_rss_mib']} | {s['operator_rss_mib'] / n * 1000:.1f} |",
        f"| operator pass over every session (mean s; max ≤ s) | {s['operator_pass_mean_s']}; "
        f"{s['operator_pass_max_bucket_s']} | |",
        f"| bridge status requests (/s) | {s['bridge_status_requests_per_s']} | |",
        f"| router CPU (%), memory (RSS, MiB) | {s['router_cpu_percent']}, {s['router_rss_mib']} | |",
        f"| every API request, all clients (/min) | {s['apiserver_requests_all_per_min']} | |",
        f"| hollow kubelets: CPU (%), memory (MiB) | {s['hollow_nodes_cpu_percent']}, {s['hollow_nodes_rss_mib']} | |",
        f"| kube-apiserver, etcd memory (MiB) | {s['apiserver_rss_mib']}, {s['etcd_rss_mib']} | |",
    ]


def _fault_rows(r: dict[str, Any]) -> list[str]:
    bad, restart, outage = r["bad_input"], r["operator_restart"], r["api_outage"]
    clean, among = bad["clean_burst"]["apply_to_ready_s"], bad["good_among_bad"]["apply_to_ready_s"]
    return [
        "",
        "## Bad input and faults",
        "",
        f"- A clean burst of {bad['clean_burst']['sessions']}: apply→Ready p50 / p99 {_pp(clean)} s. The same with "
        f"{bad['bad_sessions']} bad sessions mixed in (an unknown profile; a spec the API server refuses as a pod): "
        f"the good ones {_pp(among)} s; {bad['bad_sessions_failed']} bad ones Failed with a reason.",
        f"- Operator killed 5 s into a burst of {restart['sessions']}, a new one started: {restart['ready']} Ready "
        f"{restart['restart_to_all_ready_s']} s after the kill; pods ever created per session at most "
        f"{restart['pods_ever_created_per_session_max']}; sessions with two live pods: "
        f"{restart['sessions_with_more_than_one_live_pod']}.",
        f"- API server answering the operator 429/500 for 30 s ({outage['refused_during_outage']}) while "
        f"{outage['sessions']} sessions arrived: {outage['ready']} Ready {outage['outage_end_to_all_ready_s']} s "
        f"after it recovered; pods per session at most {outage['pods_ever_created_per_session_max']}.",
    ]


def _parts_rows(r: dict[str, Any]) -> list[str]:
    idle, steady = r.get("idle", {}), r.get("steady_parts", {})
    names = sorted({k.removesuffix("_cpu_percent") for k in {**idle, **steady} if k.endswith("_cpu_percent")})
    rows = [
        f"## What each part costs: idle cluster, and {r['steady']['sessions']} sessions at rest",
        "",
        "| part | CPU % idle | CPU % at rest | memory MiB idle | memory MiB at rest |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in names:
        rows.append(
            f"| {name} | {idle.get(f'{name}_cpu_percent', '-')} | {steady.get(f'{name}_cpu_percent', '-')} | "
            f"{idle.get(f'{name}_rss_mib', '-')} | {steady.get(f'{name}_rss_mib', '-')} |"
        )
    return rows


def _ladder_rows(r: dict[str, Any]) -> list[str]:
    rows = [
        "## At rest, as sessions are added (a minute each, nothing happening)",
        "",
        "| sessions | operator API req/min (API server) | operator CPU % | operator RSS MiB | pass mean s | "
        "bridge status req/s | router RSS MiB | all API req/min | hollow kubelets CPU % |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rest in [*r.get("ladder", []), r["steady"]]:
        op = rest["apiserver_requests_by_flow_schema"]["operator"]["per_min"]
        rows.append(
            f"| {rest['sessions']} | {op} | {rest['operator_cpu_percent']} | {rest['operator_rss_mib']} | "
            f"{rest['operator_pass_mean_s']} | {rest['bridge_status_requests_per_s']} | {rest['router_rss_mib']} | "
            f"{rest['apiserver_requests_all_per_min']} | {rest['hollow_nodes_cpu_percent']} |"
        )
    for synthetic in r.get("operator_pass", []):
        rows += [
            "",
            f"In-process (bench/operator_pass.py), {synthetic['sessions']} cached sessions with Ready pods: one pass "
            f"{synthetic['pass_seconds']['median']} s (median of 5; the first {synthetic['pass_seconds']['first']} "
            f"s), caches {synthetic['cache_mib']} MiB ({synthetic['per_session_kib']} KiB a session).",
        ]
    return rows


def report(r: dict[str, Any]) -> str:
    meta, reap, loss = r["meta"], r["reaping"], r["node_loss"]
    lines = [
        "# Pier on a simulated cluster (`make k8s-scale`)",
        "",
        f"{meta['date']} · {meta['cpus']} CPUs, {meta['memory_gib']} GiB · {meta['seconds']:.0f} s · "
        f"Pier {meta['commit']} · Kubernetes v1.20.2 (kube-apiserver, controller-manager, scheduler; "
        f"{r['hollow_nodes']['count']} kubemark hollow nodes) · one run on a shared machine",
        "",
        "Every hollow pod's address leads to one real bridge (tests/k8s/hollow.py): what is measured is the "
        "control plane's side (the operator, the router, the API server), not the sessions' own processes.",
        "",
        "## Sessions applied → pod → bound → Ready (seconds, p50 / p99)",
        "",
        *_latency_rows(r),
        "",
        *_steady_rows(r["steady"]),
        "",
        *_ladder_rows(r),
        "",
        f"Operator memory with no session: {r.get('operator_empty_rss_mib')} MiB; router: "
        f"{r.get('router_empty_rss_mib')} MiB.",
        "",
        *_parts_rows(r),
        "",
        "## The router with every session in its watch",
        "",
        "| call | p50 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|",
        _row("a user's first call through this router (its tools fetched)", r["router"]["first_call_ms"]),
        _row("warm call", r["router"]["warm_call_ms"]),
        "",
        f"Router memory with {r['router']['sessions_in_watch']} sessions in its watch: {r['router']['rss_mib']} MiB.",
        "",
        "## Reaping, node loss",
        "",
        f"- {reap['reaped']} of {reap['sessions']} sessions with ttlSeconds {reap['ttl_s']} reaped; late after their "
        f"TTL (s): p50 / p99 {_pp(reap['late_after_ttl_s'])}, max {reap['late_after_ttl_s'].get('max')}.",
        f"- Node {loss['node']} silenced (SIGSTOP) with {loss['sessions']} sessions: {loss['ready_again']} Ready "
        f"again, {loss['on_another_node']} on another node; silenced → Ready again (s): p50 / p99 "
        f"{_pp(loss['silenced_to_ready_again_s'])} (the node controller's grace alone is 40 s).",
    ]
    if "bad_input" in r:
        lines += _fault_rows(r)
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--warm-pool", type=int, default=50)
    parser.add_argument("--steady-s", type=float, default=180)
    parser.add_argument("--steps", type=int, default=4, help="the fill's steps, each followed by a minute at rest")
    parser.add_argument("--no-faults", action="store_true")
    parser.add_argument("--quick", action="store_true", help="10 nodes, 500 sessions: the harness, checked")
    parser.add_argument("--results", default="", help="results' file name (default k8s-scale, k8s-scale-quick)")
    args = parser.parse_args()
    if args.quick:
        args.sessions, args.nodes, args.burst, args.steady_s, args.warm_pool, args.steps = 500, 10, 200, 60, 10, 2
    cfg = Config(
        sessions=args.sessions, nodes=args.nodes, burst=args.burst, warm_pool=args.warm_pool, steady_s=args.steady_s,
        reap_count=100, reap_ttl_s=60, faults=not args.no_faults, fault_burst=max(100, min(500, args.burst // 2)),
        steps=args.steps,
    )  # fmt: skip
    work = ROOT / ".pier" / "k8s-scale"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    log("the operator's pass and caches at 10,000 and 50,000 sessions, in-process (bench/operator_pass.py)")
    synthetic = subprocess.run(
        [sys.executable, "-m", "bench.operator_pass", "--sessions", "10000", "50000"], cwd=ROOT, check=True,
        capture_output=True, text=True,
    ).stdout  # fmt: skip
    name = args.results or ("k8s-scale-quick" if args.quick else "k8s-scale")
    bench = ScaleBench(cfg, work)
    try:
        results = asyncio.run(bench.run())
    except BaseException as exc:  # interrupted, or a phase failed (e.g. sessions not Ready in time)
        # What the phases that ended measured is kept (as JSON only: the report needs every phase).
        RESULTS.mkdir(parents=True, exist_ok=True)
        partial = RESULTS / f"{name}-unfinished.json"
        ended = {"after_s": round(time.monotonic() - started, 1), "why": f"{type(exc).__name__}: {exc}"}
        partial.write_text(json.dumps({**bench.results, "unfinished": ended}, indent=1) + "\n")
        log(f"unfinished: what was measured is in {partial}")
        raise
    results["operator_pass"] = [json.loads(line) for line in synthetic.splitlines() if line.startswith("{")]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout
    results["meta"] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3),
        "seconds": time.monotonic() - started,
        "commit": commit.strip(),
        "python": platform.python_version(),
        "load_after": os.getloadavg(),
    }
    path = write_report(results, name)
    print(path.read_text())
    return 0


def _interrupt(*_: object) -> None:
    """SIGTERM ends the run as Ctrl-C does: every process of it stopped, the host left as it was."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    raise SystemExit(main())
