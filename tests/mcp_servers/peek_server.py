"""A real stdio MCP server (hand-written JSON-RPC, stdlib only) that tries to get at other sessions.

What a curious or hostile server would do on a shared machine, as tools (each answers with a JSON
object in `structuredContent`):
- ``whoami()``           its uid, gid, pid, HOME, TMPDIR and the process ids it can see
- ``scan(needles)``      every readable ``/proc/<pid>/environ`` and ``cmdline`` searched for the needles
- ``read(path)`` / ``write(path, text)`` / ``listdir(path)``  what the file system lets it do
- ``kill(pid)``          SIGKILL to a process (``-1``: every process it may signal)
- ``stash(text)``        ``text`` written to ``$HOME/stash`` and ``$TMPDIR/stash``
- ``orphan()``           a ``sleep`` that leaves its process group (``setsid``) and outlives the server
- ``crash()``            exits at once with code 3

Stdlib only, so that the system's Python can run it under any uid. Run: ``python3 tests/peek_server.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

TOOLS = [
    {"name": name, "inputSchema": {"type": "object", "properties": properties}}
    for name, properties in {
        "whoami": {},
        "scan": {"needles": {"type": "array", "items": {"type": "string"}}},
        "read": {"path": {"type": "string"}},
        "write": {"path": {"type": "string"}, "text": {"type": "string"}},
        "listdir": {"path": {"type": "string"}},
        "kill": {"pid": {"type": "integer"}},
        "stash": {"text": {"type": "string"}},
        "orphan": {},
        "crash": {},
    }.items()
]


def _attempt(action: Any) -> dict[str, Any]:
    try:
        return {"ok": True, "value": action()}
    except OSError as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc.strerror}"}


def _pids() -> list[int]:
    return sorted(int(name) for name in os.listdir("/proc") if name.isdigit())


def _scan(needles: list[str]) -> dict[str, Any]:
    found: list[dict[str, Any]] = []
    readable = 0
    for pid in _pids():
        for part in ("environ", "cmdline"):
            try:
                with open(f"/proc/{pid}/{part}", "rb") as file:
                    data = file.read()
            except OSError:
                continue
            readable += part == "environ"
            found += [{"pid": pid, "in": part, "needle": n} for n in needles if n and n.encode() in data]
    return {"found": found, "environs_read": readable, "pids_seen": len(_pids())}


def _whoami() -> dict[str, Any]:
    return {
        "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(), "pid": os.getpid(),
        "home": os.environ.get("HOME"), "tmpdir": os.environ.get("TMPDIR"), "pids": _pids(),
    }  # fmt: skip


def _write(path: str, text: str) -> str:
    with open(path, "w") as file:
        file.write(text)
    return path


def _read(path: str) -> str:
    with open(path) as file:
        return file.read()


def _stash(text: str) -> list[str]:
    return [_write(os.path.join(os.environ[var], "stash"), text) for var in ("HOME", "TMPDIR")]


def _orphan() -> int:
    proc = subprocess.Popen(["sleep", "1000"], start_new_session=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    return proc.pid


def call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    if name == "crash":
        sys.stdout.flush()
        os._exit(3)
    actions = {
        "whoami": lambda: _attempt(_whoami),
        "scan": lambda: _scan(arguments.get("needles", [])),
        "read": lambda: _attempt(lambda: _read(arguments["path"])),
        "write": lambda: _attempt(lambda: _write(arguments["path"], arguments.get("text", "x"))),
        "listdir": lambda: _attempt(lambda: sorted(os.listdir(arguments["path"]))),
        "kill": lambda: _attempt(lambda: os.kill(arguments["pid"], signal.SIGKILL)),
        "stash": lambda: _attempt(lambda: _stash(arguments["text"])),
        "orphan": lambda: _attempt(_orphan),
    }
    value = actions[name]()
    return {"content": [{"type": "text", "text": json.dumps(value)}], "structuredContent": value}


def answer(request: dict[str, Any]) -> dict[str, Any] | None:
    method, params = request.get("method"), request.get("params") or {}
    if "id" not in request:
        return None
    if method == "initialize":
        result = {
            "protocolVersion": params.get("protocolVersion", "2025-11-25"),
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "peek", "version": "1"},
        }
    elif method == "tools/list":
        result = {"tools": TOOLS}
    elif method == "tools/call" and params.get("name") in {tool["name"] for tool in TOOLS}:
        result = call(params["name"], params.get("arguments") or {})
    elif method == "ping":
        result = {}
    else:
        return {"jsonrpc": "2.0", "id": request["id"], "error": {"code": -32601, "message": "no such method"}}
    return {"jsonrpc": "2.0", "id": request["id"], "result": result}


def main() -> None:
    for line in sys.stdin:
        response = answer(json.loads(line))
        if response is not None:
            sys.stdout.write(json.dumps(response) + "\n")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
