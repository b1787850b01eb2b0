#!/bin/sh
# Renders rabbitmq/rabbitmq.conf.template into OUT: the one broker configuration of every local
# stack (scripts/stack/rabbitmq.sh) and of docker-compose's rabbitmq service. POSIX sh + sed: it
# runs in the official image too.
#
#   render.sh OUT
#
# Required: RABBITMQ_AMQP_LISTEN, RABBITMQ_AMQPS_LISTEN, RABBITMQ_MQTTS_LISTEN (port or addr:port),
# RABBITMQ_MGMT_PORT, RABBITMQ_PKI_DIR (holding ca.crt, rabbitmq.crt, rabbitmq.key as the node
# sees them).
# Optional: RABBITMQ_MGMT_IP (0.0.0.0), RABBITMQ_VHOST (devices), RABBITMQ_STATS_INTERVAL_MS
# (5000, whole seconds), RABBITMQ_DEFINITIONS_FILE (loaded on boot; compose creates its users so).
set -eu

here="$(cd "$(dirname "$0")" && pwd)"
out="${1:?usage: render.sh OUT}"
: "${RABBITMQ_AMQP_LISTEN:?}" "${RABBITMQ_AMQPS_LISTEN:?}" "${RABBITMQ_MQTTS_LISTEN:?}"
: "${RABBITMQ_MGMT_PORT:?}" "${RABBITMQ_PKI_DIR:?}"
stats_ms="${RABBITMQ_STATS_INTERVAL_MS:-5000}"
case "$stats_ms" in
"" | *[!0-9]*) stats_ms=bad ;;
esac
[ "$stats_ms" != bad ] && [ "$((stats_ms % 1000))" -eq 0 ] && [ "$stats_ms" -gt 0 ] || {
    echo "render.sh: RABBITMQ_STATS_INTERVAL_MS must be whole seconds in ms, not $stats_ms" >&2
    exit 1
}
stats_s=$((stats_ms / 1000))

sed -e "s|@AMQP_LISTEN@|$RABBITMQ_AMQP_LISTEN|g" \
    -e "s|@AMQPS_LISTEN@|$RABBITMQ_AMQPS_LISTEN|g" \
    -e "s|@MQTTS_LISTEN@|$RABBITMQ_MQTTS_LISTEN|g" \
    -e "s|@MGMT_IP@|${RABBITMQ_MGMT_IP:-0.0.0.0}|g" \
    -e "s|@MGMT_PORT@|$RABBITMQ_MGMT_PORT|g" \
    -e "s|@PKI_DIR@|$RABBITMQ_PKI_DIR|g" \
    -e "s|@VHOST@|${RABBITMQ_VHOST:-devices}|g" \
    -e "s|@STATS_INTERVAL_MS@|$stats_ms|g" \
    -e "s|@STATS_INTERVAL_S@|$stats_s|g" \
    "$here/rabbitmq.conf.template" >"$out.tmp"
if [ -n "${RABBITMQ_DEFINITIONS_FILE:-}" ]; then
    printf '\n## Users, vhost and permissions from a definitions file (compose).\nload_definitions = %s\n' \
        "$RABBITMQ_DEFINITIONS_FILE" >>"$out.tmp"
fi
if grep -q '@[A-Z_]*@' "$out.tmp"; then
    echo "render.sh: unreplaced placeholder in $out: $(grep -o '@[A-Z_]*@' "$out.tmp" | head -1)" >&2
    exit 1
fi
mv "$out.tmp" "$out"
