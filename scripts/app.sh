#!/usr/bin/env bash
# The app of one stack, in the background, with the settings that scripts/stack.sh wrote:
#
#   scripts/app.sh start | stop | status | migrate | info
#
# Pid file and log: .run/$SWARM_STACK/app.pid, .run/$SWARM_STACK/app.log.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STACK="${SWARM_STACK:-dev}"
RUN="$ROOT/.run/$STACK"
APP_ENV="$RUN/app.env"
PIDFILE="$RUN/app.pid"
LOGFILE="$RUN/app.log"
HEALTH_TIMEOUT_S="${SWARM_APP_START_TIMEOUT:-60}"

die() {
    echo "app.sh: $*" >&2
    exit 1
}

load_env() {
    [[ -f "$APP_ENV" ]] || die "no $APP_ENV: run 'make services' (or SWARM_STACK=$STACK scripts/stack.sh services) first"
    set -a
    # shellcheck source=/dev/null
    . "$APP_ENV"
    set +a
}

app_pid() {
    local pid
    [[ -s "$PIDFILE" ]] || return 1
    pid="$(cat "$PIDFILE")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    # Only the uvicorn we started, not whatever reused the pid.
    tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -q uvicorn || return 1
    echo "$pid"
}

healthy() {
    curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:$SWARM_APP_PORT/healthz" 2>/dev/null
}

cmd_migrate() {
    load_env
    cd "$ROOT"
    .venv/bin/alembic upgrade head
}

cmd_start() {
    load_env
    cd "$ROOT"
    local pid
    if pid="$(app_pid)"; then
        echo "app: already running (pid $pid) on http://127.0.0.1:$SWARM_APP_PORT"
    else
        echo "app: starting on http://127.0.0.1:$SWARM_APP_PORT (log $LOGFILE)"
        echo "---- $(date -Is) start" >>"$LOGFILE"
        setsid .venv/bin/uvicorn app.main:create_app_from_env --factory \
            --host 127.0.0.1 --port "$SWARM_APP_PORT" --loop uvloop --http httptools \
            >>"$LOGFILE" 2>&1 </dev/null &
        pid=$!
        echo "$pid" >"$PIDFILE"
    fi
    local deadline=$((SECONDS + HEALTH_TIMEOUT_S))
    until healthy; do
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$PIDFILE"
            tail -n 40 "$LOGFILE" >&2
            die "the app exited during start-up (log above, $LOGFILE)"
        fi
        if ((SECONDS >= deadline)); then
            tail -n 40 "$LOGFILE" >&2
            die "no answer from /healthz within $HEALTH_TIMEOUT_S s (log above, $LOGFILE)"
        fi
        sleep 0.5
    done
    echo "app: healthy (pid $pid)"
}

cmd_stop() {
    local pid
    if ! pid="$(app_pid)"; then
        rm -f "$PIDFILE"
        return 0
    fi
    echo "app: stopping (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "app: still running after 15 s, killing pid $pid" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$PIDFILE"
}

cmd_status() {
    local pid
    if pid="$(app_pid)"; then
        echo "app: running (pid $pid)"
    else
        echo "app: stopped"
        return 1
    fi
}

cmd_info() {
    load_env
    local url="https://localhost:$SWARM_NGINX_PORT"
    local tls="--cacert $APP_PKI__CA_CERT_FILE"
    cat <<EOF

Swarm Core ($STACK) is up, behind nginx at $url (TLS with the stack's CA, bearer JWT).
  console:   $url/console   (sign in with a token from the command below; the stack's CA is
             $APP_PKI__CA_CERT_FILE: trust it or accept the browser's warning)
  API docs:  $url/docs   (the app itself: http://127.0.0.1:$SWARM_APP_PORT)
  log:       $LOGFILE        settings: $APP_ENV

A token (every scope, valid 1 h; --scope, --ttl, --sub: see --help), from this folder:
  TOKEN=\$(.venv/bin/python -m app.cli token --env-file $APP_ENV)

Create a device and give it a task:
  curl $tls -X POST $url/api/v1/devices -H "Authorization: Bearer \$TOKEN" -H 'content-type: application/json' -d '{"id":"dev-1"}'
  curl $tls -X POST $url/api/v1/devices/dev-1/tasks -H "Authorization: Bearer \$TOKEN" -H 'content-type: application/json' -d '{"method":"reboot","params":{}}'
  curl $tls "$url/api/v1/tasks?device_id=dev-1" -H "Authorization: Bearer \$TOKEN"

Enrol devices dev-1..dev-3 (their keys and certificates go to $RUN/devices/), then run them:
  .venv/bin/python -m app.cli enrol --api $url/api/v1 --token "\$TOKEN" $tls --prefix dev- --count 3 --cert-dir $RUN/devices
  .venv/bin/swarm-device-sim --count 3 --prefix dev- --host $APP_BROKER__MQTT_HOST --port $APP_BROKER__MQTT_PORT \\
      --ca $APP_BROKER__CA_FILE --cert-dir $RUN/devices

Stop everything: make down
EOF
}

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
migrate) cmd_migrate ;;
info) cmd_info ;;
*)
    echo "usage: [SWARM_STACK=dev|test] scripts/app.sh start|stop|status|migrate|info" >&2
    exit 2
    ;;
esac
