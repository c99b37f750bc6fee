"""The bridge: owns one stdio MCP server and serves it over HTTP to many clients at once.

Data path: ``mcp_http`` / ``api`` (HTTP) → ``upstream`` (readiness, concurrency, restarts)
→ ``multiplexer`` (id and token rewriting, routing) → ``child`` / ``attach`` (stdio).
"""
