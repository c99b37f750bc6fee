"""The bridge: owns one stdio MCP server and serves it over HTTP to many clients at once.

Data path: ``streamable`` (MCP at ``/mcp``; 2026-07-28 requests by ``stateless``, with
``input_required`` and ``subscriptions``) or ``app`` (the call API, ``call_registry``, arguments
checked by ``schema``) → ``upstream``
(readiness, concurrency, restarts) → ``multiplexer`` (id and token rewriting, routing) →
``child`` / ``attach`` (stdio). ``embedded`` runs it behind a handle in another component's
process; ``main`` is ``pier sidecar``.
"""
