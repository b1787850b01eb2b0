#!/usr/bin/env bash
# docker-compose `pki` init service: the CA and certificates in the shared volume (idempotent,
# like pki.sh), and the RabbitMQ definitions (vhost, users) that the broker loads on boot.
# Runs in alpine as root; the keys are then handed to the users of the containers that read
# them: RabbitMQ (uid 999 in the official image) and the app (uid 10001, see Dockerfile).
set -euo pipefail

OUT="${PKI_DIR:-/pki}"
PKI_SH="$(dirname "${BASH_SOURCE[0]}")/pki.sh"
ADMIN_PASSWORD="${SWARM_ADMIN_PASSWORD:?set SWARM_ADMIN_PASSWORD}"
RABBITMQ_UID="${RABBITMQ_UID:-999}"
APP_UID="${APP_UID:-10001}"

bash "$PKI_SH" ca "$OUT"
# The app reaches the broker as "rabbitmq" inside the compose network; devices as localhost.
bash "$PKI_SH" server "$OUT" rabbitmq localhost DNS:localhost,DNS:rabbitmq,IP:127.0.0.1
bash "$PKI_SH" server "$OUT" nginx localhost DNS:localhost,DNS:nginx,IP:127.0.0.1
bash "$PKI_SH" client "$OUT" core swarm-core

# Operator tokens (ES256), made once: nginx and the app verify with the public key; the private
# key signs tokens in `docker compose exec app python -m app.cli token`.
if [ ! -s "$OUT/jwt-signing.key" ]; then
    (umask 077 && openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$OUT/jwt-signing.key")
fi
openssl pkey -in "$OUT/jwt-signing.key" -pubout -out "$OUT/jwt-public.pem"
chmod 644 "$OUT/jwt-public.pem"

# RabbitMQ's rabbit_password_hashing_sha256: base64(salt(4) + sha256(salt + password)).
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
openssl rand 4 >"$tmp/salt"
{ cat "$tmp/salt"; printf '%s' "$ADMIN_PASSWORD"; } | openssl dgst -sha256 -binary >"$tmp/digest"
admin_hash="$(cat "$tmp/salt" "$tmp/digest" | openssl base64 -A)"

# No user of the devices vhost has a password (swarm-core logs in with its certificate); the
# admin only uses the management API and has no permissions there. With definitions loaded on
# boot RabbitMQ creates no guest user.
cat >"$OUT/definitions.json.tmp" <<JSON
{
  "users": [
    {"name": "swarm-admin", "password_hash": "$admin_hash",
     "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": "administrator", "limits": {}},
    {"name": "swarm-core", "password_hash": "",
     "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": "", "limits": {}}
  ],
  "vhosts": [{"name": "devices"}],
  "permissions": [
    {"user": "swarm-core", "vhost": "devices", "configure": ".*", "write": ".*", "read": ".*"}
  ],
  "topic_permissions": [],
  "parameters": [],
  "global_parameters": [],
  "policies": [],
  "queues": [],
  "exchanges": [],
  "bindings": []
}
JSON
mv "$OUT/definitions.json.tmp" "$OUT/definitions.json"

chown "$RABBITMQ_UID:$RABBITMQ_UID" "$OUT/rabbitmq.key" "$OUT/definitions.json"
chmod 600 "$OUT/definitions.json"
chown "$APP_UID:$APP_UID" "$OUT/ca.key" "$OUT/core.key" "$OUT/jwt-signing.key"
echo "pki: ready in $OUT"
