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
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
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
from app.errors import AppError, is_infrastructure_error
from app.storable_json import NUL_REFUSED, contains_nul
from swarm_device.protocol import REQUEST_ID_MAX_LENGTH, ErrorCode, Request, reply_topic

log = logging.getLogger(__name__)

P = TypeVar("P", bound=BaseModel)

MAX_REQUEST_BYTES = 256 * 1024
# Deliveries of one message before it is parked in the dead-letter queue.
DELIVERY_LIMIT = 5
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
    # PostgreSQL text and jsonb cannot hold U+0000: refuse it here rather than fail in the database.
    if b"\\u0000" in body and contains_nul(envelope.params):
        raise RequestRejected(NUL_REFUSED, envelope.id)
    try:
        return envelope.id, params_model.model_validate(envelope.params)
    except ValidationError as exc:
        raise RequestRejected(f"params are invalid: {_first_error(exc)}", envelope.id) from None


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    location = ".".join(str(part) for part in error["loc"]) or "body"
    return f"{location}: {error['msg']}"


def _salvage_id(raw: Any) -> str | None:
    """The id of a broken request, if it has a usable one, so the device can match the error."""
    request_id = raw.get("id") if isinstance(raw, dict) else None
    return request_id if isinstance(request_id, str) and 0 < len(request_id) <= REQUEST_ID_MAX_LENGTH else None


def encode_reply(
    request_id: str | None, result: BaseModel | None = None, error: tuple[ErrorCode, str] | None = None
) -> bytes:
    if error is not None:
        code, message = error
        return orjson.dumps({"id": request_id, "error": {"code": code.value, "message": message}})
    payload = result.model_dump(mode="json") if result is not None else None
    return orjson.dumps({"id": request_id, "result": payload})


class DeviceRpcRouter:
    """Registers device methods on a FastStream RabbitRouter."""

    def __init__(self, publisher: ConfirmedPublisher, max_concurrency: int = 16) -> None:
        self.router = RabbitRouter()
        self._publisher = publisher
        # Reply message ids: unique among the publisher's messages in flight (a device may send
        # the same request id twice, e.g. a retried hello, before the first reply is confirmed).
        self._reply_numbers = itertools.count()
        self._in_flight: set[asyncio.Task[None]] = set()
        # Requests beyond what the database pool serves at once wait here, not for a pooled
        # connection (whose timeout would count as a database outage and back off).
        self._slots = asyncio.Semaphore(max_concurrency)

    def method(self, pattern: str, params: type[P]) -> Callable[[Handler[P]], Handler[P]]:
        def register(handler: Handler[P]) -> Handler[P]:
            async def consume(message: RabbitMessage) -> None:
                # A FastStream Rabbit subscriber awaits one message at a time; handling each in
                # its own task lets a queue work on up to `prefetch` requests at once (database
                # and broker round trips overlap). Acks are manual, so nothing is lost if the
                # process dies meanwhile: unacknowledged messages are redelivered.
                task = asyncio.create_task(self._handle_logged(message, handler, params))
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)

            self.router.subscriber(
                queue_for(pattern),
                AMQ_TOPIC,
                ack_policy=AckPolicy.MANUAL,
                no_reply=True,
                title=f"dev/{{device_id}}/up/rpc/{pattern}",
                description=handler.__doc__,
            )(consume)
            return handler

        return register

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Let requests being handled finish (bounded), before the broker connection closes."""
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=timeout_s)

    async def _handle_logged(self, message: RabbitMessage, handler: Handler[P], params_model: type[P]) -> None:
        try:
            await self._handle(message, handler, params_model)
        except Exception:
            # Only the ack (or a nack) can fail here (broker gone): the message stays
            # unacknowledged and comes back when the channel is re-established.
            log.exception(
                "request from %s could not be answered; it will be redelivered", message.path.get("device_id")
            )

    async def _handle(self, message: RabbitMessage, handler: Handler[P], params_model: type[P]) -> None:
        device_id = str(message.path["device_id"])
        request_id: str | None = None
        try:
            request_id, params = parse_request(message.body, params_model)
            request = DeviceRequest(device_id, request_id, params, {k: str(v) for k, v in message.path.items()})
            async with self._slots:
                result = await self._call_until_infrastructure_answers(handler, request)
            reply = encode_reply(request_id, result=result)
        except RequestRejected as exc:
            reply = encode_reply(exc.request_id, error=(ErrorCode.INVALID, str(exc)))
        except AppError as exc:
            reply = encode_reply(request_id, error=(exc.code, exc.detail))
        except Exception:
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
        await self._reply(message, device_id, reply)
        await message.ack()

    async def _call_until_infrastructure_answers(
        self, handler: Handler[P], request: DeviceRequest[P]
    ) -> BaseModel | None:
        delay = 0.2
        while True:
            try:
                return await handler(request)
            except Exception as exc:
                if not is_infrastructure_error(exc):
                    raise
                # Not the message's fault: hold it (unacknowledged) until the database is back.
                log.warning("handling a request of %s failed on infrastructure (%r); retrying", request.device_id, exc)
                delay = await _back_off(delay)

    async def _reply(self, message: RabbitMessage, device_id: str, body: bytes) -> None:
        # MQTT 5 Response Topic arrives as reply_to; honour it only inside the device's own down-topics.
        own_prefix = f"dev.{device_id}.down."
        routing_key = message.reply_to if message.reply_to.startswith(own_prefix) else None
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
                delay = await _back_off(delay)


async def _back_off(delay: float) -> float:
    """Sleep `delay`; the next delay (doubled, at most 5 s)."""
    await asyncio.sleep(delay)
    return min(delay * 2, 5.0)


def _deliveries(message: RabbitMessage) -> int:
    """How often this message was delivered before (quorum queues count it in x-delivery-count)."""
    count = message.headers.get("x-delivery-count", 0)
    return int(count) if isinstance(count, int) else 0
