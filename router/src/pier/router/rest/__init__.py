"""What enters over plain HTTP: ``v1`` (Pier's REST API: servers, tools, calls, sessions, secrets,
jobs), ``bridgekit`` (mcp-bridgekit's API, at the root) and ``dashboard`` (its page and its data)."""
