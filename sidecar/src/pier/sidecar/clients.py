"""MCP client sessions of the bridge: one per `Mcp-Session-Id`, all sharing the one server."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from pier.core.jsonrpc import Message

log = logging.getLogger("pier.sidecar.clients")

_OUTBOX_SIZE = 1000


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

    def create(self, protocol_version: str, capabilities: dict[str, Any], client_info: dict[str, Any]) -> ClientSession:
        if len(self.sessions) >= self.max_clients:
            self.expire(force_oldest=True)
        session = ClientSession(secrets.token_hex(16), protocol_version, capabilities, client_info)
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
