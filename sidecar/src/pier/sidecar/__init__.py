"""The bridge: owns one stdio MCP server and serves it over HTTP to many clients at once.

Data path: ``mcp_http`` (MCP at ``/mcp``) or ``app`` (the call API, ``calls``) → ``upstream``
(readiness, concurrency, restarts) → ``multiplexer`` (id and token rewriting, routing) →
``child`` / ``attach`` (stdio). ``embedded`` runs it behind a handle in another component's
process; ``main`` is ``pier sidecar``.
"""
