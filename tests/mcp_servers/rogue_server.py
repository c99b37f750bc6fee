"""A real stdio MCP server (hand-written JSON-RPC, stdlib only) that misbehaves when asked to.

Tools:
- ``echo(message)``   answers normally
- ``deep(levels)``    answers with a result nested `levels` deep (beyond what Pier passes on)
- ``notify(method, params)``  sends that notification (a list change, a resource update), then answers
- ``loose(x)``        answers like echo; its inputSchema is not a valid JSON Schema
- ``meta(sleep_s)``   after `sleep_s` seconds, answers with the request's `params._meta` (JSON text): what a
                      server that traces would read its caller's trace context from

It also takes `resources/subscribe` and `resources/unsubscribe` (and records them for `subscribed`),
refuses tools it does not have, and writes the name of every tool called to stderr.

With ``--strict`` it ends at once when its first request is not ``initialize`` (as some servers do,
rmcp's among them, at a 2026-07-28 probe).

Run: ``python tests/mcp_servers/rogue_server.py`` (from a folder of its own: a script directly in
tests/ would find tests/operator/ before the standard library's operator module).
"""

from __future__ import annotations

import json
import sys
import time

TOOLS = [
    {"name": "echo", "inputSchema": {"type": "object", "properties": {"message": {"type": "string"}}}},
    {"name": "deep", "inputSchema": {"type": "object", "properties": {"levels": {"type": "integer"}}}},
    {"name": "notify", "inputSchema": {"type": "object", "properties": {"method": {"type": "string"}}}},
    {"name": "loose", "inputSchema": {"type": "object", "properties": {"x": {"type": "no-such-type"}}}},
    {"name": "meta", "inputSchema": {"type": "object", "properties": {"sleep_s": {"type": "number"}}}},
]
SUBSCRIBED: set[str] = set()


def nested(levels: int) -> object:
    value: object = "bottom"
    for _ in range(levels):
        value = [value]
    return value


def answer(request: dict) -> dict | None:
    method, params = request.get("method"), request.get("params") or {}
    if "id" not in request:
        return None
    if method == "initialize":
        result = {
            "protocolVersion": params.get("protocolVersion", "2025-11-25"),
            "capabilities": {"tools": {"listChanged": True}, "resources": {"subscribe": True}},
            "serverInfo": {"name": "rogue", "version": "1"},
        }
    elif method == "tools/list":
        result = {"tools": TOOLS}
    elif method == "tools/call" and params.get("name") not in {tool["name"] for tool in TOOLS}:
        return {"jsonrpc": "2.0", "id": request["id"], "error": {"code": -32602, "message": "no such tool"}}
    elif method == "tools/call" and params.get("name") == "deep":
        # Nested under the result: the server's line is valid JSON, just too deep to pass on.
        levels = params["arguments"]["levels"]
        result = {"content": [{"type": "text", "text": "deep"}], "structuredContent": {"v": nested(levels)}}
    elif method in ("resources/subscribe", "resources/unsubscribe"):
        (SUBSCRIBED.add if method == "resources/subscribe" else SUBSCRIBED.discard)(str(params.get("uri")))
        result = {}
    elif method == "tools/call" and params.get("name") == "notify":
        arguments = params["arguments"]
        note = {"jsonrpc": "2.0", "method": arguments["method"], "params": arguments.get("params") or {}}
        sys.stdout.write(json.dumps(note) + "\n")
        result = {"content": [{"type": "text", "text": f"subscribed: {sorted(SUBSCRIBED)}"}]}
    elif method == "tools/call" and params.get("name") == "meta":
        time.sleep(float(params["arguments"].get("sleep_s") or 0))
        result = {"content": [{"type": "text", "text": json.dumps(params.get("_meta") or {})}]}
    elif method == "tools/call":
        result = {"content": [{"type": "text", "text": f"Echo: {params['arguments'].get('message')}"}]}
    else:
        return {"jsonrpc": "2.0", "id": request["id"], "error": {"code": -32601, "message": "no such method"}}
    return {"jsonrpc": "2.0", "id": request["id"], "result": result}


def main() -> None:
    strict = "--strict" in sys.argv[1:]
    for number, line in enumerate(sys.stdin):
        request = json.loads(line)
        if strict and number == 0 and request.get("method") != "initialize":
            print(f"expected initialize, got {request.get('method')}", file=sys.stderr, flush=True)
            sys.exit(3)
        if request.get("method") == "tools/call":
            print(f"call: {request['params'].get('name')}", file=sys.stderr, flush=True)
        response = answer(request)
        if response is not None:
            sys.stdout.write(json.dumps(response) + "\n")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
