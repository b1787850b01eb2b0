"""BrokerAdmin's requests to the RabbitMQ management API, against httpx.MockTransport.

Request shapes only; the behaviour against a real broker is covered by the integration tests.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import SecretStr

from app.devices.broker_admin import BrokerAdmin, ConnectionInfo, device_permissions
from app.errors import BrokerAdminError, InvalidInput
from app.settings import BrokerSettings

Handler = Callable[[httpx.Request], httpx.Response]


def _raw_path(request: httpx.Request) -> str:
    """The path as sent, still percent-encoded, without the query."""
    return request.url.raw_path.decode().partition("?")[0]


class Recorder:
    """A MockTransport handler that records requests and answers from a route table."""

    def __init__(self, routes: dict[tuple[str, str], httpx.Response] | None = None, default: int = 204) -> None:
        self.routes = routes or {}
        self.default = default
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        key = (request.method, _raw_path(request))
        return self.routes.get(key, httpx.Response(self.default))

    def calls(self) -> list[tuple[str, str]]:
        return [(r.method, _raw_path(r)) for r in self.requests]

    def body(self, index: int) -> object:
        return json.loads(self.requests[index].content)


def _admin(handler: Handler, vhost: str = "devices") -> BrokerAdmin:
    client = httpx.AsyncClient(base_url="http://mgmt.test", transport=httpx.MockTransport(handler))
    return BrokerAdmin(client, vhost, own_users=frozenset({"swarm-core"}))


@pytest.mark.asyncio
async def test_provision_device_request_shapes() -> None:
    recorder = Recorder()
    admin = _admin(recorder)

    await admin.provision_device("dev-pa1")

    assert recorder.calls() == [
        ("PUT", "/api/users/dev-pa1"),
        # Connection limits and topic permissions before vhost permissions: never connectable
        # without them.
        ("PUT", "/api/user-limits/dev-pa1/max-connections"),
        ("PUT", "/api/topic-permissions/devices/dev-pa1"),
        ("PUT", "/api/permissions/devices/dev-pa1"),
    ]
    assert recorder.body(0) == {"password_hash": "", "tags": ""}
    assert recorder.body(1) == {"value": 2}
    assert recorder.body(2) == {
        "exchange": "amq.topic",
        "write": "^dev\\.{username}\\.up\\.",
        "read": "^dev\\.{username}\\.down\\.",
    }
    assert b"client_id" not in recorder.requests[2].content
    assert recorder.body(3) == {
        "configure": r"^mqtt-subscription-dev\-pa1qos[01]$",
        "write": r"^(amq\.topic|mqtt-subscription-dev\-pa1qos[01])$",
        "read": r"^(amq\.topic|mqtt-subscription-dev\-pa1qos[01])$",
    }
    assert all(r.headers["content-type"] == "application/json" for r in recorder.requests)


def test_queue_permissions_pin_the_device_to_its_own_session_queues() -> None:
    permissions = device_permissions("dev-1")
    configure, read = re.compile(permissions["configure"]), re.compile(permissions["read"])

    assert configure.search("mqtt-subscription-dev-1qos1")
    assert configure.search("mqtt-subscription-dev-1qos0")
    assert not configure.search("mqtt-subscription-dev-10qos1")
    assert not configure.search("mqtt-subscription-dev-2qos1")
    assert not configure.search("amq.topic")
    assert read.search("amq.topic")
    assert read.search("mqtt-subscription-dev-1qos1")
    assert not read.search("amqXtopic")
    assert not read.search("amq.topic2")


@pytest.mark.asyncio
async def test_path_segments_are_url_encoded() -> None:
    recorder = Recorder()
    admin = _admin(recorder, vhost="/")

    await admin.provision_device("dev_1")

    assert recorder.calls()[2:] == [
        ("PUT", "/api/topic-permissions/%2F/dev_1"),
        ("PUT", "/api/permissions/%2F/dev_1"),
    ]


@pytest.mark.asyncio
@pytest.mark.parametrize("device_id", ["", "dev.1", "../users", "dev/1", "a#", "x" * 65])
async def test_bad_device_ids_never_reach_the_broker(device_id: str) -> None:
    recorder = Recorder()
    admin = _admin(recorder)

    with pytest.raises(InvalidInput):
        await admin.provision_device(device_id)
    with pytest.raises(InvalidInput):
        await admin.deprovision_device(device_id)
    with pytest.raises(InvalidInput):
        await admin.close_device_connections(device_id)
    with pytest.raises(InvalidInput):
        await admin.device_provisioned(device_id)
    assert recorder.requests == []


@pytest.mark.asyncio
@pytest.mark.parametrize("status", [204, 404])
async def test_deprovision_tolerates_an_already_deleted_user(status: int) -> None:
    recorder = Recorder(default=status)
    admin = _admin(recorder)

    await admin.deprovision_device("dev-pa1")

    assert recorder.calls() == [("DELETE", "/api/users/dev-pa1")]


@pytest.mark.asyncio
async def test_deprovision_server_error_is_broker_admin_error() -> None:
    admin = _admin(Recorder(default=500))

    with pytest.raises(BrokerAdminError, match=r"DELETE /api/users/dev-pa1 answered 500"):
        await admin.deprovision_device("dev-pa1")


@pytest.mark.asyncio
async def test_close_device_connections_closes_them_by_user_name_with_a_reason() -> None:
    listing = [
        {"name": "127.0.0.1:50001 -> 127.0.0.1:35883", "user": "dev-pa1", "vhost": "devices", "node": "n@h"},
        {"name": "127.0.0.1:50002 -> 127.0.0.1:35883", "user": "dev-pa1", "vhost": "devices", "node": "n@h"},
    ]
    recorder = Recorder({("GET", "/api/connections/username/dev-pa1"): httpx.Response(200, json=listing)})

    closed = await _admin(recorder).close_device_connections("dev-pa1")

    assert closed == 2
    assert recorder.calls() == [
        ("GET", "/api/connections/username/dev-pa1"),
        # By user name (connection tracking), not by connection name (statistics, which lag).
        ("DELETE", "/api/connections/username/dev-pa1"),
    ]
    assert recorder.requests[1].headers["x-reason"] == "device revoked"


@pytest.mark.asyncio
async def test_close_device_connections_without_connections_still_closes() -> None:
    recorder = Recorder({("GET", "/api/connections/username/dev_9"): httpx.Response(200, json=[])})

    assert await _admin(recorder).close_device_connections("dev_9") == 0
    assert recorder.calls()[-1] == ("DELETE", "/api/connections/username/dev_9")


@pytest.mark.asyncio
async def test_close_device_connections_failure_is_broker_admin_error() -> None:
    recorder = Recorder(
        {
            ("GET", "/api/connections/username/dev-pa1"): httpx.Response(200, json=[]),
            ("DELETE", "/api/connections/username/dev-pa1"): httpx.Response(500, text="boom"),
        }
    )

    with pytest.raises(BrokerAdminError, match="DELETE /api/connections/username/dev-pa1 answered 500: boom"):
        await _admin(recorder).close_device_connections("dev-pa1")


@pytest.mark.asyncio
async def test_device_users_leave_out_the_core_and_non_device_names() -> None:
    entry = {"vhost": "devices", "configure": "", "write": "", "read": ""}
    listing = [
        {"user": "dev-1", **entry},
        {"user": "swarm-core", **entry},
        {"user": "someone.with.dots", **entry},
        {"user": "dev_2", **entry},
    ]
    recorder = Recorder({("GET", "/api/vhosts/devices/permissions"): httpx.Response(200, json=listing)})

    assert await _admin(recorder).device_users() == {"dev-1", "dev_2"}


def _self_signed(cn: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.mark.asyncio
async def test_from_settings(tmp_path: Path) -> None:
    core_cert = tmp_path / "core.crt"
    core_cert.write_bytes(_self_signed("swarm-core-7"))
    settings = BrokerSettings(
        management_url="http://127.0.0.1:35673",
        management_user="swarm-admin",
        management_password=SecretStr("s3cret"),
        cert_file=core_cert,
        devices_vhost="fleet",
    )
    admin = BrokerAdmin.from_settings(settings)
    # The factory's product is what is under test: look inside.
    client = admin._client
    try:
        assert client.base_url == httpx.URL("http://127.0.0.1:35673")
        assert client.timeout == httpx.Timeout(10.0)
        assert client.auth is not None
        authed = next(client.auth.auth_flow(client.build_request("GET", "/api/overview")))
        assert authed.headers["authorization"] == "Basic " + base64.b64encode(b"swarm-admin:s3cret").decode()
        assert admin._vhost == "fleet"
        # The core's certificate CN and the management user are not devices.
        assert admin._own_users == {"swarm-core-7", "swarm-admin"}
    finally:
        await admin.aclose()
    assert client.is_closed


@pytest.mark.asyncio
async def test_connections_are_parsed() -> None:
    listing = [
        {
            "name": "127.0.0.1:50001 -> 127.0.0.1:35883",
            "user": "dev-1",
            "vhost": "devices",
            "protocol": "MQTT 3.1.1",
            "connected_at": 1_700_000_000_123,
        },
        {"name": "handshaking", "vhost": "devices"},
    ]
    recorder = Recorder({("GET", "/api/vhosts/devices/connections"): httpx.Response(200, json=listing)})

    connections = await _admin(recorder).connections()

    assert connections == [
        ConnectionInfo(
            name="127.0.0.1:50001 -> 127.0.0.1:35883",
            user="dev-1",
            vhost="devices",
            protocol="MQTT 3.1.1",
            connected_at=datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC),
        ),
        ConnectionInfo(name="handshaking", user="", vhost="devices", protocol="", connected_at=None),
    ]
    assert recorder.requests[0].url.params["columns"] == "name,user,vhost,protocol,connected_at"


class FakeManagement:
    """Just enough state behind the user and permission endpoints to check idempotence."""

    def __init__(self) -> None:
        self.state: dict[str, dict[str, Any]] = {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = _raw_path(request)
        if request.method == "PUT":
            self.state[path] = json.loads(request.content)
            return httpx.Response(201)
        if request.method == "DELETE":
            user = path.rsplit("/", 1)[1]
            gone = [p for p in self.state if p.endswith("/" + user) or f"/user-limits/{user}/" in p]
            for p in gone:
                del self.state[p]
            return httpx.Response(204 if gone else 404)
        if path.startswith("/api/user-limits/"):
            user = path.rsplit("/", 1)[1]
            limits = {p.rsplit("/", 1)[1]: v["value"] for p, v in self.state.items() if p.startswith(path + "/")}
            return httpx.Response(200, json=[{"user": user, "value": limits}] if limits else [])
        if path not in self.state:
            return httpx.Response(404)
        stored = self.state[path]
        user = path.rsplit("/", 1)[1]
        if path.startswith("/api/topic-permissions/"):
            return httpx.Response(200, json=[{"user": user, "vhost": "devices", **stored}])
        return httpx.Response(200, json={"name": user, "user": user, **stored})


@pytest.mark.asyncio
async def test_device_provisioned_follows_provision_and_deprovision() -> None:
    fake = FakeManagement()
    admin = _admin(fake)

    assert await admin.device_provisioned("dev-pa1") is False
    await admin.provision_device("dev-pa1")
    snapshot = dict(fake.state)
    await admin.provision_device("dev-pa1")
    assert fake.state == snapshot
    assert await admin.device_provisioned("dev-pa1") is True

    await admin.deprovision_device("dev-pa1")
    await admin.deprovision_device("dev-pa1")
    assert fake.state == {}
    assert await admin.device_provisioned("dev-pa1") is False


@pytest.mark.asyncio
async def test_half_provisioned_or_edited_device_is_not_provisioned() -> None:
    fake = FakeManagement()
    admin = _admin(fake)
    await admin.provision_device("dev-pa1")

    fake.state["/api/permissions/devices/dev-pa1"] = {"configure": ".*", "write": ".*", "read": ".*"}
    assert await admin.device_provisioned("dev-pa1") is False

    await admin.provision_device("dev-pa1")
    del fake.state["/api/topic-permissions/devices/dev-pa1"]
    assert await admin.device_provisioned("dev-pa1") is False

    await admin.provision_device("dev-pa1")
    del fake.state["/api/user-limits/dev-pa1/max-connections"]
    assert await admin.device_provisioned("dev-pa1") is False


@pytest.mark.asyncio
async def test_a_blocked_device_is_still_provisioned_and_unblocks_to_its_limit() -> None:
    fake = FakeManagement()
    admin = _admin(fake)
    await admin.provision_device("dev-pa1")

    await admin.limit_connections("dev-pa1", 0)
    assert fake.state["/api/user-limits/dev-pa1/max-connections"] == {"value": 0}
    assert await admin.device_provisioned("dev-pa1") is True
    await admin.unblock_device("dev-pa1")
    assert fake.state["/api/user-limits/dev-pa1/max-connections"] == {"value": 2}


@pytest.mark.asyncio
async def test_network_error_is_broker_admin_error() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(BrokerAdminError, match=r"PUT /api/users/dev-pa1 failed: ConnectError"):
        await _admin(refuse).provision_device("dev-pa1")


@pytest.mark.asyncio
async def test_timeout_is_broker_admin_error() -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    with pytest.raises(BrokerAdminError, match=r"GET /api/vhosts/devices/permissions failed: ReadTimeout"):
        await _admin(slow).device_users()


@pytest.mark.asyncio
async def test_unauthorized_names_the_credentials() -> None:
    with pytest.raises(BrokerAdminError, match="refused the management credentials"):
        await _admin(Recorder(default=401)).provision_device("dev-pa1")


@pytest.mark.asyncio
@pytest.mark.parametrize("status", [500, 502, 503])
async def test_server_errors_are_broker_admin_errors(status: int) -> None:
    recorder = Recorder(default=status)

    with pytest.raises(BrokerAdminError, match=f"PUT /api/users/dev-pa1 answered {status}") as info:
        await _admin(recorder).provision_device("dev-pa1")
    assert info.value.status == 503
    # Stops at the first failure: no permissions for a user that may not exist.
    assert len(recorder.requests) == 1


@pytest.mark.asyncio
async def test_unexpected_json_is_broker_admin_error() -> None:
    recorder = Recorder({("GET", "/api/vhosts/devices/connections"): httpx.Response(200, json={"oops": 1})})

    with pytest.raises(BrokerAdminError, match="unexpected JSON"):
        await _admin(recorder).connections()
