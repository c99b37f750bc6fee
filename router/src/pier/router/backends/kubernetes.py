"""Kubernetes sessions: (user, profile) → an MCPSession, run by the operator as one pod.

A watch keeps every MCPSession of the namespace in memory, so a request costs no API call once
its session is Ready. The first request creates the MCPSession under a deterministic name
(several router replicas racing create it once: the losers get 409 and wait like the winner),
then waits for the operator to report it Ready, or fails with the reason the status gives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aiohttp
from pydantic import ValidationError

from pier.core.callapi import Endpoint, HttpBridge
from pier.core.catalog import Profile
from pier.core.errors import PierError
from pier.core.kube import ApiAccess, ApiError, Informer, KubeClient, Obj
from pier.core.mcpsession import GROUP, PLURAL, VERSION, MCPSessionStatus, new_session, session_name
from pier.router.backends.base import Session, SessionBackend, SessionKey
from pier.router.config import RouterSettings
from pier.router.metrics import RouterMetrics
from pier.router.usersecrets import KubernetesSecretStore, secret_name

log = logging.getLogger("pier.router.kubernetes")


class KubernetesBackend(SessionBackend):
    def __init__(
        self, settings: RouterSettings, metrics: RouterMetrics, http: aiohttp.ClientSession, bridge_ssl: Any
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.http = http
        self.bridge_ssl = bridge_ssl
        self.namespace = settings.namespace
        self.sessions: dict[str, Session] = {}  # name → the router's view of a Ready session
        self._changed = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self.client: KubeClient
        self.informer: Informer

    @property
    def objects(self) -> dict[str, Obj]:
        """Every MCPSession of the namespace by name, as the watch keeps them (slimmed)."""
        return self.informer.items

    @property
    def _base(self) -> str:
        return f"/apis/{GROUP}/{VERSION}/namespaces/{self.namespace}/{PLURAL}"

    async def start(self) -> None:
        access = await asyncio.to_thread(ApiAccess, self.settings.kubeconfig)
        self.client = KubeClient(self.http, access, retry_for_s=5.0)
        self.secrets = KubernetesSecretStore(self._request, access.host, self.namespace)
        self.informer = Informer(self.client, self._base, name="mcpsessions")
        self.informer.subscribe(self._seen)
        self._watcher = asyncio.create_task(self.informer.run(), name="pier-k8s-watch")

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)

    # -- the cache -------------------------------------------------------------------------

    async def _request(self, method: str, url: str, body: Any = None, timeout: float = 15) -> tuple[int, Any]:
        return await self.client.request(method, url, body, timeout=timeout)  # ApiError when no answer came

    def _seen(self, name: str, before: Obj | None, after: Obj | None) -> None:
        if after is None:
            self.sessions.pop(name, None)
        self._changed.set()
        self._changed = asyncio.Event()

    # -- SessionBackend --------------------------------------------------------------------

    def list(self, user: str | None = None) -> list[Session]:
        result = []
        for name, obj in self.objects.items():
            spec = obj.get("spec") or {}
            if user is not None and spec.get("userId") != user:
                continue
            session = self.sessions.get(name) or Session(
                SessionKey(spec.get("userId", ""), (spec.get("server") or {}).get("profile") or "inline"),
                HttpBridge(self.http, Endpoint("")),  # not Ready yet: listed, never called
            )
            session.state = (_status(obj).phase or "Pending").lower()
            result.append(session)
        return result

    async def acquire(self, user: str, profile: Profile) -> Session:
        try:
            await asyncio.wait_for(self.informer.synced.wait(), self.settings.kube_ready_timeout_s)
        except TimeoutError:
            raise PierError(
                "SESSION_START_FAILED", "the Kubernetes API has not answered (see the router's log)"
            ) from None
        name = session_name(user, profile.name)
        if profile.user_secrets:
            assert self.secrets is not None
            await self.secrets.require(user, profile)
        if name not in self.objects:
            await self._create(name, user, profile)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.kube_ready_timeout_s
        while True:
            obj = self.objects.get(name)
            status = _status(obj)
            if status.serving and obj is not None:
                return await self._ready(name, user, profile, obj)
            if status.phase == "Failed":
                raise PierError("SESSION_START_FAILED", status.not_ready_reason(), {"session": name, **_shown(obj)})
            if obj is None and name not in self.objects:
                await self._create(name, user, profile)  # deleted meanwhile: ask again
            remaining = deadline - loop.time()
            if remaining <= 0:
                limit = self.settings.kube_ready_timeout_s
                why = f"session {name} was not Ready within {limit:.0f} s: {status.not_ready_reason()}"
                raise PierError("SESSION_START_FAILED", why, {"session": name, **_shown(obj)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def _create(self, name: str, user: str, profile: Profile) -> None:
        secrets = secret_name(user, profile.name) if profile.user_secrets else None
        body = new_session(user, profile, profile.idle_ttl_s(self.settings.session_ttl_s), secrets)
        try:
            status, answer = await self._request("POST", self._base, body)
        except ApiError as exc:
            self.metrics.sessions_failed.labels(profile.name).inc()
            raise PierError("SESSION_START_FAILED", f"cannot create MCPSession {name}: {exc.message}") from exc
        if status == 409:
            return  # another router replica (or request) created it first: same session
        if status not in (200, 201):
            self.metrics.sessions_failed.labels(profile.name).inc()
            raise PierError("SESSION_START_FAILED", f"cannot create MCPSession {name} (HTTP {status})",
                            {"answer": answer})  # fmt: skip
        self.metrics.sessions_started.labels(profile.name).inc()
        self.informer.put(answer)
        log.info("MCPSession created", extra={"session": name})

    async def _ready(self, name: str, user: str, profile: Profile, obj: dict[str, Any]) -> Session:
        endpoint = _status(obj).endpoint
        assert endpoint is not None
        session = self.sessions.get(name)
        if session is None or session.endpoint.url != endpoint:
            # A new pod (or the first time): its tools once, then no API or bridge call per request.
            token = self.settings.bridge_token.get_secret_value() if self.settings.bridge_token else None
            bridge = HttpBridge(self.http, Endpoint(endpoint, token), self.bridge_ssl)
            tools = await bridge.tools(self.settings.session_start_timeout_s)
            session = Session(SessionKey(user, profile.name), bridge, {t["name"]: t for t in tools})
            self.sessions[name] = session
        timeout = (obj.get("spec") or {}).get("callTimeoutSeconds")
        session.call_timeout_s = float(timeout) if timeout else None
        return session

    async def end(self, user: str, profile_name: str) -> bool:
        name = session_name(user, profile_name)
        status, _ = await self._request("DELETE", f"{self._base}/{name}")
        self.sessions.pop(name, None)
        return status in (200, 202)

    async def forget(self, session: Session, reason: str) -> None:
        # The operator replaces failed pods; the router only stops trusting this endpoint.
        for name, known in list(self.sessions.items()):
            if known is session:
                del self.sessions[name]


def _status(obj: dict[str, Any] | None) -> MCPSessionStatus:
    """A session's status as the operator wrote it (an unreadable one counts as none yet)."""
    try:
        return MCPSessionStatus.model_validate((obj or {}).get("status") or {})
    except ValidationError:
        return MCPSessionStatus()


def _shown(obj: dict[str, Any] | None) -> dict[str, Any]:
    return {"status": (obj or {}).get("status") or {}}
