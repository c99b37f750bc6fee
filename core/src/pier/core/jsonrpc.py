"""JSON-RPC 2.0 framing for MCP messages: classification, errors and fast (de)serialisation.

Messages stay plain dicts on the data path: the bridge only rewrites ids and progress
tokens, so parsing them into models would cost time and lose unknown fields.
"""

from __future__ import annotations

from typing import Any

import orjson

from pier.core.errors import PierError

Message = dict[str, Any]
RequestId = int | str

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# Implementation-defined server errors (-32000..-32099); `data.code` carries Pier's error code.
GATEWAY_ERROR = -32000
REQUEST_CANCELLED = -32800

loads = orjson.loads

# How deeply JSON from outside (callers' bodies and frames, servers' lines) may nest. The parser
# accepts 1024 levels but the serializer writes only 254, so anything deeper could be read and never
# written again (to the server, a job record, a caller): it is refused where it enters.
MAX_DEPTH = 128
_SERIALIZER_DEPTH = 254


class TooDeep(ValueError):
    """JSON nested more deeply than MAX_DEPTH."""

    def __init__(self) -> None:
        super().__init__(f"JSON nested more than {MAX_DEPTH} levels deep")


def parse(raw: bytes | str) -> Any:
    """JSON from outside Pier: ValueError when it is not JSON, TooDeep when it nests too deeply."""
    value = loads(raw)
    data = raw.encode() if isinstance(raw, str) else raw
    # Depth is at most the number of brackets: most bodies are settled without a look at the value.
    if data.count(b"[") + data.count(b"{") > MAX_DEPTH and too_deep(value):
        raise TooDeep()
    return value


def too_deep(value: Any) -> bool:
    """Whether parsed JSON nests more than MAX_DEPTH levels.

    The serializer is asked whether it could write `value` inside (254 - MAX_DEPTH) more levels: in
    C, that is exact and costs a few percent of the parse (walking the value in Python cost three
    times the parse on large bodies).
    """
    if not isinstance(value, dict | list):
        return False
    for _ in range(_SERIALIZER_DEPTH - MAX_DEPTH):
        value = [value]
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError:
        return True
    return False


def dumps(message: Any) -> bytes:
    return orjson.dumps(message)


def is_request(msg: Message) -> bool:
    return "method" in msg and "id" in msg


def is_notification(msg: Message) -> bool:
    return "method" in msg and "id" not in msg


def is_response(msg: Message) -> bool:
    return "method" not in msg and "id" in msg and ("result" in msg or "error" in msg)


def error_response(request_id: RequestId | None, code: int, message: str, data: Any = None) -> Message:
    error: Message = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": request_id, "error": error}


def gateway_error_response(request_id: RequestId | None, err: PierError) -> Message:
    """A JSON-RPC error carrying a Pier error code, for MCP clients."""
    return error_response(request_id, GATEWAY_ERROR, err.message, {"code": err.code, **err.details})


def validate_message(msg: Any) -> str | None:
    """Why `msg` is not a JSON-RPC 2.0 message, or None when it is one."""
    if not isinstance(msg, dict):
        return "a JSON-RPC message must be an object"
    if msg.get("jsonrpc") != "2.0":
        return 'missing "jsonrpc": "2.0"'
    if "method" in msg:
        if not isinstance(msg["method"], str):
            return '"method" must be a string'
        if "params" in msg and not isinstance(msg["params"], dict | list):
            return '"params" must be an object'
    elif not ("result" in msg or "error" in msg):
        return 'a message needs "method", "result" or "error"'
    if "id" in msg and not isinstance(msg["id"], int | str):
        return '"id" must be a string or an integer'
    return None
