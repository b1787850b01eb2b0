#!/usr/bin/env bash
# The project's own service processes (PKI, PostgreSQL, RabbitMQ, nginx) for one stack, without Docker
# and without touching system services: every file lives under .run/$SWARM_STACK/, every port
# is the stack's own, so several stacks run side by side. Each service is in scripts/stack/.
#
#   scripts/stack.sh install | services | down | status | env | stop|start rabbitmq|postgres
#
# SWARM_STACK (default dev) names the stack; SWARM_PORT_BASE overrides its port base
# (dev 35000, test 36000); SWARM_BROKER_STATS_INTERVAL_MS (default 5000) sets how often the
# broker collects its management statistics (a change restarts the node).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
for part in common install pki postgres rabbitmq nginx; do
    # shellcheck source=/dev/null
    . "$ROOT/scripts/stack/$part.sh"
done

APP_ENV="$RUN/app.env"

write_app_env() {
    local content
    content="$(
        cat <<EOF_ENV
APP_DATABASE__URL=postgresql+asyncpg://swarm:$(secret pg_password)@127.0.0.1:$PG_PORT/swarm
APP_BROKER__URL=amqps://localhost:$AMQPS_PORT/$VHOST
APP_BROKER__CA_FILE=$PKI/ca.crt
APP_BROKER__CERT_FILE=$PKI/core.crt
APP_BROKER__KEY_FILE=$PKI/core.key
APP_BROKER__MANAGEMENT_URL=http://127.0.0.1:$MGMT_PORT
APP_BROKER__MANAGEMENT_USER=$ADMIN_USER
APP_BROKER__MANAGEMENT_PASSWORD=$(secret admin_password)
APP_BROKER__MQTT_HOST=localhost
APP_BROKER__MQTT_PORT=$MQTTS_PORT
APP_PKI__CA_CERT_FILE=$PKI/ca.crt
APP_PKI__CA_KEY_FILE=$PKI/ca.key
APP_AUTH__PUBLIC_KEY_FILE=$JWT_PUBLIC_KEY
APP_AUTH__SIGNING_KEY_FILE=$JWT_SIGNING_KEY
APP_AUTH__AUDIENCE=$JWT_AUDIENCE
APP_AUTH__ISSUER=$JWT_ISSUER
SWARM_APP_PORT=$APP_PORT
SWARM_NGINX_PORT=$NGINX_PORT
SWARM_AMQP_PORT=$AMQP_PORT
SWARM_STACK_DIR=$RUN
EOF_ENV
    )"
    if [[ "$(cat "$APP_ENV" 2>/dev/null)" != "$content" ]]; then
        (umask 077 && echo "$content" >"$APP_ENV.tmp")
        mv "$APP_ENV.tmp" "$APP_ENV"
    fi
}

app_pid() {
    local pid
    [[ -s "$RUN/app.pid" ]] || return 1
    pid="$(cat "$RUN/app.pid")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -q uvicorn || return 1
    echo "$pid"
}

cmd_services() {
    need_root
    take_lock
    local t0=$SECONDS
    ensure_dirs
    pki_up
    jwt_keys
    pg_up
    rmq_up
    write_app_env
    nginx_up
    log "services up in $((SECONDS - t0)) s"
    cat <<EOF_INFO
  postgres   127.0.0.1:$PG_PORT         db swarm, role swarm (password in $SECRETS/pg_password)
  rabbitmq   amqps://localhost:$AMQPS_PORT/$VHOST (EXTERNAL, cert $PKI/core.crt), RabbitMQ 4.0 in $RMQ_CHROOT
             amqp 127.0.0.1:$AMQP_PORT (diagnostics)   mqtts localhost:$MQTTS_PORT (MQTT 5 and 3.1.1)
             management http://127.0.0.1:$MGMT_PORT ($ADMIN_USER, password in $SECRETS/admin_password)
  app        http://127.0.0.1:$APP_PORT (when started)
  nginx      https://localhost:$NGINX_PORT -> app (JWT, CA $PKI/ca.crt; tokens: python -m app.cli token)
  settings   $APP_ENV
EOF_INFO
}

# Stops only what this stack started, and unmounts everything its broker had mounted.
cmd_down() {
    need_root
    take_lock
    if [[ -f "$RUN/app.pid" ]]; then
        SWARM_STACK="$STACK" bash "$ROOT/scripts/app.sh" stop 9>&-
    fi
    nginx_down
    rmq_stop
    pg_down
    log "down"
}

cmd_status() {
    local pid
    echo "stack $STACK ($RUN), port base $BASE"
    if pg_running; then
        echo "  postgres   running   127.0.0.1:$PG_PORT"
    else
        echo "  postgres   stopped"
    fi
    if pid="$(rmq_pid)"; then
        echo "  rabbitmq   running   pid $pid, node $RMQ_NODE, amqps $AMQPS_PORT, mqtts $MQTTS_PORT, mgmt $MGMT_PORT, epmd $EPMD_PORT"
    else
        echo "  rabbitmq   stopped"
    fi
    if [[ -n "$(rmq_mounts)" ]]; then
        echo "  mounts     $(rmq_mounts | tr '\n' ' ')"
    fi
    if pid="$(app_pid)"; then
        echo "  app        running   pid $pid, http://127.0.0.1:$APP_PORT"
    else
        echo "  app        stopped"
    fi
    if pid="$(nginx_pid)"; then
        echo "  nginx      running   pid $pid, https://localhost:$NGINX_PORT"
    else
        echo "  nginx      stopped"
    fi
    if [[ -f "$APP_ENV" ]]; then
        echo "  settings   $APP_ENV"
    fi
}

cmd_env() {
    [[ -f "$APP_ENV" ]] || die "no $APP_ENV yet: run scripts/stack.sh services"
    echo "$APP_ENV"
}

# One service of a running stack, for the fault tests: `stop rabbitmq`, `start postgres`, ...
cmd_service() {
    need_root
    take_lock
    case "$1 ${2:-}" in
    "stop rabbitmq") rmq_stop ;;
    "start rabbitmq") rmq_running || rmq_start ;;
    "stop postgres") pg_down ;;
    "start postgres") pg_up ;;
    *) die "usage: scripts/stack.sh stop|start rabbitmq|postgres" ;;
    esac
}

case "${1:-}" in
install) cmd_install ;;
services) cmd_services ;;
down) cmd_down ;;
status) cmd_status ;;
env) cmd_env ;;
stop | start) cmd_service "$1" "${2:-}" ;;
*)
    echo "usage: [SWARM_STACK=dev|test] scripts/stack.sh install|services|down|status|env|stop <svc>|start <svc>" >&2
    exit 2
    ;;
esac
