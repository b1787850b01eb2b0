"""`DeviceClient`: one device's MQTT connection, its RPC calls, its tasks and its configuration.

Built on aiomqtt (paho underneath, driven by the asyncio loop rather than `select()`, so one
process holds thousands of devices). The connection is the only part that comes and goes: RPC
calls, the task worker and the configuration loop live as long as the client and wait for the
next connection when the device is offline.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from types import TracebackType
from typing import Any, Literal, Self

import aiomqtt
import orjson
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import ValidationError

from swarm_device.backoff import Backoff
from swarm_device.protocol import (
    DEVICE_ID_RE,
    METHOD_HELLO,
    METHOD_STATE,
    Device,
    HelloParams,
    Notice,
    StateParams,
    Task,
    config_topic,
    down_topics,
    notify_topic,
    reply_topic,
    request_topic,
)
from swarm_device.rpc import RpcCallError, RpcChannel
from swarm_device.stats import DeviceStats
from swarm_device.tasks import TaskHandler, TaskWorker

logger = logging.getLogger(__name__)

ProtocolPreference = Literal["5", "3.1.1"]
#: on_config(desired) -> the configuration actually applied (None: `desired` as is).
ConfigCallback = Callable[[dict[str, Any]], Awaitable[dict[str, Any] | None]]

# A connection that lived this long was healthy: the next reconnect starts from the minimum
# delay again. Shorter ones (refused subscribe, client-id takeover) keep backing off.
STABLE_CONNECTION_S = 10.0
# Pause before retrying a publish that failed while the connection still looked up; the reader
# notices a dead connection within this time and clears `connected`.
PUBLISH_RETRY_S = 0.5

_VERSIONS: dict[str, aiomqtt.ProtocolVersion] = {
    "5": aiomqtt.ProtocolVersion.V5,
    "3.1.1": aiomqtt.ProtocolVersion.V311,
}


def _set_nodelay(sock: object) -> None:
    # Nagle + delayed ACK: TLS connect + CONNACK + SUBACK took 54 ms without it, 11 ms with it.
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _properties(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]


def _drop_socket(client: aiomqtt.Client) -> None:
    # aiomqtt leaves the socket open (and registered with the loop) when CONNECT times out;
    # paho's own close is the only way to unregister and close it.
    client._client._sock_close()
    _forget_disconnect_error(client)


def _forget_disconnect_error(client: aiomqtt.Client) -> None:
    # aiomqtt stores a lost connection's error in a future that only its message iterator reads;
    # when the connection dies before that (CONNECT, SUBSCRIBE), asyncio would log it as
    # "never retrieved". The error was already handled by our caller.
    disconnected = client._disconnected
    if disconnected.done() and not disconnected.cancelled():
        disconnected.exception()


async def _cancel_until_done(tasks: set[asyncio.Task[None]]) -> None:
    # Cancel again until they end: third-party code (aiomqtt's use of asyncio.wait_for on 3.11)
    # can swallow a cancellation that races with a completion, and a TaskGroup would then wait
    # forever for a worker that went back to waiting.
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=1.0)


class DeviceClient:
    """A device of the fleet: connects, says hello, pulls and runs tasks, applies config.

    Use as `async with DeviceClient(...) as client:` (runs in the background until the block
    ends) or `await client.run()` (runs until cancelled or `stop()`).
    """

    def __init__(
        self,
        device_id: str,
        host: str,
        port: int,
        ca_file: str | os.PathLike[str],
        cert_file: str | os.PathLike[str],
        key_file: str | os.PathLike[str],
        *,
        keepalive: int = 60,
        firmware: str = "",
        model: str = "",
        capabilities: Sequence[str] = (),
        request_timeout: float = 10.0,
        request_max_timeout: float = 60.0,
        request_attempts: int = 3,
        connect_timeout: float = 10.0,
        reconnect_min: float = 1.0,
        reconnect_max: float = 60.0,
        protocol: ProtocolPreference = "5",
        session_expiry: int = 86400,
        verify_hostname: bool = True,
        on_config: ConfigCallback | None = None,
        ask_next: bool = True,
    ) -> None:
        """Configure a device; nothing connects before `run()` or `async with`.

        `protocol`: the MQTT version, "5" (default) or "3.1.1". `connect_timeout` also bounds
        subscribe and publish acknowledgements. `request_*` are the defaults of `call()`.
        `session_expiry` (MQTT 5, seconds) keeps the session and its queued messages while the
        device is offline; the broker caps it (one day here). 3.1.1 gets the broker's maximum
        with `clean_session=False`. `on_config` replaces the
        default handling of desired configuration (store it and report it back as is).
        `ask_next=False` reports results as SDKs before `next` did (a `tasks/next` after each).
        """
        if not DEVICE_ID_RE.match(device_id):
            raise ValueError(f"invalid device id {device_id!r}")
        if protocol not in _VERSIONS:
            raise ValueError(f"protocol must be 5 or 3.1.1, not {protocol!r}")
        self.device_id = device_id
        self.host = host
        self.port = port
        self._ca_file = ca_file
        self._cert_file = cert_file
        self._key_file = key_file
        self._keepalive = keepalive
        self._hello = HelloParams(firmware=firmware, model=model, capabilities=list(capabilities))
        self._connect_timeout = connect_timeout
        self._reconnect_min = reconnect_min
        self._reconnect_max = reconnect_max
        self._version = _VERSIONS[protocol]
        self._session_expiry = session_expiry
        self._verify_hostname = verify_hostname
        self._on_config = on_config
        self._tls: ssl.SSLContext | None = None
        self._topics = (
            notify_topic(device_id),
            reply_topic(device_id),
            config_topic(device_id),
        )

        self.stats = DeviceStats()
        #: Set while an MQTT connection is up and subscribed.
        self.connected = asyncio.Event()
        #: Set once `hello` was answered on the current connection.
        self.ready = asyncio.Event()
        #: The device record from the last `hello` answer.
        self.device: Device | None = None
        #: The configuration last applied (from `dev/{id}/down/config`).
        self.current_config: dict[str, Any] | None = None
        #: MQTT version the client speaks: "5" or "3.1.1".
        self.protocol_version: str = protocol

        self._rpc = RpcChannel(
            self._publish_request,
            timeout=request_timeout,
            max_timeout=max(request_timeout, request_max_timeout),
            attempts=request_attempts,
        )
        self._tasks = TaskWorker(self.call, self.stats, device_id=device_id, ask_next=ask_next)
        self._mqtt: aiomqtt.Client | None = None
        self._desired: dict[str, Any] | None = None
        self._desired_changed = asyncio.Event()
        # Whether the config topic delivered anything on the current connection (see _greet).
        self._config_heard = False
        self._applied_desired: dict[str, Any] | None = None
        self._reported_desired: dict[str, Any] | None = None
        self._main: asyncio.Task[None] | None = None
        self._background: asyncio.Task[None] | None = None

    # -- application API -------------------------------------------------------------------

    def task_handler(self, method: str) -> Callable[[TaskHandler], TaskHandler]:
        """Decorator registering the handler of a task method.

        The handler gets a `TaskContext` (`.task`, `.params`, `await .progress(details)`) and
        returns the result dict or None; `TaskRejected(reason)` reports `rejected`, any other
        exception `failed`. Tasks with no handler are rejected.
        """

        def register(handler: TaskHandler) -> TaskHandler:
            self._tasks.add_handler(method, handler)
            return handler

        return register

    def add_task_handler(self, method: str, handler: TaskHandler) -> None:
        """Register the handler of a task method (the non-decorator form)."""
        self._tasks.add_handler(method, handler)

    @property
    def running_task(self) -> Task | None:
        """The task being executed now, or None."""
        return self._tasks.running

    async def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        reply_timeout: float | None = None,
        attempts: int | None = None,
        until_answered: bool = False,
    ) -> Any:
        """Call a core method (`hello`, `tasks/next`, `state`, ...) and return its result.

        Waits for a connection if there is none. A timed-out request is resent with the same
        id, `attempts` times in all (default: the client's `request_attempts`), each wait twice
        the previous one; `until_answered` never gives up, and waits three times as long.
        Raises `RpcCallError` on an error reply and `RpcTimeoutError` when the attempts are used up.
        """
        return await self._rpc.call(
            method,
            params,
            reply_timeout=reply_timeout,
            attempts=attempts,
            until_answered=until_answered,
        )

    async def report_state(self, reported: dict[str, Any]) -> None:
        """Report the device's configuration/state with the `state` method."""
        await self.call(METHOD_STATE, StateParams(reported=reported).model_dump(mode="json"))

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        """Run until cancelled or `stop()`: connect, reconnect forever, serve tasks and config."""
        if self._main is not None:
            raise RuntimeError(f"device {self.device_id} is already running")
        main = self._main = asyncio.create_task(self._serve(), name=f"device-{self.device_id}")
        try:
            await main
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            # Otherwise `stop()` cancelled `main`: a normal end of run().
        finally:
            if not main.done():
                main.cancel()
                await asyncio.wait({main})
            self._main = None

    async def stop(self) -> None:
        """Stop running: cancel the running handler, disconnect cleanly, return when done."""
        if self._main is not None:
            main = self._main
            main.cancel()
            await asyncio.wait({main})
        if self._background is not None:
            # Also covers a background run() that has not even started yet.
            background, self._background = self._background, None
            background.cancel()
            await asyncio.wait({background})
            if not background.cancelled() and (error := background.exception()) is not None:
                raise error

    async def __aenter__(self) -> Self:
        """Start `run()` in the background; await `connected` or `ready` to know it is up."""
        self._background = asyncio.create_task(self.run(), name=f"device-run-{self.device_id}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the background run."""
        await self.stop()

    async def _serve(self) -> None:
        workers = {
            asyncio.create_task(self._tasks.run(), name=f"tasks-{self.device_id}"),
            asyncio.create_task(self._config_loop(), name=f"config-{self.device_id}"),
            asyncio.create_task(self._connection_loop(), name=f"mqtt-{self.device_id}"),
        }
        try:
            # They run until cancelled; one that ends early can only have crashed.
            done, _ = await asyncio.wait(workers, return_when=asyncio.FIRST_COMPLETED)
            for worker in done:
                worker.result()
        finally:
            await _cancel_until_done(workers)

    # -- connection ------------------------------------------------------------------------

    async def _connection_loop(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = Backoff(self._reconnect_min, self._reconnect_max)
        while True:
            started = loop.time()
            was_connected = self.stats.connects
            try:
                await self._session()
            except (aiomqtt.MqttError, OSError) as exc:
                cause = f" ({exc.__cause__})" if exc.__cause__ is not None else ""
                logger.info("%s: connection ended: %s%s", self.device_id, exc or type(exc).__name__, cause)
            except Exception:
                # Never let a bug end the device's reconnect loop; back off and try again.
                logger.exception("%s: connection failed", self.device_id)
            if self.stats.connects == was_connected:
                self.stats.connect_failures += 1
            if loop.time() - started >= STABLE_CONNECTION_S:
                backoff.reset()
            delay = backoff.next_delay()
            logger.debug("%s: reconnecting in %.2f s", self.device_id, delay)
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        async with self._connect() as client:
            self.stats.connects += 1
            self._config_heard = False
            await self._subscribe(client)
            self._mqtt = client
            self.connected.set()
            logger.info("%s: connected (MQTT %s)", self.device_id, self.protocol_version)
            greeter = asyncio.create_task(self._greet(), name=f"hello-{self.device_id}")
            try:
                async for message in client.messages:
                    self._dispatch(message)
            finally:
                self._mqtt = None
                self.connected.clear()
                self.ready.clear()
                greeter.cancel()
                self.stats.disconnects += 1

    @asynccontextmanager
    async def _connect(self) -> AsyncIterator[aiomqtt.Client]:
        if self._tls is None:
            self._tls = await asyncio.to_thread(self._make_tls_context)
        client = await self._open()
        try:
            yield client
        finally:
            # A clean DISCONNECT if the connection is still up; aiomqtt returns at once if not.
            with suppress(aiomqtt.MqttError):
                await client.__aexit__(None, None, None)
            _forget_disconnect_error(client)

    async def _open(self) -> aiomqtt.Client:
        """Connect one aiomqtt client; a refused CONNECT raises `aiomqtt.MqttCodeError` with its reason code."""
        v5 = self._version is aiomqtt.ProtocolVersion.V5
        properties = None
        if v5:
            properties = _properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = self._session_expiry
        client = aiomqtt.Client(
            self.host,
            self.port,
            identifier=self.device_id,
            protocol=self._version,
            # 3.1.1: a persistent session keeps the QoS 1 subscriptions and queued messages.
            clean_session=None if v5 else False,
            clean_start=False if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
            keepalive=self._keepalive,
            timeout=self._connect_timeout,
            tls_context=self._tls,
        )
        # The socket hooks are paho's; aiomqtt exposes none of them.
        mqtt = client._client
        mqtt.connect_timeout = self._connect_timeout
        register_socket = mqtt.on_socket_open

        def on_socket_open(paho_client: paho.Client, userdata: Any, sock: Any) -> None:
            # Runs in the executor thread right after the TLS handshake, before CONNECT is sent.
            _set_nodelay(sock)
            if register_socket is not None:
                register_socket(paho_client, userdata, sock)

        mqtt.on_socket_open = on_socket_open
        try:
            await client.__aenter__()
        except aiomqtt.MqttError:
            _drop_socket(client)
            raise
        return client

    def _make_tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=os.fspath(self._ca_file))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.check_hostname = self._verify_hostname
        context.load_cert_chain(self._cert_file, self._key_file)
        return context

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        # Every connect, exact topics, QoS 1: RabbitMQ (4.0 as 3.10) delivers a retained message
        # only to a subscription to its exact topic, never to a wildcard one.
        granted = await client.subscribe([(topic, 1) for topic in down_topics(self.device_id)])
        codes = [code.value if isinstance(code, ReasonCode) else code for code in granted]
        if any(code >= 0x80 for code in codes):
            raise aiomqtt.MqttError(f"subscription refused: {codes}")

    # -- inbound messages ------------------------------------------------------------------

    def _dispatch(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        payload = message.payload
        try:
            if topic == self._topics[1]:
                self._rpc.handle_reply(payload)
            elif topic == self._topics[0]:
                self._on_notice(Notice.model_validate_json(payload))
            elif topic == self._topics[2]:
                self._on_desired_config(payload)
            else:
                logger.warning("%s: message on unexpected topic %s", self.device_id, topic)
        except (ValueError, TypeError) as exc:
            # ValueError covers MalformedReplyError, ValidationError and JSONDecodeError.
            self.stats.malformed_messages += 1
            reason = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else exc
            logger.warning("%s: ignored malformed message on %s: %s", self.device_id, topic, reason)

    def _on_notice(self, notice: Notice) -> None:
        if notice.event == "task_queued":
            self._tasks.request_pull()
        else:
            self._tasks.cancel(notice.task_id)

    def _on_desired_config(self, payload: bytes) -> None:
        self._config_heard = True
        if not payload:
            # An empty retained message only clears the retained config; nothing to apply.
            return
        desired = orjson.loads(payload)
        if not isinstance(desired, dict):
            raise TypeError(f"desired configuration is a {type(desired).__name__}, not an object")
        self._desired = desired
        self._desired_changed.set()

    # -- outbound: requests, hello, config --------------------------------------------------

    async def _publish_request(self, method: str, request_id: str, payload: bytes) -> None:
        topic = request_topic(self.device_id, method)
        while True:
            await self.connected.wait()
            client = self._mqtt
            if client is None:
                await asyncio.sleep(PUBLISH_RETRY_S)
                continue
            properties = None
            if self.protocol_version == "5":
                # Harmless extras the core honours with MQTT 5; the body carries the id anyway.
                properties = _properties(PacketTypes.PUBLISH)
                properties.ResponseTopic = self._topics[1]
                properties.CorrelationData = request_id.encode()
            try:
                await client.publish(topic, payload, qos=1, properties=properties)
                return
            except aiomqtt.MqttError as exc:
                logger.debug("%s: publish of %s failed: %s", self.device_id, method, exc)
                await asyncio.sleep(PUBLISH_RETRY_S)

    async def _greet(self) -> None:
        try:
            answer = await self.call(METHOD_HELLO, self._hello.model_dump(mode="json"), until_answered=True)
        except RpcCallError as exc:
            logger.warning("%s: hello refused: %s", self.device_id, exc)
        else:
            self.stats.hellos += 1
            try:
                self.device = Device.model_validate(answer)
            except ValidationError as exc:
                logger.warning("%s: unexpected hello answer: %s", self.device_id, exc)
            else:
                self._desired_from_hello(self.device.desired_config)
        self.ready.set()
        self._tasks.request_pull()

    def _desired_from_hello(self, desired: dict[str, Any] | None) -> None:
        # The hello answer carries the desired configuration, so a device gets it even when no
        # retained message reaches it. A message on the config topic during this connection is
        # at least as new (it is published after the commit the answer read), so it wins.
        if desired is None or self._config_heard:
            return
        self._desired = desired
        self._desired_changed.set()

    async def _config_loop(self) -> None:
        while True:
            await self._desired_changed.wait()
            self._desired_changed.clear()
            desired = self._desired
            if desired is None:
                continue
            try:
                await self._apply_config(desired)
            except Exception:
                # A failing on_config or report is retried when the retained config comes
                # again (every reconnect) or changes.
                logger.exception("%s: applying configuration failed", self.device_id)

    async def _apply_config(self, desired: dict[str, Any]) -> None:
        if desired != self._applied_desired:
            applied = desired
            if self._on_config is not None:
                returned = await self._on_config(desired)
                if returned is not None:
                    applied = returned
            self.current_config = applied
            self._applied_desired = desired
            self.stats.configs_applied += 1
        if desired != self._reported_desired and self.current_config is not None:
            await self.report_state(self.current_config)
            self._reported_desired = desired
