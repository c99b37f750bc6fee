"""One router on several processes (`PIER_PROCESSES`): which process serves a user, and how a
connection gets there.

The kernel spreads new connections over the processes, which all listen on one port
(SO_REUSEPORT). A user's local sessions live in exactly one of them, the user's *owner*
(`crc32(user) % N`), so that everything of one user has one home: their sessions and listings, the
restarts their secrets cause, their MCP client sessions and WebSockets, `/v1/me/mcp`.

A request for a user that another process owns is not proxied: its *connection* is handed over. The
process passes the socket itself (SCM_RIGHTS, over the owner's hand-over socket) with the request's
bytes; the owner serves that request and every later one on the keep-alive connection. No second
HTTP hop, and a client that calls for one user pays the hand-over once. What concerns no user (the
catalog, jobs, probes) is served wherever it lands; `/metrics` and the dashboard add up every process.

The supervisor (`pier.cli.supervisor`) starts the processes, each with its index and the run
directory (0700) that holds every process's hand-over socket, its API socket (its app on a Unix
socket: what a process asks its peers) and the metrics files of all (Prometheus' multiprocess mode).
A router serving HTTPS itself runs one process: a TLS session cannot change processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Middleware

from pier.core.errors import PierError
from pier.core.jsonrpc import loads

log = logging.getLogger("pier.router.processes")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_HEADER = 4  # a hand-over message: its length (4 bytes, big-endian), then the request's bytes
_HANDOVER_TIMEOUT_S = 10.0  # only a stalled process takes more than a millisecond
_PEER_TIMEOUT_S = 5.0
# Not replayed: the owner reads a plain body of known length, and has nothing more to promise.
_DROPPED_HEADERS = frozenset({b"content-length", b"transfer-encoding", b"expect"})


class HandedOver(BaseException):
    """The request's connection now belongs to another process: nothing more to do here."""


@dataclass(frozen=True)
class Peers:
    """This process among the router's processes."""

    index: int
    count: int
    run_dir: Path

    def owner(self, user: str) -> int:
        """The process that holds `user`'s sessions."""
        return zlib.crc32(user.encode()) % self.count

    def handover_socket(self, index: int) -> Path:
        return self.run_dir / f"handover-{index}.sock"

    def api_socket(self, index: int) -> Path:
        return self.run_dir / f"api-{index}.sock"

    @property
    def others(self) -> list[int]:
        return [i for i in range(self.count) if i != self.index]


# -- handing a connection over ----------------------------------------------------------------


def request_bytes(request: web.Request, body: bytes) -> bytes:
    """The request as it came on the wire, but with its whole body and its length."""
    head = f"{request.method} {request.raw_path} HTTP/{request.version.major}.{request.version.minor}\r\n"
    headers = b"".join(name + b": " + value + b"\r\n" for name, value in request.raw_headers
                       if name.lower() not in _DROPPED_HEADERS)  # fmt: skip
    return head.encode() + headers + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body


async def hand_over(request: web.Request, peers: Peers, owner: int) -> NoReturn:
    """Give the request's connection to process `owner`; raises HandedOver (or SERVER_UNAVAILABLE)."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if transport is None or sock is None:
        raise PierError("SERVER_UNAVAILABLE", "this connection cannot reach the process serving this user")
    message = request_bytes(request, await request.read())
    # Not one byte more is read here: once the owner answers, the client's next request may come at once, and
    # read by this process it would be lost with this copy of the connection (the owner waits for it in vain).
    reading = transport.is_reading()
    transport.pause_reading()
    fd = os.dup(sock.fileno())
    from pier.router.state import router_of  # (state holds a `Peers`: imported here, not at the top)

    metrics = router_of(request).metrics
    try:
        await asyncio.to_thread(_send, peers.handover_socket(owner), message, fd)
    except OSError as exc:
        if reading:
            transport.resume_reading()  # still this process's connection: it answers the request itself
        metrics.handovers.labels("failed").inc()
        log.warning("hand-over failed", extra={"to": owner, "error": str(exc)})
        raise PierError(
            "SERVER_UNAVAILABLE", "the process serving this user is restarting; retry", {"retry_after_s": 1}
        ) from None
    finally:
        os.close(fd)  # the owner holds its own copy of the socket now
    metrics.handovers.labels("handed").inc()
    # Closing this process's descriptor leaves the connection open: the owner's copy keeps it.
    transport.abort()
    raise HandedOver


def _send(path: Path, message: bytes, fd: int) -> None:
    """One hand-over (blocking, in a thread: a few hundred microseconds, once per connection)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as peer:
        peer.settimeout(_HANDOVER_TIMEOUT_S)
        peer.connect(str(path))
        framed = len(message).to_bytes(_HEADER, "big") + message
        sent = socket.send_fds(peer, [framed[:65536]], [fd])
        if sent < len(framed):  # (never an empty send: the owner may have read all and closed already)
            peer.sendall(framed[sent:])
        # The owner says "k" once it serves the connection; anything else (or nothing) means it does
        # not, and the connection is still this process's to answer.
        if peer.recv(1) != b"k":
            raise ConnectionError("the owner did not take the connection")


class Adopter:
    """Takes the connections the other processes hand over, and serves them with this process's app."""

    def __init__(self, peers: Peers, runner: web.AppRunner) -> None:
        self.peers = peers
        self.runner = runner
        self._listener: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.adopted = 0

    def start(self) -> None:
        path = self.peers.handover_socket(self.peers.index)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # left by this index's predecessor, which died
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(256)
        listener.setblocking(False)
        self._listener = listener
        asyncio.get_running_loop().add_reader(listener.fileno(), self._accept)

    def _accept(self) -> None:
        assert self._listener is not None
        with contextlib.suppress(BlockingIOError):
            conn, _ = self._listener.accept()
            task = asyncio.create_task(self._adopt(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _adopt(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        with conn:
            conn.setblocking(False)
            try:
                async with asyncio.timeout(_HANDOVER_TIMEOUT_S):
                    first, fds = await _recv_with_fds(conn)
                    length = int.from_bytes(first[:_HEADER], "big")
                    message = bytearray(first[_HEADER:])
                    while len(message) < length:
                        chunk = await loop.sock_recv(conn, length - len(message))
                        if not chunk:
                            raise ConnectionError("the hand-over ended early")
                        message += chunk
            except (OSError, TimeoutError, ValueError) as exc:
                log.warning("a hand-over could not be read", extra={"error": str(exc)})
                return
            client = socket.socket(fileno=fds[0])
            client.setblocking(False)
            try:
                transport, protocol = await loop.connect_accepted_socket(self.runner.server, client)  # type: ignore[arg-type]
            except OSError as exc:
                client.close()
                log.warning("a handed-over connection could not be served", extra={"error": str(exc)})
                return  # (no "k": the sender answers the request itself)
            try:
                await loop.sock_sendall(conn, b"k")
            except OSError:  # the sender gave up waiting: it answers the request; this copy must not
                transport.abort()
                return
            self.adopted += 1
            protocol.data_received(bytes(message))

    async def close(self) -> None:
        if self._listener is not None:
            asyncio.get_running_loop().remove_reader(self._listener.fileno())
            self._listener.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _recv_with_fds(conn: socket.socket) -> tuple[bytes, list[int]]:
    """The first bytes of a hand-over and the descriptor sent with them (waiting until they come)."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(conn, 65536 + _HEADER, 1)
        except BlockingIOError:
            ready = loop.create_future()
            loop.add_reader(conn.fileno(), ready.set_result, None)
            try:
                await ready
            finally:
                loop.remove_reader(conn.fileno())
            continue
        if not fds or len(data) < _HEADER:
            for fd in fds:
                os.close(fd)
            raise ValueError("a hand-over without a connection")
        return data, fds


# -- which requests go where ------------------------------------------------------------------


def user_in(request: web.Request, principal_user: str | None) -> str | None:
    """The user a request acts for, when its URL says (or `/v1/me/…`, the caller's own)."""
    user = request.match_info.get("user") or request.match_info.get("user_id")
    if user is None and request.path.startswith("/v1/me/"):
        return principal_user
    return user


async def steer(request: web.Request, peers: Peers, user: str | None) -> None:
    """Return when `user` (if any) is this process's; else hand the connection to its owner."""
    if user is None:
        return
    owner = peers.owner(user)
    if owner != peers.index:
        await hand_over(request, peers, owner)


def steering(peers: Peers, principal_user: Callable[[web.Request], str | None]) -> Middleware:
    """The v1 API's middleware (after identity): a request for another process's user goes there."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        await steer(request, peers, user_in(request, principal_user(request)))
        return await handler(request)

    return middleware


# -- asking the other processes ---------------------------------------------------------------


async def ask_peers(peers: Peers, path: str, headers: dict[str, str]) -> list[Any]:
    """GET `path` (its JSON) from every other process through its API socket; a process that is
    restarting is left out."""

    async def one(index: int) -> Any:
        connector = aiohttp.UnixConnector(path=str(peers.api_socket(index)))
        async with aiohttp.ClientSession(connector=connector) as http:
            url = f"http://process-{index}{path}"
            async with http.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=_PEER_TIMEOUT_S)) as resp:
                resp.raise_for_status()
                return loads(await resp.read())

    answers = await asyncio.gather(*(one(i) for i in peers.others), return_exceptions=True)
    for index, answer in zip(peers.others, answers, strict=True):
        if isinstance(answer, BaseException):
            log.warning("a router process did not answer", extra={"router_process": index, "error": str(answer)})
    return [answer for answer in answers if not isinstance(answer, BaseException)]


@contextlib.asynccontextmanager
async def serving(peers: Peers, runner: web.AppRunner) -> AsyncIterator[None]:
    """This process's other ways in, while it serves: its API socket (its peers ask there) and the
    connections they hand over."""
    api = peers.api_socket(peers.index)
    with contextlib.suppress(FileNotFoundError):
        api.unlink()  # left by this index's predecessor, which died
    await web.UnixSite(runner, str(api)).start()  # stopped with the runner
    adopter = Adopter(peers, runner)
    adopter.start()
    try:
        yield
    finally:
        await adopter.close()
