"""Delivery of process notifications from the outbox: e-mail over SMTP (aiosmtplib) and
webhooks (httpx). At least once: a notification is leased before it is sent and marked sent
after; a sender that dies in between leaves it due again when the lease runs out."""

from __future__ import annotations

import logging
from email.message import EmailMessage

import aiosmtplib
import httpx

from app.processes import service
from app.processes.models import ProcessOutbox
from app.settings import ProcessSettings

log = logging.getLogger(__name__)

BATCH = 50
# Longer than the slowest delivery of a batch may take.
LEASE_S = 300.0


async def deliver_due(deps: service.Deps, http: httpx.AsyncClient) -> tuple[int, int]:
    """Send what is due; (sent, failed)."""
    sent = failed = 0
    for notification in await service.lease_notifications(deps, BATCH, LEASE_S):
        error = await _deliver(deps.settings.processes, http, notification)
        if error is not None:
            log.warning("notification %d (%s) failed, retried later: %s", notification.id, notification.channel, error)
        await service.record_notification_outcome(deps, notification, error)
        sent, failed = (sent + 1, failed) if error is None else (sent, failed + 1)
    return sent, failed


async def _deliver(settings: ProcessSettings, http: httpx.AsyncClient, notification: ProcessOutbox) -> str | None:
    """None when delivered, else why not."""
    try:
        if notification.channel == "email":
            await send_mail(settings, notification.recipients, notification.subject, notification.body)
        else:
            assert notification.url is not None
            response = await http.post(
                notification.url,
                json={
                    "instance_id": str(notification.instance_id),
                    "step": notification.step,
                    "subject": notification.subject,
                    "body": notification.body,
                },
                timeout=settings.webhook_timeout_s,
            )
            response.raise_for_status()
    except (aiosmtplib.SMTPException, httpx.HTTPError, OSError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


async def send_mail(settings: ProcessSettings, recipients: list[str], subject: str, body: str) -> None:
    smtp = settings.smtp
    message = EmailMessage()
    message["From"] = smtp.sender
    message["To"] = ", ".join(recipients)
    message["Subject"] = subject
    message.set_content(body)
    await aiosmtplib.send(
        message,
        hostname=smtp.host,
        port=smtp.port,
        username=smtp.username,
        password=smtp.password.get_secret_value() if smtp.password else None,
        use_tls=smtp.use_tls,
        start_tls=smtp.start_tls,
        timeout=smtp.timeout_s,
    )
