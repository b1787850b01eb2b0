"""Device requests as web-like routes.

`@rpc.method("tasks/{task_id}/result", ResultParams)` declares one durable quorum queue bound to
`amq.topic` with `dev.*.up.rpc.tasks.*.result`; path parameters (always `device_id`, plus those
of the pattern) come from the routing key, which RabbitMQ's topic ACL makes trustworthy. The
handler gets a typed request and returns a pydantic model (or None); the wrapper publishes it as
the reply on `dev/{id}/down/rpc` through the replies' own `ConfirmedPublisher`, and acknowledges
the request once the broker confirmed the reply.

What can go wrong with a message, and what happens:
- not JSON, not an envelope, params of the wrong shape, too large: an `invalid` error reply;
- an expected problem (AppError: not_found, conflict...): an error reply with its code;
- the database or broker unreachable: the message is held and retried until they are back (the
  reply too: it is published again until the broker confirms it);
- anything else (a bug): redelivered up to the queue's delivery limit, then an `internal`
  error reply and the message is dead-lettered to `swarm.dead-letter`; the consumer lives on.

A device re-sends an unanswered request with the same id (the SDK after 10 s or more). A copy
of a request this process is answering is acknowledged without a reply (the first one's reply
answers it); a copy of one it answered in the last minutes gets the same reply again, without
running the handler (decision 22).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar

import orjson
from faststream import AckPolicy
from faststream._internal.context import Context
from faststream.rabbit import QueueType, RabbitQueue, RabbitRouter
from faststream.rabbit.message import RabbitMessage as IncomingMessage
from pydantic import BaseModel, ValidationError

from app import metrics
from app.broker import AMQ_TOPIC, DEAD_LETTER_EXCHANGE, ConfirmedPublisher, Outgoing
from app.device_limits import DeviceLimiter, Verdict
from app.errors import AppError, back_off, until_infrastructure_answers
from app.storable_json import unstorable
from swarm_device.protocol import REQUEST_ID_MAX_LENGTH, ErrorCode, Request, RpcError, reply_topic

log = logging.getLogger(__name__)
# Where RabbitMQ 4 puts an MQTT 5 Response Topic (as a routing key) for AMQP 0.9.1 consumers.
RESPONSE_TOPIC_HEADER = "x-reply-to-topic"

P = TypeVar("P", bound=BaseModel)

MAX_REQUEST_BYTES = 256 * 1024
# Deliveries of one message before it is parked in the dead-letter queue.
DELIVERY_LIMIT = 5
# How long, and for how many requests, a reply is kept to answer the device's copies: the SDK's
# copies come 10-190 s after the first, later still when the queue is long.
REPLY_MEMORY_S = 600.0
REPLY_MEMORY_SIZE = 50_000
# Larger replies (a task with big params) are not kept: a copy of such a request is handled again.
REPLY_MEMORY_MAX_BYTES = 8 * 1024
_PATH_PARAM = re.compile(r"\{(\w+)\}")


class _InPlaceContext(Context):
    """FastStream's `Context` parameter, resolved without a thread hop.

    fast_depends runs a synchronous resolver in a worker thread (anyio.to_thread): for every
    message a hand-off to a thread and back, about a tenth of a device request's CPU. The same
    lookup as a coroutine is awaited in place.
    """

    async def use(self, /, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return super().use(**kwargs)


RabbitMessage = Annotated[IncomingMessage, _InPlaceContext("message")]


@dataclass(frozen=True, slots=True)
class DeviceRequest(Generic[P]):
    device_id: str
    request_id: str
    params: P
    path: dict[str, str]


Handler = Callable[[DeviceRequest[P]], Awaitable[BaseModel | None]]


class RequestRejected(Exception):
    """The message cannot be handled as a request; answered with `invalid`."""

    def __init__(self, message: str, request_id: str | None) -> None:
        super().__init__(message)
        self.request_id = request_id


def queue_for(pattern: str) -> RabbitQueue:
    """One durable queue per route: `tasks/{task_id}/result` -> queue `swarm.rpc.tasks.result`,
    bound with `dev.{device_id}.up.rpc.tasks.{task_id}.result` (path parameters become `*`)."""
    name = "swarm.rpc." + ".".join(p for p in pattern.split("/") if not _PATH_PARAM.fullmatch(p))
    return RabbitQueue(
        name,
        durable=True,
        queue_type=QueueType.QUORUM,
        routing_key="dev.{device_id}.up.rpc." + pattern.replace("/", "."),
        arguments={"x-delivery-limit": DELIVERY_LIMIT, "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE.name},
    )


def parse_request(body: bytes, params_model: type[P]) -> tuple[str, P]:
    """The request id and typed params of a raw body, or RequestRejected saying what is wrong."""
    if len(body) > MAX_REQUEST_BYTES:
        raise RequestRejected(f"request exceeds {MAX_REQUEST_BYTES} bytes", None)
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise RequestRejected("request is not valid JSON", None) from None
    try:
        envelope = Request.model_validate(raw)
    except ValidationError as exc:
        raise RequestRejected(f"request envelope is invalid: {_first_error(exc)}", _salvage_id(raw)) from None
    # orjson refused NaN and lone surrogates already (and read big integers as floats); PostgreSQL
    # text and jsonb cannot hold U+0000: refuse it here rather than fail in the database.
    if b"\\u0000" in body and (problem := unstorable(envelope.params, "params")) is not None:
        raise RequestRejected(problem, envelope.id)
    try:
        return envelope.id, params_model.model_validate(envelope.params)
    except ValidationError as exc:
        raise RequestRejected(f"params are invalid: {_first_error(exc)}", envelope.id) from None


def _first_error(exc: ValidationError) -> str:
    unknown = [".".join(str(part) for part in e["loc"])[:64] for e in exc.errors() if e["type"] == "extra_forbidden"]
    if unknown:
        return f"fields the method does not define: {', '.join(unknown)}"
    error = exc.errors()[0]
    location = ".".join(str(part) for part in error["loc"]) or "body"
    return f"{location}: {error['msg']}"


def _salvage_id(raw: Any) -> str | None:
    """The id of a broken request, if it has a usable one, so the device can match the error."""
    request_id = raw.get("id") if isinstance(raw, dict) else None
    return request_id if isinstance(request_id, str) and 0 < len(request_id) <= REQUEST_ID_MAX_LENGTH else None


def encode_reply(
    request_id: str | None,
    result: BaseModel | None = None,
    error: tuple[ErrorCode, str] | None = None,
    retry_after_s: float | None = None,
) -> bytes:
    if error is not None:
        code, message = error
        body = RpcError(code=code, message=message, retry_after_s=retry_after_s)
        return orjson.dumps({"id": request_id, "error": body.model_dump(mode="json", exclude_none=True)})
    payload = result.model_dump(mode="json") if result is not None else None
    return orjson.dumps({"id": request_id, "result": payload})


RequestKey = tuple[str, str, str]  # (route pattern, device id, request id)
# Marks a request whose reply is still being worked out.
ANSWERING = b""


class RecentReplies:
    """The requests this process is answering or answered lately, by (route, device, request id).

    Oldest first, so expiry and the size bound drop from the front. Per process: a copy that goes
    to another app process is handled there (the handlers are idempotent, so only work is lost).
    """

    def __init__(
        self, ttl_s: float = REPLY_MEMORY_S, size: int = REPLY_MEMORY_SIZE, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl_s = ttl_s
        self._size = size
        self._clock = clock
        self._entries: OrderedDict[RequestKey, tuple[float, bytes]] = OrderedDict()

    def get(self, key: RequestKey) -> bytes | None:
        """The reply sent to this request, ANSWERING while it is being handled, None if unknown."""
        entry = self._entries.get(key)
        if entry is None or entry[0] < self._clock() - self._ttl_s:
            return None
        return entry[1]

    def answering(self, key: RequestKey) -> None:
        self._put(key, ANSWERING)

    def answered(self, key: RequestKey, reply: bytes) -> None:
        if len(reply) > REPLY_MEMORY_MAX_BYTES:
            self.forget(key)
        else:
            self._put(key, reply)

    def forget(self, key: RequestKey) -> None:
        self._entries.pop(key, None)

    def _put(self, key: RequestKey, value: bytes) -> None:
        now = self._clock()
        self._entries[key] = (now, value)
        self._entries.move_to_end(key)
        while self._entries:
            oldest_key, (at, _) = next(iter(self._entries.items()))
            if len(self._entries) <= self._size and at >= now - self._ttl_s:
                break
            del self._entries[oldest_key]


class DeviceRpcRouter:
    """Registers device methods on a FastStream RabbitRouter."""

    def __init__(
        self, publisher: ConfirmedPublisher, max_concurrency: int = 16, limiter: DeviceLimiter | None = None
    ) -> None:
        self.router = RabbitRouter()
        self._publisher = publisher
        self._limiter = limiter
        # Reply message ids: unique among the publisher's messages in flight (a device may send
        # the same request id twice, e.g. a retried hello, before the first reply is confirmed).
        self._reply_numbers = itertools.count()
        self._in_flight: set[asyncio.Task[None]] = set()
        # Requests beyond what the database pool serves at once wait here, not for a pooled
        # connection (whose timeout would count as a database outage and back off).
        self._slots = asyncio.Semaphore(max_concurrency)
        self._recent = RecentReplies()

    def method(self, pattern: str, params: type[P]) -> Callable[[Handler[P]], Handler[P]]:
        def register(handler: Handler[P]) -> Handler[P]:
            async def consume(message: RabbitMessage) -> None:
                # A FastStream Rabbit subscriber awaits one message at a time; handling each in
                # its own task lets a queue work on up to `prefetch` requests at once (database
                # and broker round trips overlap). Acks are manual, so nothing is lost if the
                # process dies meanwhile: unacknowledged messages are redelivered.
                task = asyncio.create_task(self._handle_logged(message, pattern, handler, params))
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)

            self.router.subscriber(
                queue_for(pattern),
                AMQ_TOPIC,
                ack_policy=AckPolicy.MANUAL,
                no_reply=True,
                title=f"dev/{{device_id}}/up/rpc/{pattern}",
                description=f"{handler.__doc__ or ''} Params: {', '.join(params.model_fields) or 'none'}; "
                "a field the method does not define is refused with `invalid`, naming it.",
            )(consume)
            return handler

        return register

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Let requests being handled finish (bounded), before the broker connection closes."""
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=timeout_s)

    async def _handle_logged(
        self, message: RabbitMessage, pattern: str, handler: Handler[P], params_model: type[P]
    ) -> None:
        try:
            await self._handle(message, pattern, handler, params_model)
        except Exception:
            # Only the ack (or a nack) can fail here (broker gone): the message stays
            # unacknowledged and comes back when the channel is re-established.
            log.exception(
                "request from %s could not be answered; it will be redelivered", message.path.get("device_id")
            )

    async def _handle(self, message: RabbitMessage, pattern: str, handler: Handler[P], params_model: type[P]) -> None:
        device_id = str(message.path["device_id"])
        if self._limiter is not None and await self._limited(message, device_id, self._limiter.check(device_id)):
            return
        request_id: str | None = None
        key: RequestKey | None = None
        try:
            request_id, params = parse_request(message.body, params_model)
            key = (pattern, device_id, request_id)
            earlier = self._recent.get(key)
            if earlier is not None:
                metrics.REQUEST_COPIES.labels(handler.__name__).inc()
                await self._answer_copy(message, device_id, earlier)
                return
            self._recent.answering(key)
            request = DeviceRequest(device_id, request_id, params, {k: str(v) for k, v in message.path.items()})
            async with self._slots:
                result = await until_infrastructure_answers(
                    lambda: handler(request), f"handling a request of {device_id}"
                )
            reply = encode_reply(request_id, result=result)
        except RequestRejected as exc:
            reply = encode_reply(exc.request_id, error=(ErrorCode.INVALID, str(exc)))
        except AppError as exc:
            reply = encode_reply(request_id, error=(exc.code, exc.detail))
        except Exception:
            if key is not None:
                # Its redelivery (or the device's copy) must be handled, not taken for a copy.
                self._recent.forget(key)
            metrics.CONSUMER_ERRORS.labels(handler.__name__).inc()
            if _deliveries(message) + 1 < DELIVERY_LIMIT:
                log.exception("request from %s failed; it will be redelivered", device_id)
                await message.nack(requeue=True)
                return
            log.exception("request from %s failed %d times; dead-lettering it", device_id, DELIVERY_LIMIT)
            await self._reply(
                message, device_id, encode_reply(request_id, error=(ErrorCode.INTERNAL, "internal error"))
            )
            await message.reject(requeue=False)
            metrics.DEAD_LETTERED.labels(handler.__name__).inc()
            return
        if key is not None:
            # Kept before the publish: if the publish fails, the redelivered message is answered
            # from here rather than handled twice.
            self._recent.answered(key, reply)
        await self._reply(message, device_id, reply)
        await message.ack()

    async def _limited(self, message: RabbitMessage, device_id: str, verdict: Verdict) -> bool:
        """Answer a request over the device's limit (True), before any parsing or database work."""
        if verdict is Verdict.ADMIT:
            return False
        if verdict is Verdict.REFUSE:
            assert self._limiter is not None
            try:
                request_id = _salvage_id(orjson.loads(message.body)) if len(message.body) <= MAX_REQUEST_BYTES else None
            except orjson.JSONDecodeError:
                request_id = None
            error = (ErrorCode.RATE_LIMITED, "too many requests from this device")
            await self._reply(
                message, device_id, encode_reply(request_id, error=error, retry_after_s=self._limiter.retry_after_s)
            )
        await message.ack()
        return True

    async def _answer_copy(self, message: RabbitMessage, device_id: str, earlier: bytes) -> None:
        # While the first is being handled its reply will answer the copy too; nothing is lost by
        # acknowledging the copy, since the first stays unacknowledged until it is answered.
        if earlier != ANSWERING:
            await self._reply(message, device_id, earlier)
        await message.ack()

    async def _reply(self, message: RabbitMessage, device_id: str, body: bytes) -> None:
        response_topic = message.headers.get(RESPONSE_TOPIC_HEADER)
        routing_key = response_routing_key(response_topic, device_id) if isinstance(response_topic, str) else None
        reply = Outgoing(
            reply_topic(device_id),
            body,
            message_id=f"{device_id}:{next(self._reply_numbers)}",
            correlation_id=message.correlation_id if routing_key else None,
            routing_key=routing_key,
        )
        delay = 0.2
        while True:
            try:
                await self._publisher.publish(reply)
                return
            except Exception as exc:
                # The publisher's connection is not the consumer's: a request whose reply cannot
                # be published now is held (unacknowledged), not left behind, until the broker
                # confirms the reply.
                log.warning("the reply to %s was not confirmed (%r); publishing it again", device_id, exc)
                delay = await back_off(delay)


def response_routing_key(response_topic: str, device_id: str) -> str | None:
    """The routing key of a request's MQTT 5 Response Topic, if it is one of the device's own
    down-topics (else None: the reply goes to the default reply topic).

    RabbitMQ 4.0 hands an MQTT 5 Response Topic to AMQP 0.9.1 consumers in the header
    `x-reply-to-topic`, already as a routing key (`reply_to` stays empty), and the Correlation
    Data as `correlation_id`, which it gives back as Correlation Data with the reply (seen with
    4.0.5).
    """
    return response_topic if response_topic.startswith(f"dev.{device_id}.down.") else None


def _deliveries(message: RabbitMessage) -> int:
    """How often this message was delivered before (quorum queues count it in x-delivery-count)."""
    count = message.headers.get("x-delivery-count", 0)
    return int(count) if isinstance(count, int) else 0
