"""A node emulator for the test control plane: a kubelet stand-in, in the tests only.

There is no kubelet (nor container runtime) here, so this registers a Node, binds pending pods
to it, and runs each pod's containers as local processes: init containers first, then the rest,
restarted per `restartPolicy: Always` with a growing delay. Each pod gets its own address in
127.0.0.0/8, so every bridge listens on its real port (8080) as in a cluster, and "0.0.0.0" (every
interface, in a pod) means that address. Volumes are temp dirs (container paths in commands and
env are rewritten to them); `configMap` and `secret` volumes hold their keys as files; env
`valueFrom` secrets and `status.podIP` are resolved, `$(VAR)` references expanded. Readiness
probes (HTTP, TCP) are run, and pod status (phase, IP, conditions, container states, restart
counts) is reported as a kubelet would.

Stand-ins for what a cluster's network would do (there is no kube-proxy, DNS or in-cluster route
to the API server here): a Service's name in a container's env or arguments is replaced by the
address of one of its ready endpoints (Service port = target port is assumed), and a pod whose
ServiceAccount token is mounted gets `KUBECONFIG` pointing at a kubeconfig with that token.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from pier.core.jsonrpc import dumps, loads
from pier.core.process import die_with_parent
from pier.router.backends.kubernetes import ApiAccess

_RESTART_MAX_S = 10.0
_TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


@dataclass
class Container:
    spec: dict[str, Any]
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    ready: bool = False
    waiting: str | None = "ContainerCreating"
    task: asyncio.Task[None] | None = None


@dataclass
class RunningPod:
    namespace: str
    name: str
    uid: str
    ip: str
    workdir: Path
    labels: dict[str, str] = field(default_factory=dict)
    containers: dict[str, Container] = field(default_factory=dict)
    initialized: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class NodeEmulator:
    def __init__(self, kubeconfig: Path, namespace: str, workdir: Path, node_name: str = "pier-test-node") -> None:
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.workdir = workdir
        self.node_name = node_name
        self.pods: dict[str, RunningPod] = {}
        # A random /16 of loopback per emulator, so leftovers of another run never hold our addresses.
        first = random.randint(10, 250)
        self._ips = (f"127.{first}.{a}.{b}" for a, b in itertools.product(range(1, 250), range(2, 250)))
        self._watcher: asyncio.Task[None] | None = None
        self.http: aiohttp.ClientSession
        self.api: ApiAccess

    async def start(self) -> None:
        """`kubeconfig` should be an admin one: the emulator plays the kubelet."""
        self.api = await asyncio.to_thread(ApiAccess, self.kubeconfig)
        self.http = aiohttp.ClientSession()
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.node_name, "labels": {"kubernetes.io/hostname": self.node_name}},
        }
        await self._call("POST", "/api/v1/nodes", node, ok=(201, 409))
        status = {
            "status": {
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "emulated"}],
                "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
                "capacity": {"cpu": "8", "memory": "32Gi", "pods": "500"},
                "allocatable": {"cpu": "8", "memory": "32Gi", "pods": "500"},
            }
        }
        await self._call("PATCH", f"/api/v1/nodes/{self.node_name}/status", status, merge=True)
        self._watcher = asyncio.create_task(self._watch_forever())

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        await asyncio.gather(*(self._kill_pod(pod) for pod in list(self.pods.values())))
        await self.http.close()

    # -- the API ---------------------------------------------------------------------------

    async def _call(
        self, method: str, path: str, body: Any = None, ok: tuple[int, ...] = (200, 201), merge: bool = False
    ) -> Any:
        content_type = "application/merge-patch+json" if merge else "application/json"
        async with self.http.request(
            method, self.api.cfg.host + path, data=dumps(body) if body is not None else None,
            headers={**self.api.headers(), "Content-Type": content_type}, ssl=self.api.ssl,
        ) as response:  # fmt: skip
            raw = await response.read()
            if response.status not in ok and response.status != 404:
                raise RuntimeError(f"{method} {path}: HTTP {response.status}: {raw[:300]!r}")
            return loads(raw) if raw else None

    async def _watch_forever(self) -> None:
        while True:
            try:
                listing = await self._call("GET", f"/api/v1/namespaces/{self.namespace}/pods")
                for pod in listing["items"]:
                    await self._on_pod("ADDED", pod)
                version = listing["metadata"]["resourceVersion"]
                url = f"/api/v1/namespaces/{self.namespace}/pods?watch=1&resourceVersion={version}"
                async with self.http.get(
                    self.api.cfg.host + url, headers=self.api.headers(), ssl=self.api.ssl,
                    timeout=aiohttp.ClientTimeout(total=None),
                ) as response:  # fmt: skip
                    async for line in response.content:
                        event = loads(line)
                        if event.get("type") == "ERROR":
                            break
                        await self._on_pod(event["type"], event["object"])
            except (aiohttp.ClientError, OSError, ValueError):
                await asyncio.sleep(0.2)

    async def _on_pod(self, kind: str, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        key = f"{meta['namespace']}/{meta['name']}"
        running = self.pods.get(key)
        if kind == "DELETED" or meta.get("deletionTimestamp"):
            if running is not None:
                del self.pods[key]
                await self._kill_pod(running)
            if kind != "DELETED":  # confirm the deletion, as a kubelet does once containers are gone
                await self._call(
                    "DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                    {"gracePeriodSeconds": 0}, ok=(200, 202),
                )  # fmt: skip
            return
        if not spec.get("nodeName"):
            binding = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": meta["name"]},
                       "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name}}  # fmt: skip
            await self._call("POST", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/binding",
                             binding, ok=(201, 409))  # fmt: skip
            return
        if spec["nodeName"] != self.node_name or running is not None:
            return
        workdir = Path(tempfile.mkdtemp(prefix=f"{meta['name']}-", dir=self.workdir))
        running = RunningPod(
            meta["namespace"], meta["name"], meta["uid"], next(self._ips), workdir, meta.get("labels") or {}
        )
        self.pods[key] = running
        running.tasks.append(asyncio.create_task(self._run_pod(running, pod)))

    # -- running a pod ---------------------------------------------------------------------

    async def _run_pod(self, running: RunningPod, pod: dict[str, Any]) -> None:
        spec = pod["spec"]
        volumes = {}
        for volume in spec.get("volumes") or []:
            path = running.workdir / "volumes" / volume["name"]
            path.mkdir(parents=True, exist_ok=True)
            await self._fill_volume(running, volume, path)
            volumes[volume["name"]] = path
        for init in spec.get("initContainers") or []:
            await self._report(running)
            proc = await self._spawn(running, init, volumes)
            if await proc.wait() != 0:
                running.containers[init["name"]] = Container(init, waiting="InitFailed")
                await self._report(running, phase="Failed")
                return
        running.initialized = True
        for container in spec["containers"]:
            entry = Container(container)
            running.containers[container["name"]] = entry
            entry.task = asyncio.create_task(self._keep_running(running, entry, volumes))
            probe = container.get("readinessProbe")
            running.tasks.append(asyncio.create_task(self._probe(running, entry, probe)))
        await self._report(running)

    async def _fill_volume(self, running: RunningPod, volume: dict[str, Any], path: Path) -> None:
        """configMap and secret volumes: one file per key (or per listed item)."""
        if "configMap" in volume:
            source = volume["configMap"]
            obj = await self._call("GET", f"/api/v1/namespaces/{running.namespace}/configmaps/{source['name']}")
            data = {k: v.encode() for k, v in ((obj or {}).get("data") or {}).items()}
        elif "secret" in volume:
            source = volume["secret"]
            obj = await self._call("GET", f"/api/v1/namespaces/{running.namespace}/secrets/{source['secretName']}")
            data = {k: base64.b64decode(v) for k, v in ((obj or {}).get("data") or {}).items()}
        else:
            return
        items = source.get("items") or [{"key": key, "path": key} for key in data]
        for item in items:
            if item["key"] in data:
                (path / item["path"]).write_bytes(data[item["key"]])

    async def service_addresses(self, namespace: str | None = None) -> dict[str, str]:
        """Service name → the address of one ready pod it selects (what cluster DNS + kube-proxy would give).

        Computed here: the endpoints controller can't publish these pods (Endpoints refuse loopback addresses).
        """
        namespace = namespace or self.namespace
        listing = await self._call("GET", f"/api/v1/namespaces/{namespace}/services")
        addresses = {}
        for service in (listing or {}).get("items") or []:
            selector = service["spec"].get("selector") or {}
            for pod in self.pods.values():
                ready = pod.containers and all(c.ready for c in pod.containers.values())
                if selector and ready and pod.namespace == namespace and selector.items() <= pod.labels.items():
                    addresses[service["metadata"]["name"]] = pod.ip
                    break
        return addresses

    async def _resolve_services(self, running: RunningPod, texts: list[str]) -> dict[str, str]:
        """Addresses of the Services these texts name, waiting a while for ones not ready yet."""
        listing = await self._call("GET", f"/api/v1/namespaces/{running.namespace}/services")
        names = [svc["metadata"]["name"] for svc in (listing or {}).get("items") or []]
        wanted = {n for n in names if any(re.search(self._host_pattern(n, running.namespace), t) for t in texts)}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while True:
            addresses = await self.service_addresses(running.namespace)
            if wanted <= addresses.keys() or loop.time() > deadline:
                return {name: addresses[name] for name in wanted if name in addresses}
            await asyncio.sleep(0.5)

    @staticmethod
    def _host_pattern(service: str, namespace: str) -> str:
        return rf"(?<![\w.-]){re.escape(service)}(\.{re.escape(namespace)}(\.svc(\.cluster\.local)?)?)?(?=[:/]|$)"

    async def _keep_running(self, running: RunningPod, entry: Container, volumes: dict[str, Path]) -> None:
        delay = 1.0
        while True:
            entry.proc = await self._spawn(running, entry.spec, volumes)
            entry.waiting = None
            await self._report(running)
            await entry.proc.wait()
            entry.ready = False
            entry.restarts += 1
            entry.waiting = "CrashLoopBackOff"
            await self._report(running)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RESTART_MAX_S)

    async def _spawn(
        self, running: RunningPod, container: dict[str, Any], volumes: dict[str, Path]
    ) -> asyncio.subprocess.Process:
        mounts = {m["mountPath"]: str(volumes[m["name"]]) for m in container.get("volumeMounts") or []}

        def local(text: str) -> str:
            # Only container paths move to the volume's temp dir: a path that exists on this host
            # (the venv's python under /tmp, say) is a host path, not one inside a mount.
            for mount_path, host_path in sorted(mounts.items(), key=lambda m: -len(m[0])):
                inside = text == mount_path or text.startswith(mount_path.rstrip("/") + "/")
                if inside and not os.path.exists(text):
                    return host_path + text[len(mount_path) :]
            return text

        env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

        def expand(text: str) -> str:  # $(VAR): a variable defined before, as Kubernetes does
            return _VAR_REF.sub(lambda m: env.get(m.group(1), m.group(0)), text)

        for item in container.get("env") or []:
            env[item["name"]] = local(expand(await self._env_value(running, item)))
        command = [local(expand(part)) for part in [*(container.get("command") or []), *(container.get("args") or [])]]
        addresses = await self._resolve_services(running, [*env.values(), *command])

        def networked(text: str) -> str:
            if text == "0.0.0.0":  # every interface of a pod is its own address
                return running.ip
            for service, ip in addresses.items():
                text = re.sub(self._host_pattern(service, running.namespace), ip, text)
            return text

        env = {name: networked(value) for name, value in env.items()}
        command = [networked(part) for part in command]
        token_dir = mounts.get(_TOKEN_DIR)
        if token_dir is not None:
            env["KUBECONFIG"] = str(self._token_kubeconfig(Path(token_dir)))
        if command and command[0] == "pier":
            command = [sys.executable, "-m", "pier.cli", *command[1:]]
        log = (running.workdir / f"{container['name']}.log").open("ab")
        try:
            return await asyncio.create_subprocess_exec(
                *command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                cwd=running.workdir, preexec_fn=die_with_parent,
            )  # fmt: skip
        finally:
            log.close()

    def _token_kubeconfig(self, token_dir: Path) -> Path:
        """A kubeconfig with the pod's ServiceAccount token (in place of the in-cluster API route)."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "c", "cluster": {"server": self.api.cfg.host,
                                                   "certificate-authority": str(token_dir / "ca.crt")}}],
            "users": [{"name": "u", "user": {"token": (token_dir / "token").read_text()}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "c",
        }  # fmt: skip
        path = token_dir.parent / "serviceaccount.kubeconfig"
        path.write_text(dumps(config).decode())
        return path

    async def _env_value(self, running: RunningPod, item: dict[str, Any]) -> str:
        if "value" in item:
            return str(item["value"])
        source = item.get("valueFrom") or {}
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            secret = await self._call("GET", f"/api/v1/namespaces/{running.namespace}/secrets/{ref['name']}")
            return base64.b64decode(secret["data"][ref["key"]]).decode()
        if source.get("fieldRef", {}).get("fieldPath") == "status.podIP":
            return running.ip
        return ""

    async def _probe(self, running: RunningPod, entry: Container, probe: dict[str, Any] | None) -> None:
        while True:
            await asyncio.sleep(0.5)
            if entry.proc is None or entry.proc.returncode is not None:
                continue
            ready = probe is None or await self._passes(running, entry.spec, probe)
            if ready != entry.ready:
                entry.ready = ready
                await self._report(running)

    async def _passes(self, running: RunningPod, container: dict[str, Any], probe: dict[str, Any]) -> bool:
        """One readiness check: httpGet or tcpSocket, as a kubelet runs them."""

        def port(value: int | str) -> int:  # a named port is looked up in the container's ports
            named = {p.get("name"): p["containerPort"] for p in container.get("ports") or []}
            return int(named.get(value, value))

        try:
            if "httpGet" in probe:
                get = probe["httpGet"]
                scheme = get.get("scheme", "HTTP").lower()
                url = f"{scheme}://{running.ip}:{port(get['port'])}{get.get('path', '/')}"
                # A kubelet does not verify the pod's certificate either.
                async with self.http.get(url, ssl=False, timeout=aiohttp.ClientTimeout(total=2)) as response:
                    return 200 <= response.status < 400
            if "tcpSocket" in probe:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(running.ip, port(probe["tcpSocket"]["port"])), 2
                )
                writer.close()
                return True
        except (aiohttp.ClientError, OSError, TimeoutError):
            return False
        return True

    async def _report(self, running: RunningPod, phase: str | None = None) -> None:
        containers = list(running.containers.values())
        all_ready = bool(containers) and all(c.ready for c in containers)
        statuses = [
            {
                "name": c.spec["name"],
                "image": c.spec.get("image", ""),
                "imageID": "",
                "ready": c.ready,
                "started": c.waiting is None,
                "restartCount": c.restarts,
                "state": {"waiting": {"reason": c.waiting}} if c.waiting else {"running": {}},
            }
            for c in containers
        ]
        truth = {True: "True", False: "False"}
        status = {
            "status": {
                "phase": phase or "Running",
                "podIP": running.ip,
                "podIPs": [{"ip": running.ip}],
                "hostIP": "127.0.0.1",
                "conditions": [
                    {"type": "Initialized", "status": truth[running.initialized]},
                    {"type": "ContainersReady", "status": truth[all_ready]},
                    {"type": "Ready", "status": truth[all_ready]},
                    {"type": "PodScheduled", "status": "True"},
                ],
                "containerStatuses": statuses,
            }
        }
        with contextlib.suppress(RuntimeError, aiohttp.ClientError, OSError):
            await self._call(
                "PATCH", f"/api/v1/namespaces/{running.namespace}/pods/{running.name}/status", status, merge=True
            )

    async def _kill_pod(self, running: RunningPod) -> None:
        for task in [*running.tasks, *(c.task for c in running.containers.values() if c.task)]:
            task.cancel()
        for container in running.containers.values():
            proc = container.proc
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    await proc.wait()
        shutil.rmtree(running.workdir, ignore_errors=True)

    def kill_container(self, pod_name: str, container: str) -> None:
        """Crash a container (what the tests do to a server)."""
        running = self.pods[f"{self.namespace}/{pod_name}"]
        proc = running.containers[container].proc
        assert proc is not None
        os.killpg(proc.pid, signal.SIGKILL)
