"""Pier's demo MCP server (`demo_server`), used by `pier up`, the README and the tests."""
