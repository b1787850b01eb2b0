"""Request/reply correlation over MQTT: a device's requests and the core's replies.

Transport-agnostic: `RpcChannel` is given a `publish` coroutine and fed the payloads that arrive
on `dev/{id}/down/rpc`; it never touches a socket, so it is tested without a broker.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from pydantic import ValidationError

from swarm_device.protocol import ErrorCode, Reply

logger = logging.getLogger(__name__)

#: publish(method, request_id, payload): send one request; waits for a connection if needed.
PublishFn = Callable[[str, str, bytes], Awaitable[None]]


class RpcCallError(Exception):
    """The core answered the request with an error reply."""

    def __init__(self, code: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


class RpcTimeoutError(TimeoutError):
    """No reply arrived after every attempt of a request."""

    def __init__(self, method: str, request_id: str, attempts: int) -> None:
        super().__init__(f"no reply to {method} (request {request_id}) after {attempts} attempt(s)")
        self.method = method
        self.request_id = request_id
        self.attempts = attempts


class MalformedReplyError(ValueError):
    """A payload on the reply topic is not a valid reply."""


def new_request_id() -> str:
    """A fresh request id (32 hex characters, within the protocol's 64)."""
    return uuid.uuid4().hex


def encode_request(request_id: str, params: dict[str, Any]) -> bytes:
    """The request body `{"id": ..., "params": {...}}`."""
    return orjson.dumps({"id": request_id, "params": params})


def parse_reply(payload: bytes) -> Reply:
    """Decode a reply; raises `MalformedReplyError` for anything that is not one."""
    try:
        return Reply.model_validate_json(payload)
    except ValidationError as exc:
        raise MalformedReplyError(f"not a reply: {exc.error_count()} error(s): {exc.errors()[0]['msg']}") from exc


#: A call that never gives up (`until_answered`: hello, tasks/next) waits this many times longer,
#: first and at most: its request is queued durably, so a copy mostly adds to the backlog of a
#: core that is slow rather than replace a request it lost (10,000 devices connecting: several
#: copies per device at 10 s, decision 22).
UNTIL_ANSWERED_PATIENCE = 3.0


#: The pace the SDK keeps by itself, below the core's per-device limit (50/s, burst 100 by
#: default, decision 46), so that a device in normal operation is never refused.
REQUESTS_PER_S = 40.0
REQUESTS_BURST = 80.0
#: Wait after a `rate_limited` reply that names no `retry_after_s`.
RATE_LIMITED_WAIT_S = 1.0


class Pacer:
    """A token bucket the sender waits on: `rate` sends a second after a burst of `burst`."""

    def __init__(self, rate: float = REQUESTS_PER_S, burst: float = REQUESTS_BURST) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"need rate > 0 and burst >= 1, got {rate}, {burst}")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._at: float | None = None

    def delay(self, now: float) -> float:
        """Take a token; how long to wait before sending (0: now). Tokens may go negative: the
        waits of senders that arrive together are queued one after the other."""
        if self._at is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    async def wait(self) -> None:
        delay = self.delay(asyncio.get_running_loop().time())
        if delay > 0:
            await asyncio.sleep(delay)


def attempt_timeout(timeout: float, max_timeout: float, attempt: int) -> float:
    """How long attempt number `attempt` (1-based) waits: doubling from `timeout` up to `max_timeout`.

    A core that is slow because it is overloaded is not helped by resending at a fixed rate.
    """
    return min(max_timeout, timeout * 2.0 ** min(attempt - 1, 32))


class RpcChannel:
    """Sends requests through `publish` and matches replies to them by request id.

    A retried request keeps its id, so a late reply to the first attempt still answers it and the
    core can recognise the duplicate. Calls survive reconnects: a pending call keeps waiting while
    `publish` waits for the next connection.
    """

    def __init__(
        self,
        publish: PublishFn,
        *,
        timeout: float = 10.0,
        max_timeout: float = 60.0,
        attempts: int = 3,
        pacer: Pacer | None = None,
    ) -> None:
        if timeout <= 0 or max_timeout < timeout:
            raise ValueError(f"need 0 < timeout <= max_timeout, got {timeout}, {max_timeout}")
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {attempts}")
        self._publish = publish
        self._pacer = pacer or Pacer()
        self.timeout = timeout
        self.max_timeout = max_timeout
        self.attempts = attempts
        self._pending: dict[str, asyncio.Future[Any]] = {}
        self.timeouts = 0
        self.unmatched_replies = 0
        self.rate_limited = 0

    @property
    def pending(self) -> int:
        """Number of calls waiting for a reply."""
        return len(self._pending)

    async def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        reply_timeout: float | None = None,
        attempts: int | None = None,
        until_answered: bool = False,
    ) -> Any:
        """Send a request and return the `result` of its reply.

        `reply_timeout` is the wait of the first attempt (later ones double it, up to `max_timeout`);
        `attempts` bounds the sends (same request id each time) unless `until_answered`, which
        retries forever and waits `UNTIL_ANSWERED_PATIENCE` times as long. Raises `RpcCallError`
        for an error reply, `RpcTimeoutError` when the attempts are used up. Sends keep the pace
        of the channel's `Pacer`; a `rate_limited` reply is waited out (its `retry_after_s`) and
        the request sent again, which uses up no attempt. Waiting for a connection or for the
        pace does not count against the timeout.
        """
        first_timeout = self.timeout if reply_timeout is None else reply_timeout
        max_timeout = max(first_timeout, self.max_timeout)
        if until_answered:
            first_timeout *= UNTIL_ANSWERED_PATIENCE
            max_timeout *= UNTIL_ANSWERED_PATIENCE
        max_attempts = self.attempts if attempts is None else attempts
        request_id = new_request_id()
        payload = encode_request(request_id, params or {})
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            attempt = 0
            while True:
                attempt += 1
                await self._pacer.wait()
                await self._publish(method, request_id, payload)
                wait = attempt_timeout(first_timeout, max_timeout, attempt)
                try:
                    # asyncio.timeout, not wait_for: on 3.11 wait_for drops a cancellation that
                    # arrives together with the reply, and a stopping device then hangs.
                    async with asyncio.timeout(wait):
                        return await asyncio.shield(future)
                except RpcCallError as exc:
                    if exc.code != ErrorCode.RATE_LIMITED:
                        raise
                    self.rate_limited += 1
                    attempt -= 1
                    future = asyncio.get_running_loop().create_future()
                    self._pending[request_id] = future
                    pause = exc.retry_after_s or RATE_LIMITED_WAIT_S
                    logger.info("%s (request %s) rate limited; sending it again in %.2f s", method, request_id, pause)
                    await asyncio.sleep(pause)
                except TimeoutError:
                    self.timeouts += 1
                    if not until_answered and attempt >= max_attempts:
                        raise RpcTimeoutError(method, request_id, attempt) from None
                    logger.info(
                        "no reply to %s (request %s) in %.1f s, resending",
                        method,
                        request_id,
                        wait,
                    )
        finally:
            del self._pending[request_id]
            if not future.done():
                future.cancel()

    def handle_reply(self, payload: bytes) -> bool:
        """Feed one payload from the reply topic; returns whether it answered a pending call.

        Raises `MalformedReplyError` for a payload that is not a reply. If such a payload still
        carries the id of a pending call, that call fails with an `internal` `RpcCallError`
        instead of waiting for a reply that will never be valid.
        """
        try:
            reply = parse_reply(payload)
        except MalformedReplyError as exc:
            self._fail_by_raw_id(payload, str(exc))
            raise
        if reply.id is None:
            # The core could not read a request id: nothing to match, the caller will retry.
            logger.warning("reply without request id: %s", reply.error)
            self.unmatched_replies += 1
            return False
        future = self._pending.get(reply.id)
        if future is None or future.done():
            # A duplicate answer to a retried request, or a reply after the caller gave up.
            logger.debug("reply %s matches no pending call", reply.id)
            self.unmatched_replies += 1
            return False
        if reply.error is not None:
            future.set_exception(RpcCallError(reply.error.code, reply.error.message, reply.error.retry_after_s))
        else:
            future.set_result(reply.result)
        return True

    def _fail_by_raw_id(self, payload: bytes, reason: str) -> None:
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        request_id = data.get("id") if isinstance(data, dict) else None
        future = self._pending.get(request_id) if isinstance(request_id, str) else None
        if future is not None and not future.done():
            future.set_exception(RpcCallError(ErrorCode.INTERNAL, f"malformed reply: {reason}"))
