"""Pier's shared core: what more than one component needs, and nothing component-specific.

Errors and their HTTP statuses (``errors``), JSON-RPC framing (``jsonrpc``), JSON logs (``logs``),
web serving helpers (``web``), TLS (``tls``), child processes (``process``), the profile catalog and
the names it allows (``catalog``), the policy hook and built-in tool rules (``policy``), audit
records (``audit``), and the contracts between components: the bridge's call API and its client
(``callapi``), the MCPSession resource (``mcpsession``), job records and their store (``job``,
``jobstore``), and a raw MCP Streamable HTTP client (``mcp_client``).
"""

__version__ = "0.1.0"
