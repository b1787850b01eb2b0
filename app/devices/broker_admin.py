"""Device users in RabbitMQ, through the management HTTP API: provision, revoke, list, kick.

Every device is a passwordless broker user named after its certificate CN, pinned to its own MQTT
session queues and to its own topics (`dev.{username}.up.*` / `dev.{username}.down.*` on
`amq.topic`). All calls are idempotent PUTs and DELETEs, safe to repeat from any replica.
"""

from __future__ import annotations

import asyncio
import logging
import re
from datetime import UTC, datetime
from typing import Any, Literal, Self, TypeVar, overload
from urllib.parse import quote

import httpx
from cryptography import x509
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError, field_validator

from app import pki
from app.errors import BrokerAdminError, InvalidInput
from app.settings import BrokerSettings
from swarm_device.protocol import DEVICE_ID_RE

logger = logging.getLogger(__name__)
T = TypeVar("T")

TOPIC_EXCHANGE = "amq.topic"
# Literal `{username}`: RabbitMQ substitutes the authenticated user (the certificate CN). Never
# `{client_id}`, which the client chooses and which is pasted into the regex unescaped. The
# trailing `\.` keeps dev-1 from matching dev-10.
TOPIC_WRITE = r"^dev\.{username}\.up\."
TOPIC_READ = r"^dev\.{username}\.down\."
REVOKE_REASON = "device revoked"
BLOCK_REASON = "device over its limits"
# Per-user limits (`PUT /api/user-limits/{user}/{name}`, RabbitMQ 3.10 and 4.x alike). Not
# max-channels: on 3.10 a device's second MQTT connection failed to open its channel with
# max-channels equal to max-connections (observed), and 4.x's native MQTT has no channels.
USER_LIMITS = ("max-connections",)
TIMEOUT_S = 10.0


class ConnectionInfo(BaseModel):
    """One open broker connection, as the management API lists it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str
    # Missing while a connection is still in its handshake.
    user: str = ""
    vhost: str = ""
    protocol: str = ""
    connected_at: datetime | None = None

    @field_validator("connected_at", mode="before")
    @classmethod
    def _from_epoch_ms(cls, value: Any) -> Any:
        # The management API gives milliseconds since the epoch.
        if isinstance(value, int | float):
            return datetime.fromtimestamp(value / 1000, UTC)
        return value


class _Permission(BaseModel):
    model_config = ConfigDict(extra="ignore")

    user: str
    configure: str = ""
    write: str = ""
    read: str = ""


class _TopicPermission(BaseModel):
    model_config = ConfigDict(extra="ignore")

    exchange: str
    write: str
    read: str


class _UserLimits(BaseModel):
    model_config = ConfigDict(extra="ignore")

    value: dict[str, int]


_connections = TypeAdapter(list[ConnectionInfo])
_permission = TypeAdapter(_Permission)
_permissions = TypeAdapter(list[_Permission])
_topic_permissions = TypeAdapter(list[_TopicPermission])


def _user_limits_of(response: httpx.Response) -> dict[str, int]:
    listed = _parse(response, TypeAdapter(list[_UserLimits]))
    return listed[0].value if listed else {}


def device_permissions(device_id: str) -> dict[str, str]:
    """Vhost permissions pinning the device to its own MQTT session queues and `amq.topic`.

    RabbitMQ 4's native MQTT names a session's queue `mqtt-subscription-<client id>qos<0|1>`, and
    the client id is bound to the certificate, so MQTT alone cannot reach another device's session.
    The pin stays for AMQP: a device certificate can also log in over AMQPS (EXTERNAL), where `.*`
    would let it declare, bind and read any queue of the vhost.
    """
    own_queues = f"mqtt-subscription-{re.escape(device_id)}qos[01]"
    exchange_or_queues = f"^({re.escape(TOPIC_EXCHANGE)}|{own_queues})$"
    return {"configure": f"^{own_queues}$", "write": exchange_or_queues, "read": exchange_or_queues}


def device_topic_permissions() -> dict[str, str]:
    """The same for every device: RabbitMQ fills in `{username}` per connection."""
    return {"exchange": TOPIC_EXCHANGE, "write": TOPIC_WRITE, "read": TOPIC_READ}


def device_user_limits(connections: int) -> dict[str, int]:
    """The user limits of a device allowed `connections` connections at once (0: none)."""
    return dict.fromkeys(USER_LIMITS, connections)


def _segment(value: str) -> str:
    return quote(value, safe="")


def _checked(device_id: str) -> str:
    if not DEVICE_ID_RE.fullmatch(device_id):
        raise InvalidInput(f"device id {device_id!r} must match {DEVICE_ID_RE.pattern}")
    return device_id


class BrokerAdmin:
    """Client of the RabbitMQ management API for the devices vhost.

    `own_users` are broker users of that vhost that are not devices (the core itself): they are
    left out of `device_users()`.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        vhost: str,
        *,
        own_users: frozenset[str] = frozenset(),
        max_connections: int = 2,
    ) -> None:
        self._client = client
        self._vhost = vhost
        self._own_users = own_users
        self._max_connections = max_connections

    @classmethod
    def from_settings(cls, settings: BrokerSettings) -> Self:
        """Build the HTTP client from the settings; the caller owns it and must `aclose()`.

        The core's own broker user is the CN of the certificate it logs in with (read from
        `cert_file`, which must exist); that and the management user are never counted as devices.
        """
        own_users = {settings.management_user}
        core_user = pki.common_name(x509.load_pem_x509_certificate(settings.cert_file.read_bytes()))
        if core_user is not None:
            own_users.add(core_user)
        client = httpx.AsyncClient(
            base_url=settings.management_url,
            auth=httpx.BasicAuth(settings.management_user, settings.management_password.get_secret_value()),
            timeout=TIMEOUT_S,
        )
        return cls(
            client,
            settings.devices_vhost,
            own_users=frozenset(own_users),
            max_connections=settings.device_max_connections,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def provision_device(self, device_id: str) -> None:
        """Create (or reset) the device's passwordless user, its connection limits, its topic and its
        vhost permissions."""
        user = _segment(_checked(device_id))
        vhost = _segment(self._vhost)
        # An empty password_hash: no password login at all, only the certificate (EXTERNAL).
        await self._call("PUT", f"/api/users/{user}", json={"password_hash": "", "tags": ""})
        await self.limit_connections(device_id, self._max_connections)
        # Topic permissions before vhost permissions: a user without a topic-permission entry may
        # use every topic, and without vhost permissions it cannot connect yet. This order never
        # leaves a connectable, unconfined device in between.
        await self._call("PUT", f"/api/topic-permissions/{vhost}/{user}", json=device_topic_permissions())
        await self._call("PUT", f"/api/permissions/{vhost}/{user}", json=device_permissions(device_id))
        logger.info("broker user provisioned for device %s in vhost %s", device_id, self._vhost)

    async def limit_connections(self, device_id: str, connections: int) -> None:
        """The most connections the device's user may hold at once; 0 refuses every new one.

        Two, normally: a device reconnecting after a network change takes its session over while
        the broker still counts the old connection, which one would refuse until keepalive ends it.
        """
        user = _segment(_checked(device_id))
        for name, value in device_user_limits(connections).items():
            await self._call("PUT", f"/api/user-limits/{user}/{name}", json={"value": value})

    async def block_device(self, device_id: str) -> None:
        """Refuse the device's new connections and close its open ones (until `unblock_device`).

        Both at once, to stop a flood soon: a device that reconnects in between is closed by the
        second listing or refused by the limit (the SDK waits a second or more before reconnecting).
        """
        await asyncio.gather(
            self.limit_connections(device_id, 0), self.close_device_connections(device_id, reason=BLOCK_REASON)
        )

    async def unblock_device(self, device_id: str) -> None:
        await self.limit_connections(device_id, self._max_connections)

    async def deprovision_device(self, device_id: str) -> None:
        """Delete the device's user, and with it its permissions. Already gone is fine.

        RabbitMQ then closes the user's open connections by itself (seen on 3.10); revocation
        still calls `close_device_connections`, which does not depend on that.
        """
        user = _segment(_checked(device_id))
        response = await self._call("DELETE", f"/api/users/{user}", missing_ok=True)
        if response is None:
            logger.info("broker user of device %s was already gone", device_id)
        else:
            logger.info("broker user of device %s deleted", device_id)

    async def close_device_connections(self, device_id: str, reason: str = REVOKE_REASON) -> int:
        """Close every open connection of the device's user; returns how many were open.

        Both calls read RabbitMQ's connection tracking, which knows a connection as soon as it is
        accepted. `DELETE /api/connections/{name}` goes through the management statistics instead,
        which learn of a connection only seconds later (404 meanwhile, observed on 3.10): a device
        that had just reconnected would stay online.
        """
        listed = await self.device_connection_count(device_id)
        # Even with none listed: a connection may have been accepted since.
        path = f"/api/connections/username/{_segment(_checked(device_id))}"
        await self._call("DELETE", path, headers={"X-Reason": reason})
        if listed:
            logger.info("closed %d broker connection(s) of device %s", listed, device_id)
        return listed

    async def device_connection_count(self, device_id: str) -> int:
        """How many connections the device's user has open now (the broker's connection tracking)."""
        path = f"/api/connections/username/{_segment(_checked(device_id))}"
        return len(_parse(await self._call("GET", path), _connections))

    async def device_users(self) -> set[str]:
        """Users with permissions on the devices vhost, except the core's own: for reconciliation."""
        response = await self._call("GET", f"/api/vhosts/{_segment(self._vhost)}/permissions")
        permissions = _parse(response, _permissions)
        return {p.user for p in permissions if p.user not in self._own_users and DEVICE_ID_RE.fullmatch(p.user)}

    async def connections(self) -> list[ConnectionInfo]:
        """Open connections of the devices vhost (devices and the core alike): for presence.

        This listing comes from the management statistics, which learn of a new connection a few
        seconds late (seen: ~2 s on 3.10): reconcile presence events received meanwhile on top.
        """
        response = await self._call(
            "GET",
            f"/api/vhosts/{_segment(self._vhost)}/connections",
            params={"columns": ",".join(ConnectionInfo.model_fields)},
        )
        return _parse(response, _connections)

    async def device_provisioned(self, device_id: str) -> bool:
        """True if the device's user exists with exactly the permissions `provision_device` sets.

        A half-done provisioning (a crash between calls) or a hand-edited user answers False, so
        that reconciliation provisions it again.
        """
        user = _segment(_checked(device_id))
        vhost = _segment(self._vhost)
        if await self._call("GET", f"/api/users/{user}", missing_ok=True) is None:
            return False
        # Any value: 0 while the device is blocked is provisioned too.
        response = await self._call("GET", f"/api/user-limits/{user}", missing_ok=True)
        if response is None or not set(USER_LIMITS) <= set(_user_limits_of(response)):
            return False
        response = await self._call("GET", f"/api/permissions/{vhost}/{user}", missing_ok=True)
        if response is None:
            return False
        permission = _parse(response, _permission)
        if permission.model_dump(exclude={"user"}) != device_permissions(device_id):
            return False
        response = await self._call("GET", f"/api/topic-permissions/{vhost}/{user}", missing_ok=True)
        if response is None:
            return False
        topic_permissions = _parse(response, _topic_permissions)
        return [t.model_dump() for t in topic_permissions] == [device_topic_permissions()]

    @overload
    async def _call(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        missing_ok: Literal[False] = False,
    ) -> httpx.Response: ...

    @overload
    async def _call(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        missing_ok: Literal[True],
    ) -> httpx.Response | None: ...

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        missing_ok: bool = False,
    ) -> httpx.Response | None:
        """One management API call; a 404 is None when `missing_ok`, any failure BrokerAdminError."""
        what = f"{method} {path}"
        try:
            response = await self._client.request(method, path, json=json, params=params, headers=headers)
        except httpx.HTTPError as exc:
            raise BrokerAdminError(f"broker management API call {what} failed: {type(exc).__name__}: {exc}") from exc
        if response.status_code == 404 and missing_ok:
            return None
        if response.status_code == 401:
            raise BrokerAdminError(
                f"broker management API refused the management credentials (401) on {what}: "
                "check APP_BROKER__MANAGEMENT_USER and APP_BROKER__MANAGEMENT_PASSWORD"
            )
        if response.is_error:
            raise BrokerAdminError(
                f"broker management API call {what} answered {response.status_code}: {response.text[:300]}"
            )
        return response


def _parse(response: httpx.Response, adapter: TypeAdapter[T]) -> T:
    try:
        return adapter.validate_json(response.content)
    except ValidationError as exc:
        what = f"{response.request.method} {response.request.url.path}"
        raise BrokerAdminError(f"broker management API call {what} answered unexpected JSON: {exc}") from exc
