"""Pure parts of device requests: a broken message yields a clear `invalid` answer; replies kept for copies."""

from __future__ import annotations

import orjson
import pytest

from app.device_rpc import (
    ANSWERING,
    MAX_REQUEST_BYTES,
    REPLY_MEMORY_MAX_BYTES,
    RecentReplies,
    RequestRejected,
    encode_reply,
    parse_request,
    queue_for,
    response_routing_key,
)
from swarm_device.protocol import ErrorCode, ResultParams


def test_valid_request_is_parsed_into_typed_params() -> None:
    request_id, params = parse_request(
        b'{"id": "r1", "params": {"status": "succeeded", "result": {"a": 1}}}', ResultParams
    )
    assert request_id == "r1"
    assert params.status == "succeeded"
    assert params.result == {"a": 1}


@pytest.mark.parametrize(
    ("body", "expected_id", "fragment"),
    [
        (b"{not json", None, "not valid JSON"),
        (b'"just a string"', None, "envelope"),
        (b'{"params": {}}', None, "id"),
        (b'{"id": 5, "params": {}}', None, "id"),
        (b'{"id": "' + b"x" * 65 + b'", "params": {}}', None, "id"),
        (b'{"id": "r2", "params": {"status": "done"}}', "r2", "params are invalid"),
        (b'{"id": "r3", "params": []}', "r3", "params"),
    ],
)
def test_broken_requests_are_rejected_with_what_is_wrong(body: bytes, expected_id: str | None, fragment: str) -> None:
    with pytest.raises(RequestRejected) as caught:
        parse_request(body, ResultParams)
    assert caught.value.request_id == expected_id
    assert fragment in str(caught.value)


def test_oversized_request_is_rejected_before_parsing() -> None:
    body = orjson.dumps({"id": "big", "params": {"blob": "x" * MAX_REQUEST_BYTES}})
    with pytest.raises(RequestRejected, match="exceeds"):
        parse_request(body, ResultParams)


def test_error_reply_shape() -> None:
    reply = orjson.loads(encode_reply("r9", error=(ErrorCode.NOT_FOUND, "no such task")))
    assert reply == {"id": "r9", "error": {"code": "not_found", "message": "no such task"}}
    assert orjson.loads(encode_reply("r10")) == {"id": "r10", "result": None}


def test_queue_per_route_binds_path_parameters_as_wildcards() -> None:
    queue = queue_for("tasks/{task_id}/result")
    assert queue.name == "swarm.rpc.tasks.result"
    assert queue.routing_key == "dev.*.up.rpc.tasks.*.result"
    assert queue.arguments is not None
    assert queue.arguments["x-dead-letter-exchange"] == "swarm.dead-letter"


def test_recent_replies_mark_answer_and_expire() -> None:
    now = [0.0]
    recent = RecentReplies(ttl_s=60, size=10, clock=lambda: now[0])
    key = ("hello", "d1", "r1")
    assert recent.get(key) is None
    recent.answering(key)
    assert recent.get(key) == ANSWERING
    recent.answered(key, b'{"id": "r1", "result": null}')
    assert recent.get(key) == b'{"id": "r1", "result": null}'
    assert recent.get(("state", "d1", "r1")) is None  # another route, another request
    now[0] = 61.0
    assert recent.get(key) is None


def test_recent_replies_keep_the_newest_and_not_large_replies() -> None:
    recent = RecentReplies(ttl_s=60, size=2)
    for n in range(3):
        recent.answered(("hello", "d1", f"r{n}"), b"{}")
    assert [recent.get(("hello", "d1", f"r{n}")) for n in range(3)] == [None, b"{}", b"{}"]
    recent.answering(("tasks/next", "d1", "big"))
    recent.answered(("tasks/next", "d1", "big"), b"x" * (REPLY_MEMORY_MAX_BYTES + 1))
    assert recent.get(("tasks/next", "d1", "big")) is None


@pytest.mark.parametrize(
    ("reply_to", "expected"),
    [
        ("dev.d-1.down.answers", "dev.d-1.down.answers"),
        ("dev.d-1.down.reply", "dev.d-1.down.reply"),
        ("dev.d-10.down.reply", None),  # another device's topic
        ("dev.d-1.up.rpc.hello", None),
        ("dev.d-1.down", None),
        ("", None),
    ],
)
def test_only_the_device_s_own_response_topic_is_used(reply_to: str, expected: str | None) -> None:
    assert response_routing_key(reply_to, "d-1") == expected
