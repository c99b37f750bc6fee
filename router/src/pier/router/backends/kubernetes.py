"""Kubernetes sessions: (user, profile) → an MCPSession, run by the operator as one pod.

A watch keeps every MCPSession of the namespace in memory, so a request costs no API call once
its session is Ready. The first request creates the MCPSession under a deterministic name
(several router replicas racing create it once: the losers get 409 and wait like the winner),
then waits for the operator to report it Ready, or fails with the reason the status gives.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import Any

import aiohttp
from pydantic import ValidationError

from pier.core import tracing
from pier.core.callapi import Endpoint, HttpBridge
from pier.core.catalog import Profile
from pier.core.errors import PierError
from pier.core.kube import ApiAccess, ApiError, Informer, KubeClient, Obj
from pier.core.mcpsession import GROUP, PLURAL, VERSION, MCPSessionStatus, new_session, session_name
from pier.router.accounts.service import Accounts, Credential
from pier.router.accounts.store import KubernetesConnectionStore
from pier.router.backends.base import Session, SessionBackend, SessionKey
from pier.router.config import RouterSettings
from pier.router.metrics import RouterMetrics
from pier.router.usersecrets import KubernetesSecretStore, secret_name

log = logging.getLogger("pier.router.kubernetes")


class KubernetesBackend(SessionBackend):
    def __init__(
        self, settings: RouterSettings, metrics: RouterMetrics, http: aiohttp.ClientSession, bridge_ssl: Any,
        accounts: Accounts | None = None,
    ) -> None:  # fmt: skip
        self.settings = settings
        self.accounts = accounts
        # The upstream token each session's pod was given (its Secret's `token`), by session name.
        self.credentials: dict[str, Credential] = {}
        self.retiring: set[str] = set()  # sessions whose pod has an outdated token variable: replaced once idle
        self._renewer: asyncio.Task[None] | None = None
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
        self.connections = KubernetesConnectionStore(self._request, access.host, self.namespace)
        self.informer = Informer(self.client, self._base, name="mcpsessions")
        self.informer.subscribe(self._seen)
        self._watcher = asyncio.create_task(self.informer.run(), name="pier-k8s-watch")
        if self.accounts is not None:
            self._renewer = asyncio.create_task(self._renew_forever(), name="pier-k8s-tokens")

    async def close(self) -> None:
        for task in (self._watcher, self._renewer):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

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
        with tracing.span("session acquire", attributes={"pier.user": user, "pier.profile": profile.name}) as span:
            return await self._acquire(user, profile, span)

    async def _acquire(self, user: str, profile: Profile, span: tracing.Span) -> Session:
        """The session; `span` learns how it was had: existing (Ready), created (by this request), or
        waited (for a Ready another request asked for)."""
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
        if profile.token_delivery is not None and self.accounts is not None:
            await self._ensure_credential(name, user, profile)
        created = name not in self.objects
        if created:
            await self._create(name, user, profile)
        obj = self.objects.get(name)
        if obj is not None and _status(obj).serving:
            span.set("pier.session.acquired", "created" if created else "existing")
        else:
            span.set("pier.session.acquired", "created" if created else "waited")
            attributes = {"k8s.namespace.name": self.namespace, "pier.mcpsession": name}
            with tracing.span("MCPSession wait Ready", attributes=attributes):
                obj = await self._wait_ready(name, user, profile, created)
        return await self._ready(name, user, profile, obj)

    async def _wait_ready(self, name: str, user: str, profile: Profile, created: bool) -> dict[str, Any]:
        """The MCPSession once the operator reports it Ready; SESSION_START_FAILED when it fails or takes too
        long (counted as a failed start by the request that created it)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.kube_ready_timeout_s
        while True:
            obj = self.objects.get(name)
            status = _status(obj)
            if status.serving and obj is not None:
                return obj
            if status.phase == "Failed":
                self._failed(profile, created)
                raise PierError("SESSION_START_FAILED", status.not_ready_reason(), {"session": name, **_shown(obj)})
            if obj is None and name not in self.objects:
                await self._create(name, user, profile)  # deleted meanwhile: ask again
            remaining = deadline - loop.time()
            if remaining <= 0:
                self._failed(profile, created)
                limit = self.settings.kube_ready_timeout_s
                why = f"session {name} was not Ready within {limit:.0f} s: {status.not_ready_reason()}"
                raise PierError("SESSION_START_FAILED", why, {"session": name, **_shown(obj)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    def _failed(self, profile: Profile, created: bool) -> None:
        if created:
            self.metrics.sessions_failed.labels(profile.name).inc()

    async def _create(self, name: str, user: str, profile: Profile) -> None:
        secrets = secret_name(user, profile.name) if profile.user_secrets else None
        attributes = {"k8s.namespace.name": self.namespace, "pier.mcpsession": name, "http.request.method": "POST"}
        with tracing.span("MCPSession create", "client", attributes) as span:
            # The operator's first reconcile of it joins this trace (an annotation carries the context).
            body = new_session(
                user, profile, profile.idle_ttl_s(self.settings.session_ttl_s), secrets, tracing.current()
            )
            try:
                status, answer = await self._request("POST", self._base, body)
            except ApiError as exc:
                self.metrics.sessions_failed.labels(profile.name).inc()
                raise PierError("SESSION_START_FAILED", f"cannot create MCPSession {name}: {exc.message}") from exc
            span.set("http.response.status_code", status)
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
        self.credentials.pop(name, None)
        self.retiring.discard(name)
        return status in (200, 202)

    # -- users' upstream tokens (the session's pod takes its Secret's `token`: operator/…/pods.py) --

    async def _ensure_credential(self, name: str, user: str, profile: Profile) -> None:
        """The session's Secret holds a valid token before its pod is made (or while it runs); a pod that
        only takes it as a variable is replaced, once idle, to take a new one."""
        assert self.accounts is not None
        held = self.credentials.get(name)
        if held is not None and not held.stale(time.time()):
            return
        credential = await self.accounts.credential(user, profile)  # CONNECTION_REQUIRED without one
        await self._deliver(name, user, profile, held, credential)

    async def _deliver(
        self, name: str, user: str, profile: Profile, held: Credential | None, fresh: Credential
    ) -> None:
        assert self.connections is not None
        if profile.token_exchange is not None and (held is None or held.token != fresh.token):
            await self.connections.deliver(user, profile.name, fresh.token)  # (a connection's store wrote it)
        self.credentials[name] = fresh
        delivery = profile.token_delivery
        if held is not None and held.token != fresh.token and delivery is not None and delivery.file is None:
            self.retiring.add(name)  # (a mounted file is rewritten in place by the kubelet)

    async def _retire_idle(self) -> None:
        """Replace the pods whose token variable is outdated, once nothing runs there."""
        for name in list(self.retiring):
            obj, session = self.objects.get(name), self.sessions.get(name)
            spec = (obj or {}).get("spec") or {}
            if obj is None or not spec.get("userId"):
                self.retiring.discard(name)
                continue
            if session is not None and session.in_flight == 0 and not (await session.bridge.status()).busy:
                self.retiring.discard(name)
                log.info("session restarted for a new token", extra={"session": name})
                await self.end(spec["userId"], (spec.get("server") or {}).get("profile") or "")

    async def _renew_forever(self) -> None:
        """Renew the tokens of the sessions this replica serves before they expire (one replica refreshes
        each: the accounts' lock)."""
        assert self.accounts is not None
        while True:
            await asyncio.sleep(self.settings.reap_interval_s)
            for name, held in list(self.credentials.items()):
                if not held.stale(time.time()):
                    continue
                try:
                    await self._renew_one(name, held)
                except Exception:  # one session's trouble must not stop the others' renewals
                    log.exception("token renewal failed", extra={"session": name})
            try:
                await self._retire_idle()
            except Exception:
                log.exception("replacing sessions for new tokens failed")

    async def _renew_one(self, name: str, held: Credential) -> None:
        assert self.accounts is not None
        spec = (self.objects.get(name) or {}).get("spec") or {}
        profile_name = (spec.get("server") or {}).get("profile")
        user = spec.get("userId")
        if not user or not profile_name:
            self.credentials.pop(name, None)  # the session is gone
            return
        profile = self.accounts.catalog.get(profile_name)
        try:
            fresh = await self.accounts.renew(user, profile, held)
        except PierError as err:
            if err.code == "CONNECTION_REQUIRED":
                await self.end(user, profile_name)  # its token is dead
                return
            fresh = None
        if fresh is None:
            self.credentials[name] = dataclasses.replace(held, renew_at=time.time() + self.settings.reap_interval_s)
            return
        await self._deliver(name, user, profile, held, fresh)

    async def forget(self, session: Session, reason: str) -> None:
        # The operator replaces failed pods; the router only stops trusting this endpoint.
        for name, known in list(self.sessions.items()):
            if known is session:
                del self.sessions[name]
                self.credentials.pop(name, None)


def _status(obj: dict[str, Any] | None) -> MCPSessionStatus:
    """A session's status as the operator wrote it (an unreadable one counts as none yet)."""
    try:
        return MCPSessionStatus.model_validate((obj or {}).get("status") or {})
    except ValidationError:
        return MCPSessionStatus()


def _shown(obj: dict[str, Any] | None) -> dict[str, Any]:
    return {"status": (obj or {}).get("status") or {}}
