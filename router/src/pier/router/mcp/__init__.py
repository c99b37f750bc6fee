"""What enters over MCP: ``relay`` (a session's Streamable HTTP endpoint, relayed to its bridge),
``websocket`` (the same session over a WebSocket), ``aggregate`` (`/v1/me/mcp`: every profile behind
one endpoint) and ``tasks`` (MCP tasks: Pier's jobs seen through MCP)."""
