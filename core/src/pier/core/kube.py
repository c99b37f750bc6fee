"""The Kubernetes API without blocking the loop: where it is and how to authenticate (`ApiAccess`), requests
that ride out an API server's bad minutes (`KubeClient`), and informers (`Informer`): a resource's objects
held in memory from one list and a watch, as client-go's informers hold them.

Router and operator read the cluster from informers, so what they do per request or per pass costs no API
call; they call the API only to change something. `KubeClient` retries what is worth retrying (429 with its
`Retry-After`, 5xx, a dropped connection) for a bounded time, and can hold its rate of requests under a
budget (client-go's QPS and burst), so a burst of work never floods an API server that is already busy.

The `kubernetes` package (the `kube` extra of pier-core) is used only to read kubeconfigs and in-cluster
credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlencode

import aiohttp

from pier.core.errors import PierError
from pier.core.jsonrpc import dumps, loads

log = logging.getLogger("pier.kube")

Obj = dict[str, Any]
JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
_RETRIED = frozenset({429, 500, 502, 503, 504})


class ApiAccess:
    """Where the API server is and how to authenticate (in-cluster, or a kubeconfig)."""

    def __init__(self, kubeconfig: Path | None = None) -> None:
        from kubernetes import client, config  # the `kube` extra: only router and operator load it

        self.cfg = client.Configuration()
        if kubeconfig is not None:
            config.load_kube_config(config_file=str(kubeconfig), client_configuration=self.cfg)
        else:
            try:
                config.load_incluster_config(client_configuration=self.cfg)
            except config.ConfigException:
                config.load_kube_config(client_configuration=self.cfg)
        self.ssl = ssl.create_default_context(cafile=self.cfg.ssl_ca_cert)
        if self.cfg.cert_file:
            self.ssl.load_cert_chain(self.cfg.cert_file, self.cfg.key_file)
        if not self.cfg.verify_ssl:
            self.ssl.check_hostname = False
            self.ssl.verify_mode = ssl.CERT_NONE

    @property
    def host(self) -> str:
        return str(self.cfg.host)

    def headers(self) -> dict[str, str]:
        if self.cfg.refresh_api_key_hook is not None:
            self.cfg.refresh_api_key_hook(self.cfg)  # in-cluster tokens rotate
        # The router's HTTP client does not decompress (it relays bodies as they are): ask for plain ones.
        headers = {"Accept-Encoding": "identity"}
        settings = cast(dict[str, dict[str, Any]], self.cfg.auth_settings())
        for setting in settings.values():  # the bearer token, however the client stores it
            if setting.get("in") == "header" and setting.get("value"):
                headers[setting["key"]] = setting["value"]
        return headers


class ApiError(PierError):
    """The API server refused a request, or could not be reached in time."""

    def __init__(self, status: int, message: str, body: Any = None) -> None:
        super().__init__("INTERNAL", message, {"status": status})
        self.status = status
        self.body = body


class TokenBucket:
    """At most `rate` acquisitions a second on average, `burst` at once; rate 0 = unlimited."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, max(burst, 1)
        self._tokens = float(self.burst)
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        if self.rate <= 0:
            return
        async with self._lock:  # one waiter at a time: first come, first served
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            if self._tokens < 1:
                await asyncio.sleep((1 - self._tokens) / self.rate)
                self._stamp = time.monotonic()
                self._tokens = 1.0
            self._tokens -= 1


def retry_after(headers: Any, fallback: float) -> float:
    """The delay a 429 or 503 asks for (`Retry-After` in seconds), or `fallback`; at most 30 s."""
    try:
        return min(max(float(headers.get("Retry-After", "")), 0.0), 30.0)
    except (TypeError, ValueError):
        return fallback


Observer = Callable[[str, int], None]  # (verb, HTTP status or 0 for no answer): counts requests


class KubeClient:
    """JSON requests to the API server, retried through its bad minutes and held under a rate budget.

    `retry_for_s`: how long one request keeps retrying 429, 5xx and lost connections (with backoff and
    jitter; `Retry-After` honoured) before its last answer is returned, or ApiError raised for no answer.
    `qps`/`burst`: the client-side budget of every request but watches (0: none).
    """

    def __init__(
        self,
        http: aiohttp.ClientSession,
        access: ApiAccess,
        *,
        qps: float = 0.0,
        burst: int = 0,
        retry_for_s: float = 10.0,
        observe: Observer | None = None,
    ) -> None:
        self.http = http
        self.access = access
        self.budget = TokenBucket(qps, burst or int(qps * 2))
        self.retry_for_s = retry_for_s
        self.observe = observe or (lambda verb, status: None)

    @property
    def host(self) -> str:
        return self.access.host

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: dict[str, Any] | None = None,
        content_type: str = JSON,
        timeout: float = 15.0,
        verb: str | None = None,
        retry: bool = True,
    ) -> tuple[int, Any]:
        """One request (path relative to the server, or a full URL); (status, decoded body).

        Retried while the answer is 429/5xx or no answer came, for `retry_for_s` (a `retry=False` request is
        sent once). Raises ApiError when no answer came at all.
        """
        url = path if path.startswith("http") else self.host + path
        if params:
            url += ("&" if "?" in url else "?") + urlencode(params)
        data = dumps(body) if body is not None else None
        deadline = time.monotonic() + (self.retry_for_s if retry else 0.0)
        backoff = 0.2
        label = verb or method
        while True:
            await self.budget.acquire()
            try:
                status, headers, answer = await self._send(method, url, data, content_type, timeout)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                self.observe(label, 0)
                if time.monotonic() + backoff > deadline:
                    raise ApiError(0, f"{method} {path}: the API server did not answer ({exc!r})") from exc
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, 5.0)
                continue
            self.observe(label, status)
            if status not in _RETRIED:
                return status, answer
            pause = retry_after(headers, backoff) if status in (429, 503) else backoff
            if time.monotonic() + pause > deadline:
                return status, answer
            await asyncio.sleep(pause * random.uniform(0.75, 1.0))
            backoff = min(backoff * 2, 5.0)

    async def _send(
        self, method: str, url: str, data: bytes | None, content_type: str, timeout: float
    ) -> tuple[int, Any, Any]:
        headers = self.access.headers()
        if data is not None:
            headers["Content-Type"] = content_type
        async with self.http.request(
            method, url, data=data, headers=headers, ssl=self.access.ssl, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as response:
            raw = await response.read()
            try:
                answer = loads(raw) if raw else None
            except ValueError:
                answer = raw.decode(errors="replace")
            return response.status, response.headers, answer

    async def checked(self, method: str, path: str, body: Any = None, ok: Iterable[int] = (), **kwargs: Any) -> Any:
        """A request whose answer must be 2xx (or one of `ok`); the decoded body, ApiError otherwise."""
        status, answer = await self.request(method, path, body, **kwargs)
        if 200 <= status < 300 or status in ok:
            return answer
        raise ApiError(status, f"{method} {path}: HTTP {status}: {_reason(answer)}", answer)

    @contextlib.asynccontextmanager
    async def watch(
        self, path: str, params: dict[str, Any], read_timeout: float
    ) -> AsyncIterator[aiohttp.StreamReader]:
        """A watch stream (not rate-limited: it is one long request); raises ApiError unless it opened."""
        url = f"{self.host}{path}?{urlencode(params)}"
        async with self.http.get(
            url, headers=self.access.headers(), ssl=self.access.ssl,
            timeout=aiohttp.ClientTimeout(total=None, connect=15, sock_read=read_timeout),
        ) as response:  # fmt: skip
            self.observe("WATCH", response.status)
            if response.status != 200:
                raw = await response.read()
                raise ApiError(response.status, f"watch {path}: HTTP {response.status}", _decoded(raw))
            yield response.content


def _decoded(raw: bytes) -> Any:
    try:
        return loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def _reason(answer: Any) -> str:
    if isinstance(answer, dict):
        return str(answer.get("message") or answer.get("reason") or answer)[:500]
    return str(answer)[:500]


def resource_version(obj: Obj | None) -> str:
    return str(((obj or {}).get("metadata") or {}).get("resourceVersion") or "")


def newer(candidate: Obj, current: Obj | None) -> bool:
    """Whether `candidate` is a later version of an object than `current`.

    Resource versions are opaque to clients, but every API server backed by etcd numbers them with etcd's
    revision: compared as numbers when both are, so a watch event older than a write we cached already
    does not roll the cache back; anything else counts as newer.
    """
    new, old = resource_version(candidate), resource_version(current)
    if current is None or not (new.isdigit() and old.isdigit()):
        return True
    return int(new) >= int(old)


Transform = Callable[[Obj], Obj]
Listener = Callable[[str, Obj | None, Obj | None], None]  # (name, before, after): None = absent


class Informer:
    """One resource's objects (of one namespace, or cluster-scoped), kept in `items` by name.

    A paginated list, then a watch from its resource version; bookmarks keep that version fresh, and a
    watch that ends is resumed from it; an expired version (410) or an error means a new list, whose
    differences to the cache are announced like watch events (objects deleted meanwhile included).
    `transform` slims each object before it is kept (memory grows with the number of objects, not
    with their size). Listeners are called synchronously for every change, and must not block.
    """

    def __init__(
        self,
        client: KubeClient,
        path: str,
        *,
        label_selector: str | None = None,
        transform: Transform | None = None,
        page_size: int = 500,
        watch_timeout_s: int = 300,
        name: str = "",
    ) -> None:
        self.client = client
        self.path = path
        self.label_selector = label_selector
        self.transform = transform or slim
        self.page_size = page_size
        self.watch_timeout_s = watch_timeout_s
        self.name = name or path.rsplit("/", 1)[-1]
        self.items: dict[str, Obj] = {}
        self.synced = asyncio.Event()
        self.version = ""
        self.relists = 0
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def get(self, name: str) -> Obj | None:
        return self.items.get(name)

    def put(self, obj: Obj) -> None:
        """An object as our own write returned it: cached now, so what we do next sees what we did."""
        self._apply(self.transform(obj))

    async def run(self) -> None:
        """List and watch until cancelled; trouble means a pause (growing, or as a 429 asks) and a new list."""
        backoff = 0.5
        while True:
            try:
                await self._relist()
                backoff = 0.5
                while await self._watch():
                    pass
            except (ApiError, aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                log.warning("watch interrupted; listing again", extra={"resource": self.name, "error": str(exc)})
                pause = backoff
                if isinstance(exc, ApiError) and exc.status in (429, 503):
                    pause = max(pause, 1.0)
                await asyncio.sleep(pause * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, 10.0)  # back within seconds of an API server's recovery

    def _params(self) -> dict[str, Any]:
        return {"labelSelector": self.label_selector} if self.label_selector else {}

    async def _relist(self) -> None:
        fresh: dict[str, Obj] = {}
        params = {**self._params(), "limit": self.page_size}
        while True:
            listing = await self.client.checked("GET", self.path, params=params, verb="LIST", timeout=60)
            for obj in listing.get("items") or []:
                kept = self.transform(obj)
                fresh[kept["metadata"]["name"]] = kept
            meta = listing.get("metadata") or {}
            if not meta.get("continue"):
                break
            params["continue"] = meta["continue"]
        self.version = str(meta.get("resourceVersion") or "")
        old, self.items = self.items, fresh
        for name in old.keys() - fresh.keys():
            self._announce(name, old[name], None)
        for name, obj in fresh.items():
            if resource_version(old.get(name)) != resource_version(obj):
                self._announce(name, old.get(name), obj)
        self.relists += 1
        self.synced.set()

    async def _watch(self) -> bool:
        """One watch request; True when it ended normally (resume), False when the list must be taken again."""
        timeout = random.randint(self.watch_timeout_s, self.watch_timeout_s * 2)  # replicas do not reconnect at once
        params = {**self._params(), "watch": "1", "allowWatchBookmarks": "true", "timeoutSeconds": str(timeout),
                  "resourceVersion": self.version}  # fmt: skip
        async with self.client.watch(self.path, params, read_timeout=timeout + 30) as lines:
            async for line in lines:
                if not line.strip():
                    continue
                event = loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    log.info("watch expired; listing again", extra={"resource": self.name, "error": obj.get("message")})
                    return False
                version = resource_version(obj)
                if version:
                    self.version = version
                if kind == "DELETED":
                    name = obj["metadata"]["name"]
                    before = self.items.pop(name, None)
                    self._announce(name, before, None)
                elif kind in ("ADDED", "MODIFIED"):
                    self._apply(self.transform(obj))
        return True

    def _apply(self, obj: Obj) -> None:
        name = obj["metadata"]["name"]
        before = self.items.get(name)
        if not newer(obj, before) or (before is not None and resource_version(before) == resource_version(obj)):
            return
        self.items[name] = obj
        self._announce(name, before, obj)

    def _announce(self, name: str, before: Obj | None, after: Obj | None) -> None:
        for listener in self._listeners:
            try:
                listener(name, before, after)
            except Exception:  # one listener's bug must not stop the cache
                log.exception("informer listener failed", extra={"resource": self.name})


_DROPPED_METADATA = ("managedFields", "selfLink")


def slim(obj: Obj) -> Obj:
    """An object without what no reader here uses and what costs most memory (managedFields)."""
    meta = obj.get("metadata") or {}
    if any(key in meta for key in _DROPPED_METADATA):
        obj = {**obj, "metadata": {k: v for k, v in meta.items() if k not in _DROPPED_METADATA}}
    annotations = obj["metadata"].get("annotations") or {}
    if "kubectl.kubernetes.io/last-applied-configuration" in annotations:  # a second copy of the spec
        kept = {k: v for k, v in annotations.items() if k != "kubectl.kubernetes.io/last-applied-configuration"}
        obj["metadata"] = {**obj["metadata"], "annotations": kept}
    return obj
