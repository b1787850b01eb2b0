from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from swarm_device.protocol import DEVICE_ID_PATTERN


class DeviceCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(
        pattern=DEVICE_ID_PATTERN,
        description="Letters, digits, `_` and `-` (1-64): it becomes the certificate CN, the MQTT client id "
        "and the broker user.",
    )


class DeviceRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    firmware: str | None
    model: str | None
    capabilities: list[str]
    online: bool
    last_seen_at: datetime | None
    hello_at: datetime | None
    reported_state: dict[str, Any] | None
    reported_at: datetime | None
    revoked_at: datetime | None
    last_limited_at: datetime | None = Field(
        description="When the device last went over its limits (requests refused with `rate_limited`, or blocked)."
    )
    blocked_until: datetime | None = Field(
        description="Set while the broker refuses the device's connections: it flooded the core with requests or "
        "reconnected too often (cleared when the block is lifted)."
    )
    created_at: datetime
    updated_at: datetime


class DevicePage(BaseModel):
    items: list[DeviceRead]
    next_cursor: str | None


class CertificateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    csr_pem: str | None = Field(
        default=None,
        description="A PEM certificate signing request. Omit it to have the core make the key pair (the key is "
        "returned once and not stored).",
    )


class CertificateIssued(BaseModel):
    device_id: str
    serial: str
    fingerprint_sha256: str
    not_after: datetime
    certificate_pem: str
    ca_certificate_pem: str
    private_key_pem: str | None = Field(default=None, description="Only when the core made the key pair.")
    mqtt_host: str
    mqtt_port: int


class DeviceConfigRead(BaseModel):
    device_id: str
    desired: dict[str, Any] | None
    desired_at: datetime | None
    reported: dict[str, Any] | None = Field(description="What the device last reported with its `state` method.")
    reported_at: datetime | None
    in_sync: bool = Field(description="The reported configuration equals the desired one.")
    published: bool = Field(description="The desired configuration was acknowledged by the broker (retained).")
