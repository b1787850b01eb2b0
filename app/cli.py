"""Operator command line: `python -m app.cli enrol ...` (talks to the core's HTTP API like any client),
`python -m app.cli token ...` (mints a bearer token with the stack's signing key)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import httpx

from app.auth import ROLE_SCOPE_PREFIX, Scope, mint_token
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
    args = parser.parse_args(argv)
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
