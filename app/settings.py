"""One nested settings object, read from APP_* variables (`__` nests): APP_DATABASE__URL, ..."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class DatabaseSettings(BaseModel):
    url: SecretStr = SecretStr("postgresql+asyncpg://swarm@127.0.0.1:35432/swarm")
    pool_size: int = 20
    max_overflow: int = 10
    # Seconds a request waits for a connection or a statement before the API answers 503.
    timeout_s: float = 5.0
    # While an SSE stream or a long-poll waits, how often the app looks for new commits: the
    # most a wake-up lags behind the commit (app/events/feed.py).
    change_poll_interval_s: float = 0.05


class BrokerSettings(BaseModel):
    # The core connects over AMQPS with its own certificate (SASL EXTERNAL): no password.
    url: str = "amqps://127.0.0.1:35671/devices"
    ca_file: Path = Path(".run/dev/pki/ca.crt")
    cert_file: Path = Path(".run/dev/pki/core.crt")
    key_file: Path = Path(".run/dev/pki/core.key")
    devices_vhost: str = "devices"
    management_url: str = "http://127.0.0.1:35673"
    management_user: str = "swarm-admin"
    management_password: SecretStr = SecretStr("")
    # Where devices connect; only shown to operators and handed to the simulator.
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 35883
    # Messages a consumer may hold unacknowledged, per queue.
    prefetch: int = 64
    # Broker connections one device certificate may hold at once (a RabbitMQ user limit).
    device_max_connections: int = Field(default=2, ge=1)


class DeviceLimitSettings(BaseModel):
    """What one device may ask of the core (decision 46); the SDK stays under these by itself."""

    # Requests per second, per device and per app process, and the burst a quiet device may send.
    requests_per_s: float = Field(default=50.0, gt=0)
    burst: int = Field(default=100, ge=1)
    # A limited device is reported (event, device record) at most once per window.
    report_window_s: float = Field(default=60.0, gt=0)
    # A device sending faster than `block_rate_per_s` (over a burst of `block_burst`), or that
    # connects more often than `connects_per_window` in a window, is blocked at the broker for
    # `block_s`.
    block_rate_per_s: float = Field(default=100.0, gt=0)
    block_burst: int = Field(default=200, ge=1)
    connects_per_window: int = Field(default=20, ge=1)
    block_s: float = Field(default=60.0, gt=0)


class PkiSettings(BaseModel):
    ca_cert_file: Path = Path(".run/dev/pki/ca.crt")
    ca_key_file: Path = Path(".run/dev/pki/ca.key")
    device_cert_days: int = 825


class AuthSettings(BaseModel):
    """Bearer JWTs (ES256) of the control center, checked by nginx and again here, with scopes."""

    # Off only for a throw-away local run: every request then has every scope.
    enabled: bool = True
    public_key_file: Path = Path(".run/dev/secrets/jwt-public.pem")
    # Only the operator CLI signs tokens (`python -m app.cli token`); the app never reads it.
    signing_key_file: Path = Path(".run/dev/secrets/jwt-signing.key")
    audience: str = "swarm-core"
    issuer: str = "swarm-core"
    leeway_s: float = 10.0


class TaskSettings(BaseModel):
    default_timeout_s: int = 300
    default_max_attempts: int = 3
    max_params_bytes: int = 256 * 1024
    # A notice whose publish was not confirmed within this many seconds is sent again.
    notice_retry_after_s: float = 10.0
    # Notices expire in the broker after this long (MQTT 5 Message Expiry Interval): a device
    # offline for longer gets no stale notices, it pulls its tasks when it comes back anyway.
    notice_expiry_s: int = 3600
    long_poll_max_s: float = 60.0


class SmtpSettings(BaseModel):
    """Where process notifications are mailed (aiosmtplib). A server that is down delays mails:
    they wait in the outbox (process_outbox) and are retried."""

    host: str = "127.0.0.1"
    port: int = 25
    username: str | None = None
    password: SecretStr | None = None
    # Implicit TLS (usually port 465), or STARTTLS when the server offers it (None: if offered).
    use_tls: bool = False
    start_tls: bool | None = None
    sender: str = "swarm-core@localhost"
    timeout_s: float = 10.0


class ProcessSettings(BaseModel):
    # Roles that human steps may name; a token holds one as the scope `role:<name>`.
    roles: list[str] = ["operator", "engineer", "technologist", "admin"]
    smtp: SmtpSettings = SmtpSettings()
    webhook_timeout_s: float = 10.0
    # A notification that failed is tried again after this many seconds, doubling up to the max.
    retry_after_s: float = 5.0
    retry_max_s: float = 600.0
    # Steps advanced per job run and per kind (task results, timers), each in its own transaction.
    batch: int = 500


class SchedulerSettings(BaseModel):
    enabled: bool = True
    deadlines_interval_s: float = 2.0
    expiry_interval_s: float = 5.0
    notices_interval_s: float = 5.0
    presence_interval_s: float = 300.0
    configs_interval_s: float = 10.0
    processes_interval_s: float = 1.0
    blocks_interval_s: float = 5.0


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="APP_", env_nested_delimiter="__", extra="ignore")

    instance_name: str = "swarm-core"
    database: DatabaseSettings = DatabaseSettings()
    broker: BrokerSettings = BrokerSettings()
    pki: PkiSettings = PkiSettings()
    auth: AuthSettings = AuthSettings()
    tasks: TaskSettings = TaskSettings()
    processes: ProcessSettings = ProcessSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    device_limits: DeviceLimitSettings = DeviceLimitSettings()


@lru_cache
def get_settings() -> Settings:
    """Settings for the entry points (uvicorn factory, alembic); everything else gets them passed in."""
    return Settings()
