"""Operator command line: `python -m app.cli enrol ...` (talks to the core's HTTP API like any client),
`python -m app.cli token ...` (mints a bearer token with the stack's signing key),
`python -m app.cli conformance --device ID ...` (drives one device through the protocol's rules)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

import httpx

from app.auth import ROLE_SCOPE_PREFIX, Scope, mint_token
from app.conformance import kit
from app.settings import Settings


def enrol(api: str, device_ids: list[str], cert_dir: Path, headers: dict[str, str], verify: str | bool) -> int:
    """Create each device (idempotent), have the core make its key and certificate, write them
    as <cert_dir>/<id>.key and <id>.crt (and ca.crt) for the simulator or a real device."""
    cert_dir.mkdir(parents=True, exist_ok=True)
    with httpx.Client(base_url=api, headers=headers, verify=verify, timeout=30) as client:
        for device_id in device_ids:
            response = client.post("/devices", json={"id": device_id})
            if response.status_code not in (200, 201):
                print(f"{device_id}: {response.status_code} {response.text}", file=sys.stderr)
                return 1
            key_file = cert_dir / f"{device_id}.key"
            if key_file.exists():
                continue  # already has credentials: keep them (re-issuing would orphan the old key)
            response = client.post(f"/devices/{device_id}/certificate", json={})
            if response.status_code != 201:
                print(f"{device_id}: {response.status_code} {response.text}", file=sys.stderr)
                return 1
            issued = response.json()
            (cert_dir / f"{device_id}.crt").write_text(issued["certificate_pem"])
            key_file.touch(mode=0o600)
            key_file.write_text(issued["private_key_pem"])
            (cert_dir / "ca.crt").write_text(issued["ca_certificate_pem"])
    print(f"{len(device_ids)} devices enrolled; credentials in {cert_dir}")
    return 0


async def conformance(args: argparse.Namespace) -> int:
    # The tap's reconnects (e.g. during the broker-restart rule) are expected; the report says what matters.
    for noisy in ("aiormq", "aio_pika"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    settings = Settings(_env_file=args.env_file)
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    async with httpx.AsyncClient(base_url=args.api, headers=headers, verify=args.cacert or True, timeout=120) as api:
        results = await kit.check_device(
            settings.broker,
            api,
            args.device,
            args.rule,
            within_s=args.within,
            step_timeout_s=args.step_timeout,
            broker_restart=args.broker_restart,
        )
    print(kit.report(args.device, results))
    return 1 if any(result.passed is False for result in results) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.cli", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    enrol_cmd = commands.add_parser("enrol", help="enrol devices and write their credentials")
    enrol_cmd.add_argument("--api", default="http://127.0.0.1:35800/api/v1", help="the core's API base URL")
    enrol_cmd.add_argument("--prefix", default="dev-")
    enrol_cmd.add_argument("--count", type=int, default=1)
    enrol_cmd.add_argument("--start", type=int, default=1)
    enrol_cmd.add_argument("--cert-dir", type=Path, default=Path(".run/dev/devices"))
    enrol_cmd.add_argument("--token", default=None, help="a bearer token (when the API requires one)")
    enrol_cmd.add_argument("--cacert", default=None, help="CA file to verify an HTTPS API with")
    token_cmd = commands.add_parser("token", help="print a bearer token for an operator")
    token_cmd.add_argument("--sub", default="operator", help="who the token is for (its subject)")
    token_cmd.add_argument(
        "--scope", action="append", choices=list(Scope), help="repeat for several (default: all scopes)"
    )
    token_cmd.add_argument(
        "--role", action="append", default=[], help="a process role the holder works as (repeat for several)"
    )
    token_cmd.add_argument("--ttl", type=int, default=3600, help="seconds the token is valid")
    token_cmd.add_argument("--env-file", type=Path, help="settings file, e.g. .run/dev/app.env (default: APP_*)")
    conformance_cmd = commands.add_parser(
        "conformance", help="drive one device through the protocol's rules and print a pass/fail report"
    )
    conformance_cmd.add_argument("--device", required=True, help="the device id (it must be running)")
    conformance_cmd.add_argument("--api", default="http://127.0.0.1:35800/api/v1", help="the core's API base URL")
    conformance_cmd.add_argument("--token", default=None, help="a bearer token (tasks:read and tasks:write)")
    conformance_cmd.add_argument("--cacert", default=None, help="CA file to verify an HTTPS API with")
    conformance_cmd.add_argument(
        "--env-file", type=Path, help="the stack's settings, e.g. .run/dev/app.env: AMQP and management access"
    )
    conformance_cmd.add_argument("--rule", action="append", choices=list(kit.RULES), help="repeat (default: all)")
    conformance_cmd.add_argument("--within", type=float, default=60.0, help="seconds the device gets per step")
    conformance_cmd.add_argument("--step-timeout", type=int, default=5, help="the progress rule's step timeout")
    conformance_cmd.add_argument("--broker-restart", metavar="COMMAND", help="a shell command restarting the broker")
    args = parser.parse_args(argv)
    if args.command == "conformance":
        return asyncio.run(conformance(args))
    if args.command == "token":
        settings = Settings(_env_file=args.env_file)
        roles = [f"{ROLE_SCOPE_PREFIX}{role}" for role in args.role]
        print(mint_token(settings.auth, args.sub, [*(args.scope or list(Scope)), *roles], args.ttl))
        return 0
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    verify: str | bool = args.cacert or True
    ids = [f"{args.prefix}{n}" for n in range(args.start, args.start + args.count)]
    return enrol(args.api, ids, args.cert_dir, headers, verify)


if __name__ == "__main__":
    sys.exit(main())
