"""The multiplexer alone: how it rewrites ids and progress tokens between many clients and one server,
and where it routes what the server sends. No server runs here: the "server" is what the multiplexer
writes (`posted`) and what the test feeds back to it (`server_message`), exactly as stdio would."""

from __future__ import annotations

from typing import Any

import pytest

from pier.core.errors import PierError
from pier.core.jsonrpc import GATEWAY_ERROR, METHOD_NOT_FOUND, REQUEST_CANCELLED, Message
from pier.core.protocol import SUBSCRIPTION_ID_KEY
from pier.sidecar.clients import ClientSession
from pier.sidecar.multiplexer import NO_SINK, Multiplexer, Pending

pytestmark = pytest.mark.unit


class Collect:
    """A sink that keeps what it is given."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    def deliver(self, message: Message) -> None:
        self.messages.append(message)


class Wire:
    """The multiplexer and everything it sends: to the server, to every listener, tools changes."""

    def __init__(self) -> None:
        self.posted: list[Message] = []
        self.broadcast: list[Message] = []
        self.tools_changed = 0
        self.mux = Multiplexer(self.posted.append, self.broadcast.append, self._changed)
        self._clock = 0.0

    def _changed(self) -> None:
        self.tools_changed += 1

    def request(
        self, request_id: Any, method: str = "tools/call", client: ClientSession | None = None,
        params: dict[str, Any] | None = None, **options: Any,
    ) -> tuple[Pending, Message, Collect]:  # fmt: skip
        sink = Collect()
        message = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params or {"name": "echo"}}
        pending, outgoing = self.mux.register(message, client, sink, **options)
        # "Newest" is by start time: each request one tick after the last, so ties cannot decide a test.
        self._clock += 1
        pending.started = self._clock
        return pending, outgoing, sink


def client(name: str, capabilities: dict[str, Any] | None = None) -> ClientSession:
    return ClientSession(name, "2025-11-25", capabilities or {}, {"name": name})


async def test_every_request_gets_a_fresh_upstream_id_whatever_its_own() -> None:
    wire = Wire()
    alice, bob = client("alice"), client("bob")
    a, out_a, _ = wire.request(1, client=alice)
    b, out_b, _ = wire.request(1, client=bob)  # the same id from another client
    c, out_c, _ = wire.request("x", client=alice)
    assert len({out_a["id"], out_b["id"], out_c["id"]}) == 3
    assert all(isinstance(o["id"], int) for o in (out_a, out_b, out_c))
    assert (a.original_id, b.original_id, c.original_id) == (1, 1, "x")
    assert out_a["method"] == "tools/call"
    assert out_a["params"] == {"name": "echo"}


async def test_answers_go_back_under_the_callers_own_id_and_never_cross() -> None:
    wire = Wire()
    alice, bob = client("alice"), client("bob")
    a, out_a, _ = wire.request(7, client=alice)
    b, out_b, _ = wire.request(7, client=bob)
    wire.mux.server_message({"jsonrpc": "2.0", "id": out_b["id"], "result": {"for": "bob"}})
    wire.mux.server_message({"jsonrpc": "2.0", "id": out_a["id"], "result": {"for": "alice"}})
    assert a.future.result() == {"jsonrpc": "2.0", "id": 7, "result": {"for": "alice"}}
    assert b.future.result() == {"jsonrpc": "2.0", "id": 7, "result": {"for": "bob"}}
    assert wire.mux.pending == {}


async def test_an_answer_nobody_waits_for_is_dropped() -> None:
    wire = Wire()
    a, _, _ = wire.request(1)
    wire.mux.server_message({"jsonrpc": "2.0", "id": 999, "result": {}})
    wire.mux.server_message({"jsonrpc": "2.0", "id": "not-ours", "result": {}})
    assert not a.future.done()
    assert wire.broadcast == []


async def test_a_callers_progress_token_is_replaced_by_the_upstream_id_and_restored_on_the_way_back() -> None:
    wire = Wire()
    alice, bob = client("alice"), client("bob")
    params: dict[str, Any] = {"name": "slow", "_meta": {"progressToken": "alice-token", "other": 1}}
    a, out_a, sink_a = wire.request(1, client=alice, params=params)
    b, out_b, sink_b = wire.request(1, client=bob, params={"name": "slow", "_meta": {"progressToken": "alice-token"}})
    assert out_a["params"]["_meta"] == {"progressToken": out_a["id"], "other": 1}
    assert params["_meta"]["progressToken"] == "alice-token"  # the caller's message is not changed in place
    progress: dict[str, Any] = {
        "jsonrpc": "2.0",
        "method": "notifications/progress",
        "params": {"progress": 1, "total": 2},
    }
    wire.mux.server_message({**progress, "params": {**progress["params"], "progressToken": out_a["id"]}})
    assert sink_a.messages == [{**progress, "params": {"progress": 1, "total": 2, "progressToken": "alice-token"}}]
    assert sink_b.messages == []  # the same token from bob is another token upstream
    wire.mux.server_message({**progress, "params": {**progress["params"], "progressToken": out_b["id"]}})
    assert sink_b.messages[0]["params"]["progressToken"] == "alice-token"
    assert a.original_token == b.original_token == "alice-token"


async def test_the_call_api_asks_for_progress_under_the_upstream_id() -> None:
    wire = Wire()
    pending, outgoing, sink = wire.request("call-1", track_progress=True)
    assert outgoing["params"]["_meta"] == {"progressToken": outgoing["id"]}
    note = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": outgoing["id"]}}
    wire.mux.server_message(note)
    assert sink.messages == [note]  # no token of the caller's to restore: the upstream one stays
    assert pending.original_token is None


async def test_a_request_without_a_token_is_sent_as_it_came() -> None:
    wire = Wire()
    _, outgoing, _ = wire.request(1, params={"name": "echo", "arguments": {"message": "hi"}})
    assert outgoing["params"] == {"name": "echo", "arguments": {"message": "hi"}}


async def test_progress_for_an_unknown_token_reaches_nobody() -> None:
    wire = Wire()
    _, outgoing, sink = wire.request(1, track_progress=True)
    for token in (outgoing["id"] + 100, "text-token", None):
        wire.mux.server_message(
            {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": token}}
        )
    assert sink.messages == []
    assert wire.broadcast == []


async def test_cancel_tells_the_server_the_upstream_id_and_answers_the_caller_under_its_own() -> None:
    wire = Wire()
    pending, outgoing, _ = wire.request("mine")
    wire.mux.cancel(pending, "enough")
    assert wire.posted == [
        {
            "jsonrpc": "2.0",
            "method": "notifications/cancelled",
            "params": {"requestId": outgoing["id"], "reason": "enough"},
        }
    ]
    answer = pending.future.result()
    assert answer["id"] == "mine"
    assert answer["error"]["code"] == REQUEST_CANCELLED
    wire.mux.cancel(pending, "again")  # already gone: nothing more is sent
    assert len(wire.posted) == 1
    wire.mux.server_message({"jsonrpc": "2.0", "id": outgoing["id"], "result": {}})  # the late answer is dropped
    assert pending.future.result() is answer


async def test_a_clients_cancellation_names_its_own_id_and_reaches_only_its_own_request() -> None:
    wire = Wire()
    alice, bob = client("alice"), client("bob")
    a, out_a, _ = wire.request(5, client=alice)
    b, _, _ = wire.request(5, client=bob)
    cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 5, "reason": "bye"}}
    wire.mux.client_notification(alice, cancel)
    assert wire.posted[-1]["params"] == {"requestId": out_a["id"], "reason": "bye"}
    assert a.future.done()
    assert not b.future.done()
    wire.mux.client_notification(alice, {**cancel, "params": {"requestId": 404}})  # nothing of alice's
    assert len(wire.posted) == 1


async def test_client_notifications_pass_but_the_handshake_ends_at_the_bridge() -> None:
    wire = Wire()
    alice = client("alice")
    wire.mux.client_notification(alice, {"jsonrpc": "2.0", "method": "notifications/initialized"})
    assert wire.posted == []
    roots = {"jsonrpc": "2.0", "method": "notifications/roots/list_changed"}
    wire.mux.client_notification(alice, roots)
    assert wire.posted == [roots]


async def test_server_requests_go_to_the_newest_caller_that_can_take_them() -> None:
    wire = Wire()
    can_sample: dict[str, Any] = {"sampling": {}}
    old, _, old_sink = wire.request(1, client=client("a", can_sample), capabilities=can_sample)
    new, _, new_sink = wire.request(2, client=client("b", can_sample), capabilities=can_sample)
    _, _, cannot_sink = wire.request(3, client=client("c"), capabilities={})  # newest, but cannot sample
    _, _, api_sink = wire.request(4)  # the call API: it can be asked nothing
    sampling = {"jsonrpc": "2.0", "id": "s1", "method": "sampling/createMessage", "params": {}}
    wire.mux.server_message(sampling)
    assert new_sink.messages == [sampling]
    assert old_sink.messages == cannot_sink.messages == api_sink.messages == []
    # A request that needs no capability goes to the newest caller that can be asked anything.
    other = {"jsonrpc": "2.0", "id": "s2", "method": "custom/ask", "params": {}}
    wire.mux.server_message(other)
    assert cannot_sink.messages == [other]
    assert old.future.done() is new.future.done() is False


async def test_a_server_request_nobody_can_take_is_refused_and_ping_is_answered() -> None:
    wire = Wire()
    wire.request(1, client=client("a"), capabilities={})
    wire.mux.server_message({"jsonrpc": "2.0", "id": 9, "method": "elicitation/create", "params": {}})
    assert wire.posted[-1]["id"] == 9
    assert wire.posted[-1]["error"]["code"] == METHOD_NOT_FOUND
    wire.mux.server_message({"jsonrpc": "2.0", "id": 10, "method": "ping"})
    assert wire.posted[-1] == {"jsonrpc": "2.0", "id": 10, "result": {}}


async def test_only_the_client_that_was_asked_may_answer_a_server_request() -> None:
    wire = Wire()
    alice, mallory = client("alice", {"sampling": {}}), client("mallory", {"sampling": {}})
    wire.request(1, client=alice, capabilities=alice.capabilities)
    wire.mux.server_message({"jsonrpc": "2.0", "id": "q", "method": "sampling/createMessage", "params": {}})
    answer = {"jsonrpc": "2.0", "id": "q", "result": {"content": "from mallory"}}
    wire.mux.client_response(mallory, answer)
    assert wire.posted == []
    genuine = {"jsonrpc": "2.0", "id": "q", "result": {"content": "from alice"}}
    wire.mux.client_response(alice, genuine)
    assert wire.posted == [genuine]
    wire.mux.client_response(alice, genuine)  # answered already
    assert wire.posted == [genuine]


async def test_answers_on_a_callers_behalf_and_withdrawn_requests() -> None:
    wire = Wire()
    caller, _, _ = wire.request(1, client=client("a", {"elicitation": {}}), capabilities={"elicitation": {}})
    for request_id in ("e1", "e2", "e3"):
        wire.mux.server_message({"jsonrpc": "2.0", "id": request_id, "method": "elicitation/create", "params": {}})
    assert wire.mux.answer_server_request("e1", {"action": "accept"})
    assert wire.posted[-1] == {"jsonrpc": "2.0", "id": "e1", "result": {"action": "accept"}}
    assert not wire.mux.answer_server_request("e1", {})  # the server no longer waits for it
    assert wire.mux.answer_server_request("e2", error={"code": -1, "message": "no"})
    assert wire.posted[-1] == {"jsonrpc": "2.0", "id": "e2", "error": {"code": -1, "message": "no"}}
    wire.mux.withdraw_server_requests(caller, "gone")
    assert wire.posted[-1]["id"] == "e3"
    assert wire.posted[-1]["error"]["code"] == REQUEST_CANCELLED
    assert not wire.mux.answer_server_request("e3", {})


async def test_the_servers_withdrawal_of_its_own_request_reaches_the_caller_it_asked() -> None:
    wire = Wire()
    _, _, sink = wire.request(1, client=client("a", {"sampling": {}}), capabilities={"sampling": {}})
    wire.mux.server_message({"jsonrpc": "2.0", "id": 77, "method": "sampling/createMessage", "params": {}})
    withdrawn = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 77}}
    wire.mux.server_message(withdrawn)
    assert sink.messages[-1] == withdrawn
    wire.mux.server_message(withdrawn)  # only once
    assert sink.messages.count(withdrawn) == 1
    assert wire.broadcast == []


async def test_a_client_that_leaves_takes_its_requests_and_its_questions_with_it() -> None:
    wire = Wire()
    alice, bob = client("alice", {"sampling": {}}), client("bob")
    a, out_a, _ = wire.request(1, client=alice, capabilities=alice.capabilities)
    b, _, _ = wire.request(2, client=bob)
    wire.mux.server_message({"jsonrpc": "2.0", "id": "s", "method": "sampling/createMessage", "params": {}})
    wire.mux.cancel_client(alice, "client session ended")
    assert a.future.done()
    assert not b.future.done()
    sent = {(m.get("method"), (m.get("params") or {}).get("requestId"), m.get("id")) for m in wire.posted}
    assert ("notifications/cancelled", out_a["id"], None) in sent
    assert (None, None, "s") in sent  # the server's question is refused, not left waiting


async def test_when_the_server_dies_every_request_fails_and_only_the_newest_caller_is_the_suspect() -> None:
    wire = Wire()
    first, _, _ = wire.request(1, client=client("a"))
    newest, _, _ = wire.request(2, client=client("b"))
    own, _ = wire.mux.register({"jsonrpc": "2.0", "id": 0, "method": "resources/subscribe"}, None, NO_SINK)
    own.started = 1e9  # the bridge's own request, newest of all: never a suspect (no caller is waiting)
    wire.mux.fail_all(PierError("SERVER_EXITED", "the server exited", {"exit_code": 1}), blame_newest=True)
    answers = {p.original_id: p.future.result()["error"] for p in (first, newest, own)}
    assert all(e["code"] == GATEWAY_ERROR and e["data"]["code"] == "SERVER_EXITED" for e in answers.values())
    assert all(e["data"]["exit_code"] == 1 for e in answers.values())
    assert [answers[1]["data"]["suspect"], answers[2]["data"]["suspect"], answers[0]["data"]["suspect"]] == [
        False, True, False,
    ]  # fmt: skip
    assert wire.mux.pending == {}


async def test_a_stop_blames_nobody() -> None:
    wire = Wire()
    pending, _, _ = wire.request(1)
    wire.mux.fail_all(PierError("SERVER_EXITED", "stopped"))
    assert pending.future.result()["error"]["data"]["suspect"] is False


async def test_log_records_go_to_the_call_in_flight_at_the_level_it_asked_for() -> None:
    wire = Wire()
    _, _, quiet = wire.request(1, log_level="error")
    record = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "x"}}
    wire.mux.server_message(record)
    assert quiet.messages == []
    assert wire.broadcast == []
    loud = {**record, "params": {"level": "critical", "data": "y"}}
    wire.mux.server_message(loud)
    assert quiet.messages == [loud]


async def test_what_belongs_to_no_call_is_broadcast() -> None:
    wire = Wire()
    record = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info"}}
    wire.mux.server_message(record)  # nothing in flight
    changed = {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}
    wire.mux.server_message(changed)
    updated = {"jsonrpc": "2.0", "method": "notifications/resources/updated", "params": {"uri": "a://b"}}
    wire.mux.server_message(updated)
    assert wire.broadcast == [record, changed, updated]
    assert wire.tools_changed == 1


async def test_a_subscription_notification_is_retagged_with_the_callers_listen_id() -> None:
    wire = Wire()
    listen, outgoing, sink = wire.request("listen-1", method="subscriptions/listen", params={})
    note = {
        "jsonrpc": "2.0", "method": "notifications/resources/updated",
        "params": {"uri": "a://b", "_meta": {SUBSCRIPTION_ID_KEY: outgoing["id"], "other": True}},
    }  # fmt: skip
    wire.mux.server_message(note)
    assert sink.messages == [
        {**note, "params": {"uri": "a://b", "_meta": {SUBSCRIPTION_ID_KEY: "listen-1", "other": True}}}
    ]
    assert wire.broadcast == []
    assert not listen.future.done()
