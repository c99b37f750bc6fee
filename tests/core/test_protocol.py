"""The 2026-07-28 checks every entry point applies (`pier.core.protocol`), one rule at a time:
the `_meta` envelope, the `Mcp-Method`/`Mcp-Name` headers against the body, the revision, and the
`Mcp-Param-*` headers a tool's schema asks for (`x-mcp-header`)."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from multidict import CIMultiDict

from pier.core.jsonrpc import INVALID_PARAMS, METHOD_NOT_FOUND, PARSE_ERROR
from pier.core.protocol import (
    CLIENT_CAPABILITIES_KEY,
    CLIENT_INFO_KEY,
    HEADER_MISMATCH,
    LOG_LEVEL_KEY,
    MISSING_CAPABILITY,
    MODERN,
    PROTOCOL_VERSION_KEY,
    SUPPORTED_VERSIONS,
    UNSUPPORTED_VERSION,
    Refusal,
    check_param_headers,
    check_request,
    decode_header,
    era_mismatch,
    is_modern_request,
    log_level_allows,
    meta_of,
    param_headers,
    strip_envelope,
)

pytestmark = pytest.mark.unit

CAPABILITIES: dict[str, Any] = {"sampling": {}}


def request(method: str = "tools/call", version: Any = MODERN, **params: Any) -> dict[str, Any]:
    meta = {PROTOCOL_VERSION_KEY: version, CLIENT_CAPABILITIES_KEY: CAPABILITIES, CLIENT_INFO_KEY: {"name": "t"}}
    return {"jsonrpc": "2.0", "id": 1, "method": method, "params": {**params, "_meta": meta}}


def headers(
    version: str | None = MODERN, method: str | None = "tools/call", name: str | None = None
) -> CIMultiDict[str]:
    found: CIMultiDict[str] = CIMultiDict()
    for header, value in (("MCP-Protocol-Version", version), ("Mcp-Method", method), ("Mcp-Name", name)):
        if value is not None:
            found[header] = value
    return found


def refusal(message: dict[str, Any], sent: CIMultiDict[str]) -> Refusal:
    with pytest.raises(Refusal) as caught:
        check_request(message, sent)
    return caught.value


# -- which way a request goes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "modern"),
    [(None, False), ("2025-03-26", False), ("2025-06-18", False), ("2025-11-25", False), (MODERN, True),
     ("2099-01-01", True), ("", True), ("garbage", True)],
)  # fmt: skip
def test_a_request_is_modern_unless_its_header_names_a_handshake_revision(header: str | None, modern: bool) -> None:
    # An unknown revision goes the 2026-07-28 way, where it is refused with the supported list.
    assert is_modern_request(header) is modern


# -- check_request ------------------------------------------------------------------------------


def test_a_well_formed_request_passes_with_its_version_and_capabilities() -> None:
    message = request(name="echo", arguments={})
    assert check_request(message, headers(name="echo")) == (MODERN, CAPABILITIES)


def test_capabilities_that_are_not_an_object_count_as_none() -> None:
    message = request(name="echo")
    message["params"]["_meta"][CLIENT_CAPABILITIES_KEY] = "lots"
    assert check_request(message, headers(name="echo")) == (MODERN, {})


@pytest.mark.parametrize("params", [None, [], {"name": "echo"}, {"name": "echo", "_meta": "x"}])
def test_no_meta_envelope_is_invalid_params(params: Any) -> None:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": 1, "method": "tools/call"}
    if params is not None:
        message["params"] = params
    refused = refusal(message, headers(name="echo"))
    assert refused.code == INVALID_PARAMS
    assert refused.http_status == 400


@pytest.mark.parametrize("missing", [PROTOCOL_VERSION_KEY, CLIENT_CAPABILITIES_KEY])
def test_an_envelope_without_version_or_capabilities_is_invalid_params(missing: str) -> None:
    message = request(name="echo")
    del message["params"]["_meta"][missing]
    refused = refusal(message, headers(name="echo"))
    assert refused.code == INVALID_PARAMS
    assert missing in refused.message


def test_the_version_header_must_match_the_body() -> None:
    refused = refusal(request(name="echo"), headers(version="2026-07-29", name="echo"))
    assert refused.code == HEADER_MISMATCH
    assert "MCP-Protocol-Version" in refused.message


@pytest.mark.parametrize("sent", [None, "tools/list", "TOOLS/CALL"])
def test_the_method_header_must_match_the_body_exactly(sent: str | None) -> None:
    refused = refusal(request(name="echo"), headers(method=sent, name="echo"))
    assert refused.code == HEADER_MISMATCH
    assert "Mcp-Method" in refused.message


@pytest.mark.parametrize(
    ("method", "params", "name"),
    [("tools/call", {"name": "echo"}, "other"), ("tools/call", {"name": "echo"}, None),
     ("prompts/get", {"name": "greet"}, "gree"), ("resources/read", {"uri": "file:///a"}, "file:///b"),
     ("tasks/get", {"taskId": "t1"}, "t2"), ("tasks/update", {"taskId": "t1"}, "T1")],
)  # fmt: skip
def test_the_name_header_must_match_what_the_request_names(
    method: str, params: dict[str, Any], name: str | None
) -> None:
    refused = refusal(request(method, **params), headers(method=method, name=name))
    assert refused.code == HEADER_MISMATCH
    assert "Mcp-Name" in refused.message


@pytest.mark.parametrize(
    ("method", "params", "name"),
    [("resources/read", {"uri": "file:///a"}, "file:///a"), ("tasks/get", {"taskId": "t1"}, "t1"),
     # A tasks method's Mcp-Name is checked when sent (the mcp SDK's clients send none for tasks).
     ("tasks/cancel", {"taskId": "t1"}, None),
     ("tools/list", {}, None), ("tools/list", {}, "ignored"),  # names nothing: the header is not looked at
     ("tools/call", {"name": "héllo"}, "=?base64?" + base64.b64encode("héllo".encode()).decode() + "?=")],
)  # fmt: skip
def test_a_name_header_that_agrees_passes(method: str, params: dict[str, Any], name: str | None) -> None:
    check_request(request(method, **params), headers(method=method, name=name))


@pytest.mark.parametrize("version", ["2025-11-25", "2099-01-01", 20260728, None])
def test_a_revision_pier_does_not_serve_this_way_is_refused_with_the_list(version: Any) -> None:
    message = request(name="echo", version=version)
    sent = headers(version=str(version), name="echo")
    if not isinstance(version, str):
        # Not a string: no header can agree with it, so the mismatch is what a caller is told.
        assert refusal(message, sent).code == HEADER_MISMATCH
        return
    refused = refusal(message, sent)
    assert refused.code == UNSUPPORTED_VERSION
    assert refused.http_status == 400
    assert refused.answer(1)["error"]["data"] == {"supported": list(SUPPORTED_VERSIONS), "requested": version}


def test_the_checks_come_in_the_specs_order() -> None:
    # Everything wrong at once: the envelope is reported first, then the headers, then the version.
    message = request(name="echo", version="2099-01-01")
    del message["params"]["_meta"][CLIENT_CAPABILITIES_KEY]
    assert refusal(message, headers(version="x", method="y", name="z")).code == INVALID_PARAMS
    message = request(name="echo", version="2099-01-01")
    assert refusal(message, headers(version="2099-01-01", method="y", name="z")).code == HEADER_MISMATCH
    assert refusal(message, headers(version="2099-01-01", name="echo")).code == UNSUPPORTED_VERSION


def test_a_refusal_answers_as_json_rpc_with_its_http_status() -> None:
    answer = Refusal(HEADER_MISMATCH, "Header mismatch").answer("r1")
    assert answer == {"jsonrpc": "2.0", "id": "r1", "error": {"code": HEADER_MISMATCH, "message": "Header mismatch"}}
    assert Refusal(METHOD_NOT_FOUND, "no").http_status == 404
    assert Refusal(PARSE_ERROR, "bad").http_status == 400
    assert Refusal(MISSING_CAPABILITY, "cap").http_status == 400
    assert Refusal(-32000, "other").http_status == 400  # a refusal is never a success


# -- header values ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "decoded"),
    [(None, None), ("plain", "plain"), ("=?base64?aMOpbGxv?=", "héllo"), ("=?base64??=", ""),
     ("=?base64?not base64?=", None), ("=?base64?aGk?=", None),  # unpadded: not the canonical form
     ("=?base64?/w==?=", None),  # not UTF-8
     ("=?BASE64?aGk=?=", "=?BASE64?aGk=?="), ("=?base64?aGk=", "=?base64?aGk=")],  # not the encoded form: literal
)  # fmt: skip
def test_header_values_decode_only_in_their_exact_encoded_form(value: str | None, decoded: str | None) -> None:
    assert decode_header(value) == decoded


# -- x-mcp-header parameters --------------------------------------------------------------------


SCHEMA = {
    "type": "object",
    "properties": {
        "region": {"type": "string", "x-mcp-header": "Region"},
        "count": {"type": "integer", "x-mcp-header": "Count"},
        "dry": {"type": "boolean", "x-mcp-header": "Dry-Run"},
        "ratio": {"type": "number", "x-mcp-header": "Ratio"},  # numbers are not mirrored
        "bad": {"type": "string", "x-mcp-header": "not a token"},
        "target": {
            "type": "object",
            "properties": {"zone": {"type": "string", "x-mcp-header": "Zone"}},
        },
        "items": {"type": "array", "items": {"type": "string", "x-mcp-header": "Item"}},  # not through properties
    },
    "x-mcp-header": "Root",  # the schema itself names no argument
}


def test_param_headers_are_found_through_properties_only() -> None:
    found = sorted(param_headers(SCHEMA))
    assert found == [
        (("count",), "Count", "integer"),
        (("dry",), "Dry-Run", "boolean"),
        (("region",), "Region", "string"),
        (("target", "zone"), "Zone", "string"),
    ]
    assert param_headers(None) == param_headers("schema") == param_headers({"properties": []}) == []


ANNOTATED = param_headers(SCHEMA)


def params(**values: str) -> CIMultiDict[str]:
    sent: CIMultiDict[str] = CIMultiDict()
    for name, value in values.items():
        sent.add("Mcp-Param-" + name.replace("_", "-"), value)
    return sent


@pytest.mark.parametrize(
    ("arguments", "sent"),
    [
        ({}, params()),
        ({"region": "eu-west"}, params(Region="eu-west")),
        ({"region": "é"}, params(Region="=?base64?w6k=?=")),
        ({"count": 42}, params(Count="42")),
        ({"count": 42}, params(Count="42.0")),  # integers compare as numbers
        ({"count": 42.0}, params(Count="42")),
        ({"count": -3}, params(Count="-3")),
        ({"dry": True}, params(Dry_Run="true")),
        ({"dry": False}, params(Dry_Run="false")),
        ({"target": {"zone": "b"}}, params(Zone="b")),
        ({"target": "not an object"}, params()),  # the path leads nowhere: no value, no header
        ({"region": {"nested": 1}}, params()),  # an object is never mirrored
        ({"region": None}, params()),
        ({"ratio": 0.5}, params()),
    ],
)
def test_param_headers_that_agree_with_the_arguments_pass(arguments: dict[str, Any], sent: CIMultiDict[str]) -> None:
    check_param_headers(ANNOTATED, arguments, sent)


@pytest.mark.parametrize(
    ("arguments", "sent", "why"),
    [
        ({"region": "eu"}, params(), "is missing but its argument is present"),
        ({}, params(Region="eu"), "is present but its argument is not"),
        ({"region": {"a": 1}}, params(Region="x"), "is present but its argument is not"),
        ({"region": "eu"}, params(Region="us"), "does not match"),
        ({"region": "é"}, params(Region="é"), "carries invalid characters"),
        ({"region": "a\nb"}, params(Region="=?base64?YQpi?="), None),  # encoded, it agrees
        ({"region": "eu"}, params(Region="=?base64?ZXU?="), "does not match"),  # malformed encoding
        ({"count": 42}, params(Count="42.5"), "does not match"),
        ({"count": 42}, params(Count="forty-two"), "does not match"),
        ({"count": True}, params(Count="1"), "does not match"),  # a boolean is not an integer
        ({"dry": True}, params(Dry_Run="True"), "does not match"),
        ({"dry": True}, params(Dry_Run="1"), "does not match"),
        ({"target": {"zone": "b"}}, params(Zone="c"), "does not match"),
    ],
)
def test_param_headers_that_disagree_are_refused(
    arguments: dict[str, Any], sent: CIMultiDict[str], why: str | None
) -> None:
    if why is None:
        check_param_headers(ANNOTATED, arguments, sent)
        return
    with pytest.raises(Refusal) as caught:
        check_param_headers(ANNOTATED, arguments, sent)
    assert caught.value.code == HEADER_MISMATCH
    assert why in caught.value.message


def test_a_param_header_sent_twice_is_refused() -> None:
    sent = params(Region="eu")
    sent.add("Mcp-Param-Region", "eu")
    with pytest.raises(Refusal, match="more than once"):
        check_param_headers(ANNOTATED, {"region": "eu"}, sent)


def test_param_headers_in_a_plain_mapping_are_read_too() -> None:
    check_param_headers(ANNOTATED, {"region": "eu"}, {"Mcp-Param-Region": "eu"})
    with pytest.raises(Refusal):
        check_param_headers(ANNOTATED, {"region": "eu"}, {"Mcp-Param-Region": ""})


def test_arguments_that_are_not_an_object_have_no_values() -> None:
    check_param_headers(ANNOTATED, ["eu"], params())
    with pytest.raises(Refusal, match="present but its argument is not"):
        check_param_headers(ANNOTATED, "eu", params(Region="eu"))


# -- envelopes and log levels -------------------------------------------------------------------


def test_strip_envelope_removes_only_the_envelope() -> None:
    message = request(name="echo")
    message["params"]["_meta"]["progressToken"] = 5
    message["params"]["_meta"][LOG_LEVEL_KEY] = "info"
    stripped = strip_envelope(message)
    assert stripped["params"] == {"name": "echo", "_meta": {"progressToken": 5}}
    assert PROTOCOL_VERSION_KEY in message["params"]["_meta"]  # the original is untouched
    bare = strip_envelope(request(name="echo"))
    assert bare["params"] == {"name": "echo"}  # an envelope alone leaves no empty _meta behind
    untouched = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    assert strip_envelope(untouched) is untouched


def test_meta_of_is_always_a_dict() -> None:
    assert meta_of({"params": {"_meta": {"a": 1}}}) == {"a": 1}
    messages: list[dict[str, Any]] = [{}, {"params": []}, {"params": {"_meta": None}}, {"params": {"_meta": [1]}}]
    for message in messages:
        assert meta_of(message) == {}


@pytest.mark.parametrize(
    ("wanted", "level", "passes"),
    [(None, "emergency", False), ("debug", "debug", True), ("info", "debug", False), ("info", "info", True),
     ("warning", "error", True), ("emergency", "alert", False), ("error", "unheard-of", True),
     ("not-a-level", "info", True)],
)  # fmt: skip
def test_log_levels_pass_at_or_above_what_was_asked(wanted: str | None, level: str, passes: bool) -> None:
    assert log_level_allows(wanted, level) is passes


# -- a handshake-era request whose body claims another era ------------------------------------------


@pytest.mark.parametrize("header", [None, "2025-03-26", "2025-11-25"])
def test_a_body_that_claims_2026_under_a_handshake_header_is_a_header_mismatch(header: str | None) -> None:
    refused = era_mismatch(request("tools/call", name="echo"), header)
    assert refused is not None
    assert refused.code == HEADER_MISMATCH
    assert MODERN in refused.message
    # In a batch too.
    assert era_mismatch([{"jsonrpc": "2.0", "method": "notifications/initialized"}, request()], header) is not None


@pytest.mark.parametrize(
    "message",
    [{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo"}},  # no envelope
     request("initialize"),  # initialize is no 2026-07-28 request whatever it carries
     {"jsonrpc": "2.0", "id": 1, "result": {}}, "not a message"],
)  # fmt: skip
def test_handshake_era_bodies_without_a_claim_pass(message: Any) -> None:
    assert era_mismatch(message, "2025-11-25") is None
