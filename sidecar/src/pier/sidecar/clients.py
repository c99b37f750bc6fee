"""MCP client sessions of the bridge: one per `Mcp-Session-Id`, all sharing the one server."""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from pier.core.jsonrpc import Message, dumps

log = logging.getLogger("pier.sidecar.clients")

_OUTBOX_SIZE = 1000
_KEPT_STREAMS = 32  # SSE streams a client may resume (Last-Event-ID), newest kept
_KEPT_EVENTS = 200  # events of one stream kept for replay


@dataclass(eq=False)
class EventStream:
    """One SSE stream of a client: its event ids (`<stream>:<seq>`), what it sent (for replay after
    a dropped connection), and, for a POST's stream, the messages still to come."""

    id: str
    sent: collections.deque[tuple[int, bytes]] = field(default_factory=lambda: collections.deque(maxlen=_KEPT_EVENTS))
    seq: int = 0
    # A POST's stream: its messages, each with whether it is one of the final answers; how many
    # answers are still to come. None for a GET stream (its messages come from the outbox).
    queue: asyncio.Queue[tuple[Message, bool]] | None = None
    waiting: int = 0
    attached: bool = True  # a response is writing it now
    released: asyncio.Event = field(default_factory=asyncio.Event)  # set when that response lets go

    def detach(self) -> None:
        self.attached = False
        self.released.set()

    def event(self, message: Message | None) -> bytes:
        """The next SSE event of this stream (no message: a priming event, an id and empty data)."""
        self.seq += 1
        head = f"id: {self.id}:{self.seq}\n".encode()
        data = head + (b"event: message\ndata: " + dumps(message) + b"\n\n" if message is not None else b"data: \n\n")
        self.sent.append((self.seq, data))
        return data

    def after(self, seq: int) -> list[bytes]:
        return [data for n, data in self.sent if n > seq]


@dataclass(eq=False)
class ClientSession:
    """What the bridge knows of one MCP client: its version, capabilities and GET streams."""

    id: str
    protocol_version: str
    capabilities: dict[str, Any]
    client_info: dict[str, Any]
    created: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    get_streams: int = 0
    # Server-initiated messages for this client's GET stream(s); each goes to one stream only.
    outbox: asyncio.Queue[Message | None] = field(default_factory=lambda: asyncio.Queue(_OUTBOX_SIZE))
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    log_level: str = "debug"  # logging/setLevel: the least severe log record its calls get
    streams: dict[str, EventStream] = field(default_factory=dict)
    _stream_numbers: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def resumable(self) -> bool:
        """Its revision has event ids and Last-Event-ID (2025-11-25, SEP-1699)."""
        return self.protocol_version >= "2025-11-25"

    def new_stream(self, post: bool) -> EventStream:
        stream = EventStream(str(next(self._stream_numbers)), queue=asyncio.Queue() if post else None)
        self.streams[stream.id] = stream
        while len(self.streams) > _KEPT_STREAMS:
            del self.streams[next(iter(self.streams))]
        return stream

    def find_stream(self, last_event_id: str) -> tuple[EventStream, int] | None:
        """The stream a `Last-Event-ID` names, and the last event the client saw on it."""
        stream_id, _, seq = last_event_id.partition(":")
        stream = self.streams.get(stream_id)
        if stream is None or not seq.isdigit():
            return None
        return stream, int(seq)

    def supports(self, capability: str) -> bool:
        return capability in self.capabilities

    def push(self, message: Message | None) -> None:
        """Queue a message for the GET stream; the oldest is dropped when the client lags."""
        if self.outbox.full():
            self.outbox.get_nowait()
            log.warning("client is not reading its GET stream; dropped a message", extra={"client": self.id})
        self.outbox.put_nowait(message)


class ClientRegistry:
    """The live client sessions, with idle expiry and a cap on their number."""

    def __init__(self, max_clients: int, idle_s: float) -> None:
        self.max_clients = max_clients
        self.idle_s = idle_s
        self.sessions: dict[str, ClientSession] = {}

    def create(
        self,
        protocol_version: str,
        capabilities: dict[str, Any],
        client_info: dict[str, Any],
        session_id: str | None = None,
    ) -> ClientSession:
        """A new client session: under a fresh id, or under `session_id` (a session resumed, see
        `StreamableHTTP.resume`; the caller made sure no live session has it)."""
        if len(self.sessions) >= self.max_clients:
            self.expire(force_oldest=True)
        session = ClientSession(session_id or secrets.token_hex(16), protocol_version, capabilities, client_info)
        self.sessions[session.id] = session
        return session

    def get(self, session_id: str) -> ClientSession | None:
        session = self.sessions.get(session_id)
        if session is not None:
            session.last_seen = time.monotonic()
        return session

    def remove(self, session_id: str) -> ClientSession | None:
        session = self.sessions.pop(session_id, None)
        if session is not None:
            session.closed.set()
            for _ in range(session.get_streams):
                session.push(None)  # ends each open GET stream
        return session

    def broadcast(self, message: Message) -> None:
        """Send a server notification to every client that holds a GET stream."""
        for session in self.sessions.values():
            if session.get_streams:
                session.push(message)

    def expire(self, force_oldest: bool = False) -> list[ClientSession]:
        """End sessions idle past the limit (or the least recently seen one, when full)."""
        now = time.monotonic()
        idle = [s for s in self.sessions.values() if not s.get_streams and now - s.last_seen > self.idle_s]
        if force_oldest and not idle and self.sessions:
            idle = [min(self.sessions.values(), key=lambda s: s.last_seen)]
        for session in idle:
            self.remove(session.id)
        return idle

    def close_all(self) -> None:
        for session_id in list(self.sessions):
            self.remove(session_id)
