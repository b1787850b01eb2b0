from __future__ import annotations

import asyncio

import orjson
import pytest

from app.settings import DeviceLimitSettings
from swarm_device.protocol import REQUEST_ID_MAX_LENGTH
from swarm_device.rpc import (
    REQUESTS_BURST,
    REQUESTS_PER_S,
    MalformedReplyError,
    Pacer,
    RpcCallError,
    RpcChannel,
    RpcTimeoutError,
    attempt_timeout,
    encode_request,
    new_request_id,
    parse_reply,
)


class FakeBroker:
    """Records published requests; optionally answers each with `answer(request)`."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, object]]] = []
        self.channel: RpcChannel | None = None
        self.answer: dict[str, object] | None = None
        self._sent_changed = asyncio.Event()

    async def wait_sent(self, count: int) -> None:
        while len(self.sent) < count:
            self._sent_changed.clear()
            await self._sent_changed.wait()

    async def publish(self, method: str, request_id: str, payload: bytes) -> None:
        body = orjson.loads(payload)
        assert body["id"] == request_id
        self.sent.append((method, body))
        self._sent_changed.set()
        if self.answer is not None and self.channel is not None:
            reply = {"id": request_id, **self.answer}
            # Answer asynchronously, like the broker would.
            channel = self.channel
            asyncio.get_running_loop().call_soon(channel.handle_reply, orjson.dumps(reply))


def make_channel(broker: FakeBroker, **options: float) -> RpcChannel:
    channel = RpcChannel(broker.publish, **options)  # type: ignore[arg-type]
    broker.channel = channel
    return channel


def test_request_ids_fit_the_protocol_and_differ() -> None:
    ids = {new_request_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(0 < len(request_id) <= REQUEST_ID_MAX_LENGTH for request_id in ids)


def test_request_body_shape() -> None:
    assert orjson.loads(encode_request("abc", {"firmware": "1.0"})) == {
        "id": "abc",
        "params": {"firmware": "1.0"},
    }


def test_parse_reply_result_error_and_garbage() -> None:
    assert parse_reply(b'{"id": "a", "result": {"x": 1}}').result == {"x": 1}
    reply = parse_reply(b'{"id": "a", "error": {"code": "not_found", "message": "no task"}}')
    assert reply.error is not None
    assert reply.error.code == "not_found"
    assert parse_reply(b'{"id": "a", "result": null}').result is None
    for garbage in (b"", b"not json", b"[1, 2]", b'{"result": 1}', b'{"id": 5}'):
        with pytest.raises(MalformedReplyError):
            parse_reply(garbage)


def test_attempt_timeout_doubles_up_to_the_cap() -> None:
    assert [attempt_timeout(5.0, 30.0, n) for n in range(1, 6)] == [5.0, 10.0, 20.0, 30.0, 30.0]
    assert attempt_timeout(5.0, 30.0, 10_000) == 30.0


@pytest.mark.asyncio
async def test_call_returns_the_result_of_the_matching_reply() -> None:
    broker = FakeBroker()
    broker.answer = {"result": {"id": "dev-1", "online": True}}
    channel = make_channel(broker)
    assert await channel.call("hello", {"firmware": "1.0"}) == {"id": "dev-1", "online": True}
    assert broker.sent == [("hello", {"id": broker.sent[0][1]["id"], "params": {"firmware": "1.0"}})]
    assert channel.pending == 0


@pytest.mark.asyncio
async def test_null_result_is_none() -> None:
    broker = FakeBroker()
    broker.answer = {"result": None}
    assert await make_channel(broker).call("tasks/next") is None
    assert broker.sent[0][1]["params"] == {}


@pytest.mark.asyncio
async def test_error_reply_raises_a_typed_error() -> None:
    broker = FakeBroker()
    broker.answer = {"error": {"code": "conflict", "message": "task is canceled"}}
    with pytest.raises(RpcCallError) as caught:
        await make_channel(broker).call("tasks/x/result", {"status": "succeeded"})
    assert (caught.value.code, caught.value.message) == ("conflict", "task is canceled")


@pytest.mark.asyncio
async def test_timeout_resends_with_the_same_id_then_gives_up() -> None:
    broker = FakeBroker()
    channel = make_channel(broker, timeout=0.01, max_timeout=0.02, attempts=3)
    with pytest.raises(RpcTimeoutError) as caught:
        await channel.call("hello")
    assert caught.value.attempts == 3
    assert len(broker.sent) == 3
    assert len({body["id"] for _, body in broker.sent}) == 1
    assert caught.value.request_id == broker.sent[0][1]["id"]
    assert channel.timeouts == 3
    assert channel.pending == 0


@pytest.mark.asyncio
async def test_late_reply_to_the_first_attempt_answers_the_call() -> None:
    broker = FakeBroker()
    channel = make_channel(broker, timeout=0.05, max_timeout=1.0, attempts=5)
    call = asyncio.create_task(channel.call("tasks/next"))
    await broker.wait_sent(2)
    request_id = broker.sent[0][1]["id"]
    assert channel.handle_reply(orjson.dumps({"id": request_id, "result": {"n": 1}}))
    assert await call == {"n": 1}
    # The duplicate answer to the resend matches nothing any more.
    assert not channel.handle_reply(orjson.dumps({"id": request_id, "result": {"n": 1}}))
    assert channel.unmatched_replies == 1


@pytest.mark.asyncio
async def test_until_answered_outlasts_the_attempt_limit() -> None:
    broker = FakeBroker()
    channel = make_channel(broker, timeout=0.005, max_timeout=0.005, attempts=1)
    call = asyncio.create_task(channel.call("hello", until_answered=True))
    await broker.wait_sent(4)
    assert not call.done()
    channel.handle_reply(orjson.dumps({"id": broker.sent[0][1]["id"], "result": {}}))
    assert await call == {}


@pytest.mark.asyncio
async def test_malformed_reply_with_a_pending_id_fails_that_call() -> None:
    broker = FakeBroker()
    channel = make_channel(broker, timeout=5.0)
    call = asyncio.create_task(channel.call("hello"))
    await broker.wait_sent(1)
    request_id = broker.sent[0][1]["id"]
    with pytest.raises(MalformedReplyError):
        channel.handle_reply(orjson.dumps({"id": request_id, "error": {"code": "weird"}}))
    with pytest.raises(RpcCallError) as caught:
        await call
    assert caught.value.code == "internal"


@pytest.mark.asyncio
async def test_garbage_and_unknown_ids_do_not_disturb_pending_calls() -> None:
    broker = FakeBroker()
    channel = make_channel(broker, timeout=5.0)
    call = asyncio.create_task(channel.call("hello"))
    await broker.wait_sent(1)
    with pytest.raises(MalformedReplyError):
        channel.handle_reply(b"\xff garbage")
    assert not channel.handle_reply(b'{"id": "someone-else", "result": 1}')
    assert not channel.handle_reply(b'{"id": null, "error": {"code": "invalid", "message": "x"}}')
    assert not call.done()
    channel.handle_reply(orjson.dumps({"id": broker.sent[0][1]["id"], "result": 7}))
    assert await call == 7


@pytest.mark.asyncio
async def test_cancelled_call_leaves_nothing_pending() -> None:
    broker = FakeBroker()
    channel = make_channel(broker, timeout=5.0)
    call = asyncio.create_task(channel.call("hello"))
    await broker.wait_sent(1)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert channel.pending == 0


@pytest.mark.asyncio
async def test_until_answered_waits_longer_before_each_copy() -> None:
    broker = FakeBroker()
    channel = make_channel(broker, timeout=0.2, max_timeout=0.2, attempts=1)
    call = asyncio.create_task(channel.call("hello", until_answered=True))
    await broker.wait_sent(1)
    # An ordinary call would have sent its copy after 0.2 s; this one waits 0.6 s.
    await asyncio.sleep(0.3)
    assert len(broker.sent) == 1
    await broker.wait_sent(2)
    channel.handle_reply(orjson.dumps({"id": broker.sent[0][1]["id"], "result": {}}))
    assert await call == {}


def test_pacer_lets_a_burst_through_then_spaces_sends() -> None:
    pacer = Pacer(rate=10, burst=3)
    assert [pacer.delay(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    # Senders that arrive together queue one after the other.
    assert [round(pacer.delay(0.0), 3) for _ in range(2)] == [0.1, 0.2]
    assert pacer.delay(10.0) == 0.0


def test_the_sdk_pace_stays_under_the_core_limit() -> None:
    limits = DeviceLimitSettings()
    assert limits.requests_per_s > REQUESTS_PER_S
    assert limits.burst > REQUESTS_BURST


async def test_rate_limited_reply_is_waited_out_and_sent_again_with_the_same_id() -> None:
    broker = FakeBroker()
    channel = make_channel(broker, timeout=5.0, attempts=1)
    call = asyncio.create_task(channel.call("tasks/next"))
    await broker.wait_sent(1)
    request_id = broker.sent[0][1]["id"]
    refusal = {"id": request_id, "error": {"code": "rate_limited", "message": "slow down", "retry_after_s": 0.05}}
    assert channel.handle_reply(orjson.dumps(refusal))
    await broker.wait_sent(2)
    assert broker.sent[1][1]["id"] == request_id
    assert channel.handle_reply(orjson.dumps({"id": request_id, "result": {"ok": True}}))
    assert await call == {"ok": True}
    assert channel.rate_limited == 1
