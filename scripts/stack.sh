#!/usr/bin/env bash
# The project's own service processes (PKI, PostgreSQL, RabbitMQ, nginx) for one stack, without Docker
# and without touching system services: every file lives under .run/$SWARM_STACK/, every port
# is the stack's own, so a dev and a test stack run side by side.
#
#   scripts/stack.sh install | services | down | status | env
#
# SWARM_STACK (default dev) names the stack; SWARM_PORT_BASE overrides its port base
# (dev 35000, test 36000); SWARM_BROKER_STATS_INTERVAL_MS (default 5000) sets how often the
# broker collects its management statistics (a change restarts the node). See LOCAL-STACK.md in
# the design notes for why RabbitMQ is started the way it is.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STACK="${SWARM_STACK:-dev}"

die() {
    echo "stack.sh: $*" >&2
    exit 1
}
log() { echo "[$STACK] $*"; }

[[ "$STACK" =~ ^[a-z0-9][a-z0-9-]{0,30}$ ]] || die "bad SWARM_STACK: $STACK"
[[ "$ROOT" != *[[:space:]]* ]] || die "the checkout path must not contain white space: $ROOT"

case "$STACK" in
dev) BASE="${SWARM_PORT_BASE:-35000}" ;;
test) BASE="${SWARM_PORT_BASE:-36000}" ;;
*) BASE="${SWARM_PORT_BASE:-}" ;;
esac
[[ "$BASE" =~ ^[0-9]+$ ]] || die "set SWARM_PORT_BASE (a number) for stack $STACK"
# The Erlang distribution port is AMQP + 20000 and the CLI tools take the 10 ports after it.
((BASE >= 1024 && BASE + 672 + 20000 + 10 <= 65535)) || die "SWARM_PORT_BASE out of range: $BASE"

PG_PORT=$((BASE + 432))
AMQPS_PORT=$((BASE + 671))
AMQP_PORT=$((BASE + 672))
MGMT_PORT=$((BASE + 673))
MQTTS_PORT=$((BASE + 883))
DIST_PORT=$((AMQP_PORT + 20000))
APP_PORT=$((BASE + 800))
NGINX_PORT=$((BASE + 443))

RUN="$ROOT/.run/$STACK"
PKI="$RUN/pki"
SECRETS="$RUN/secrets"
APP_ENV="$RUN/app.env"
# Operator tokens: ES256, signed by the CLI with the private key; nginx and the app get only the
# public key.
JWT_SIGNING_KEY="$SECRETS/jwt-signing.key"
JWT_PUBLIC_KEY="$SECRETS/jwt-public.pem"
JWT_AUDIENCE=swarm-core
JWT_ISSUER=swarm-core
NGINX_DIR="$RUN/nginx"

PGBIN=/usr/lib/postgresql/15/bin
PG_DIR="$RUN/pg"
PGDATA="$PG_DIR/data"
PG_SOCK="$PG_DIR/run"

RMQ_DIR="$RUN/rabbitmq"
RMQ_NODE="swarm-$STACK@localhost"
RMQ_PIDFILE="$RMQ_DIR/node.pid"
VHOST=devices
# Open files of the RabbitMQ node: one socket per connected device, and the node keeps ~10% of
# the limit for files. The shell's default here (20,000) caps the node near 18,000 sockets.
RMQ_NOFILE=100000
# The management statistics of every connection, channel and queue, collected this often: with
# thousands of devices the node's largest background work (docs/performance.md, Connections).
# The tests read consumer counts from them, so they want the 5 s default.
STATS_INTERVAL_MS="${SWARM_BROKER_STATS_INTERVAL_MS:-5000}"
[[ "$STATS_INTERVAL_MS" =~ ^[1-9][0-9]*000$ ]] || die "SWARM_BROKER_STATS_INTERVAL_MS must be whole seconds in ms"
ADMIN_USER=swarm-admin
CORE_USER=swarm-core

APT_PACKAGES=(rabbitmq-server nginx libnginx-mod-http-js mosquitto-clients postgresql-15 openssl curl ca-certificates)

# One stack.sh at a time per stack: the tests start the test stack themselves, so two runs may
# meet. The daemons started under the lock must not inherit its descriptor (9>&-).
take_lock() {
    mkdir -p "$ROOT/.run"
    exec 9>"$ROOT/.run/.$STACK.lock"
    flock -w 300 9 || die "another scripts/stack.sh is busy with stack $STACK"
}

need_root() {
    [[ "$(id -u)" -eq 0 ]] || die "run as root (PostgreSQL runs as the postgres user through runuser)"
}

# ---------------------------------------------------------------------------------------- install

pkg_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

install_apt() {
    local missing=() p
    for p in "${APT_PACKAGES[@]}"; do
        pkg_installed "$p" || missing+=("$p")
    done
    local compose_missing=0
    pkg_installed docker-compose || compose_missing=1
    if ((${#missing[@]} == 0 && compose_missing == 0)); then
        return 0
    fi
    log "apt: installing ${missing[*]} $( ((compose_missing)) && echo docker-compose)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    if ((${#missing[@]})); then
        apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    if ((compose_missing)); then
        apt-get install -y -qq --no-install-recommends docker-compose >/dev/null
    fi
}

install_venv() {
    cd "$ROOT"
    local stamp=.venv/.swarm-install-stamp sum
    sum="$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
    if [[ -x .venv/bin/python && -f "$stamp" && "$(cat "$stamp")" == "$sum" ]]; then
        return 0
    fi
    if ! command -v uv >/dev/null; then
        log "pip: installing uv"
        python3 -m pip install -q uv || python3 -m pip install -q --break-system-packages uv
    fi
    # No interpreter downloads: only PyPI is reachable from the machines this runs on.
    export UV_PYTHON_DOWNLOADS=never
    [[ -x .venv/bin/python ]] || uv venv -q .venv --python 3.11
    log "venv: installing requirements"
    uv pip install -q -r requirements.txt --python .venv/bin/python
    uv pip install -q --no-deps -e . --python .venv/bin/python
    echo "$sum" >"$stamp"
}

cmd_install() {
    need_root
    install_apt
    install_venv
}

# --------------------------------------------------------------------------------------- folders

# PostgreSQL runs as postgres and must reach its data folder through every parent folder.
ensure_dirs() {
    mkdir -p "$RUN" "$SECRETS"
    chmod 700 "$SECRETS"
    local d
    for d in "$ROOT/.run" "$RUN"; do
        [[ -n "$(find "$d" -maxdepth 0 -perm -o+x)" ]] || chmod o+x "$d"
    done
    if ! runuser -u postgres -- test -x "$RUN"; then
        # A parent of the checkout is closed to others (e.g. /root); open it for traversal only.
        d="$ROOT"
        while [[ "$d" != / ]]; do
            if [[ -z "$(find "$d" -maxdepth 0 -perm -o+x)" ]]; then
                log "chmod o+x $d (postgres must traverse it to reach $PG_DIR)"
                chmod o+x "$d"
            fi
            d="$(dirname "$d")"
        done
    fi
}

# require_free_ports NAME PORT...: refuse to start NAME on a port that something else listens on
# (another checkout's stack, a colleague's broker), with a message instead of a boot crash.
require_free_ports() {
    local name="$1" port owner
    shift
    command -v ss >/dev/null || return 0
    for port in "$@"; do
        owner="$(ss -Hltnp "sport = :$port" 2>/dev/null | grep -o 'users:.*' | head -1 || true)"
        if [[ -n "$owner" ]] || [[ -n "$(ss -Hltn "sport = :$port" 2>/dev/null)" ]]; then
            die "cannot start $name: port $port is in use ${owner:-by another process} (SWARM_PORT_BASE picks other ports)"
        fi
    done
}

# secret NAME: prints the stored secret, generating it once.
secret() {
    local f="$SECRETS/$1"
    if [[ ! -s "$f" ]]; then
        (umask 077 && openssl rand -hex 24 >"$f")
    fi
    cat "$f"
}

# ------------------------------------------------------------------------------------------- PKI

pki_up() {
    local pki_sh="$ROOT/pki/pki.sh"
    bash "$pki_sh" ca "$PKI" >/dev/null
    bash "$pki_sh" server "$PKI" rabbitmq localhost DNS:localhost,IP:127.0.0.1 >/dev/null
    bash "$pki_sh" server "$PKI" nginx localhost DNS:localhost,IP:127.0.0.1 >/dev/null
    bash "$pki_sh" client "$PKI" core "$CORE_USER" >/dev/null
}

# The token signing key pair, made once (rotating it would void every operator's token).
jwt_keys() {
    if [[ ! -s "$JWT_SIGNING_KEY" ]]; then
        (umask 077 && openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$JWT_SIGNING_KEY.tmp" 2>/dev/null)
        mv "$JWT_SIGNING_KEY.tmp" "$JWT_SIGNING_KEY"
        rm -f "$JWT_PUBLIC_KEY"
    fi
    if [[ ! -s "$JWT_PUBLIC_KEY" ]]; then
        openssl pkey -in "$JWT_SIGNING_KEY" -pubout -out "$JWT_PUBLIC_KEY"
    fi
}

# ------------------------------------------------------------------------------------ PostgreSQL

as_pg() { runuser -u postgres -- "$@"; }

pg_running() {
    [[ -f "$PGDATA/PG_VERSION" ]] && as_pg "$PGBIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1
}

pg_config() {
    cat <<EOF
# Written by scripts/stack.sh on every run; edit the script, not this file.
port = $PG_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$PG_SOCK'
password_encryption = scram-sha-256
max_connections = 200
EOF
    if [[ "$STACK" == test ]]; then
        # Throw-away data: no fsync (an OS crash may lose data, a crash of PostgreSQL does not).
        # synchronous_commit stays on: off, a kill -9 of PostgreSQL lost commits it had
        # acknowledged, and the fault tests then saw results "accepted" that were not stored.
        printf 'fsync = off\nfull_page_writes = off\n'
    fi
}

pg_up() {
    [[ -x "$PGBIN/initdb" ]] || die "PostgreSQL 15 is not installed (scripts/stack.sh install)"
    mkdir -p "$PG_DIR"
    chown postgres:postgres "$PG_DIR"
    chmod 700 "$PG_DIR"
    if [[ ! -f "$PGDATA/PG_VERSION" ]]; then
        log "postgres: initdb $PGDATA"
        as_pg mkdir -p "$PG_SOCK"
        as_pg "$PGBIN/initdb" -D "$PGDATA" -U postgres -E UTF8 --locale=C.UTF-8 \
            --auth-local=peer --auth-host=scram-sha-256 >"$PG_DIR/initdb.log"
        echo "include_if_exists = 'swarm.conf'" | as_pg tee -a "$PGDATA/postgresql.conf" >/dev/null
    fi
    as_pg mkdir -p "$PG_SOCK"
    local conf changed=0
    conf="$(pg_config)"
    if [[ "$(cat "$PGDATA/swarm.conf" 2>/dev/null)" != "$conf" ]]; then
        echo "$conf" | as_pg tee "$PGDATA/swarm.conf" >/dev/null
        changed=1
    fi
    if pg_running && ((changed)); then
        log "postgres: configuration changed, restarting"
        as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null
    fi
    if ! pg_running; then
        require_free_ports postgres "$PG_PORT"
        log "postgres: starting on 127.0.0.1:$PG_PORT"
        as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$PG_DIR/postgres.log" -w -t 60 start >/dev/null 9>&- ||
            {
                tail -n 30 "$PG_DIR/postgres.log" >&2
                die "postgres did not start"
            }
    fi
    local pw
    pw="$(secret pg_password)"
    # Idempotent: the role is (re)given the stored password, CREATEDB because the tests drop
    # and recreate their own database.
    as_pg "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$PG_SOCK" -p "$PG_PORT" -U postgres -d postgres >/dev/null <<SQL
\\set pw '$pw'
SELECT 'CREATE ROLE swarm LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'swarm') \\gexec
ALTER ROLE swarm WITH LOGIN CREATEDB PASSWORD :'pw';
SELECT 'CREATE DATABASE swarm OWNER swarm' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'swarm') \\gexec
SQL
}

pg_down() {
    if pg_running; then
        log "postgres: stopping"
        as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -m fast -w -t 60 stop >/dev/null
    fi
}

# -------------------------------------------------------------------------------------- RabbitMQ

# The node and its CLI read only what is under the run folder: own config, own Erlang cookie
# ($HOME), own ports. /usr/sbin/rabbitmq* would su to the rabbitmq user with another HOME.
rmq_env() {
    export RABBITMQ_NODENAME="$RMQ_NODE"
    export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
    export RABBITMQ_NODE_PORT="$AMQP_PORT"
    export RABBITMQ_DIST_PORT="$DIST_PORT"
    # The CLI's own distribution listener defaults to 35672-35682, which is the dev stack's
    # AMQP port: a `rabbitmqctl wait` started before the node would steal it.
    export RABBITMQ_CTL_DIST_PORT_MIN=$((DIST_PORT + 1))
    export RABBITMQ_CTL_DIST_PORT_MAX=$((DIST_PORT + 10))
    export RABBITMQ_CONF_ENV_FILE="$RMQ_DIR/conf/rabbitmq-env.conf"
    export RABBITMQ_CONFIG_FILE="$RMQ_DIR/conf/rabbitmq.conf"
    export RABBITMQ_ADVANCED_CONFIG_FILE="$RMQ_DIR/conf/advanced.config"
    export RABBITMQ_ENABLED_PLUGINS_FILE="$RMQ_DIR/conf/enabled_plugins"
    export RABBITMQ_MNESIA_BASE="$RMQ_DIR/mnesia"
    export RABBITMQ_LOG_BASE="$RMQ_DIR/log"
    export RABBITMQ_PID_FILE="$RMQ_PIDFILE"
    export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
    export ERL_EPMD_ADDRESS=127.0.0.1
    export HOME="$RMQ_DIR/home"
    export PATH="/usr/lib/rabbitmq/bin:$PATH"
}

rmqctl() { (rmq_env && rabbitmqctl -q "$@"); }

rmq_pid() {
    local pid
    [[ -s "$RMQ_PIDFILE" ]] || return 1
    pid="$(cat "$RMQ_PIDFILE")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    # Guard against a reused pid: it must be this stack's node (the 3.10 node name is not on
    # its command line, it comes from the environment).
    tr '\0' '\n' 2>/dev/null <"/proc/$pid/environ" | grep -qx "RABBITMQ_NODENAME=$RMQ_NODE" || return 1
    echo "$pid"
}

rmq_running() { rmq_pid >/dev/null; }

rmq_render_config() {
    local out="$1"
    sed -e "s|@AMQP_PORT@|$AMQP_PORT|g" -e "s|@AMQPS_PORT@|$AMQPS_PORT|g" \
        -e "s|@MGMT_PORT@|$MGMT_PORT|g" -e "s|@MQTTS_PORT@|$MQTTS_PORT|g" \
        -e "s|@CA_FILE@|$PKI/ca.crt|g" -e "s|@CERT_FILE@|$PKI/rabbitmq.crt|g" \
        -e "s|@KEY_FILE@|$PKI/rabbitmq.key|g" -e "s|@VHOST@|$VHOST|g" \
        -e "s|@STATS_INTERVAL_MS@|$STATS_INTERVAL_MS|g" -e "s|@STATS_INTERVAL_S@|$((STATS_INTERVAL_MS / 1000))|g" \
        "$ROOT/rabbitmq/rabbitmq.conf.template" >"$out"
    if grep -q '@[A-Z_]*@' "$out"; then
        die "unreplaced placeholder in $out: $(grep -o '@[A-Z_]*@' "$out" | head -1)"
    fi
}

# Writes the node's config files; prints "changed" when any of them changed.
rmq_write_config() {
    local conf="$RMQ_DIR/conf" tmp f
    mkdir -p "$conf" "$RMQ_DIR/mnesia" "$RMQ_DIR/log" "$RMQ_DIR/home"
    chmod 700 "$RMQ_DIR/home"
    tmp="$(mktemp -d)"
    rmq_render_config "$tmp/rabbitmq.conf"
    cp "$ROOT/rabbitmq/enabled_plugins" "$ROOT/rabbitmq/rabbitmq-env.conf" \
        "$ROOT/rabbitmq/advanced.config" "$tmp/"
    for f in rabbitmq.conf enabled_plugins rabbitmq-env.conf advanced.config; do
        if ! cmp -s "$tmp/$f" "$conf/$f"; then
            cp "$tmp/$f" "$conf/$f"
            echo changed
        fi
    done
    rm -rf "$tmp"
}

rmq_start() {
    require_free_ports rabbitmq "$AMQP_PORT" "$AMQPS_PORT" "$MGMT_PORT" "$MQTTS_PORT" "$DIST_PORT"
    log "rabbitmq: starting node $RMQ_NODE (amqps $AMQPS_PORT, mqtts $MQTTS_PORT, management $MGMT_PORT)"
    rm -f "$RMQ_PIDFILE"
    local launcher waiter
    launcher="$(
        rmq_env
        cd "$RMQ_DIR"
        ulimit -n "$RMQ_NOFILE" 2>/dev/null || ulimit -n "$(ulimit -Hn)"
        setsid rabbitmq-server >>"$RMQ_DIR/log/console.log" 2>&1 </dev/null 9>&- &
        echo $!
    )"
    # Wait for the node, but give up at once if it dies (a port in use, a config error).
    rmqctl wait --timeout 120 "$RMQ_PIDFILE" >"$RMQ_DIR/log/wait.log" 2>&1 9>&- &
    waiter=$!
    while kill -0 "$waiter" 2>/dev/null; do
        if ! kill -0 "$launcher" 2>/dev/null; then
            kill "$waiter" 2>/dev/null || true
            break
        fi
        sleep 0.5
    done
    if ! wait "$waiter" || ! rmq_running; then
        tail -n 40 "$RMQ_DIR/log/console.log" >&2 || true
        die "rabbitmq did not start (logs in $RMQ_DIR/log)"
    fi
}

rmq_stop() {
    local pid
    pid="$(rmq_pid)" || return 0
    log "rabbitmq: stopping node $RMQ_NODE"
    if ! rmqctl shutdown >/dev/null 2>&1; then
        # The CLI could not reach the node: end the process we started, by its pid.
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 30); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 1
        done
    fi
    rm -f "$RMQ_PIDFILE"
}

# mgmt_status PATH: HTTP status of a management API GET as the admin.
mgmt_status() {
    curl -s -o /dev/null -w '%{http_code}' -u "$ADMIN_USER:$(secret admin_password)" \
        "http://127.0.0.1:$MGMT_PORT$1" || true
}

# The wanted broker state, checked cheaply over HTTP so that a second `services` is quick.
rmq_bootstrapped() {
    [[ "$(mgmt_status "/api/vhosts/$VHOST")" == 200 ]] &&
        [[ "$(mgmt_status "/api/permissions/$VHOST/$CORE_USER")" == 200 ]] &&
        [[ "$(mgmt_status /api/users/guest)" == 404 ]] &&
        [[ "$(mgmt_status "/api/permissions/$VHOST/$ADMIN_USER")" == 404 ]] &&
        [[ "$(curl -s -u "$ADMIN_USER:$(secret admin_password)" \
            "http://127.0.0.1:$MGMT_PORT/api/users/$CORE_USER")" == *'"password_hash":""'* ]]
}

rmq_bootstrap() {
    log "rabbitmq: bootstrapping vhost $VHOST and users"
    local users
    users="$(rmqctl list_users --no-table-headers | awk '{print $1}')"
    rmqctl list_vhosts --no-table-headers | grep -qx "$VHOST" || rmqctl add_vhost "$VHOST" >/dev/null
    if grep -qx guest <<<"$users"; then
        rmqctl delete_user guest >/dev/null
    fi
    # The admin only talks to the management API: tag administrator, no devices permissions.
    local admin_pw
    admin_pw="$(secret admin_password)"
    if grep -qx "$ADMIN_USER" <<<"$users"; then
        rmqctl change_password "$ADMIN_USER" "$admin_pw" >/dev/null
    else
        rmqctl add_user "$ADMIN_USER" "$admin_pw" >/dev/null
    fi
    rmqctl set_user_tags "$ADMIN_USER" administrator >/dev/null
    rmqctl clear_permissions -p "$VHOST" "$ADMIN_USER" >/dev/null 2>&1 || true
    # The core logs in with its certificate (EXTERNAL) only: no password at all.
    if ! grep -qx "$CORE_USER" <<<"$users"; then
        rmqctl add_user "$CORE_USER" "$(openssl rand -hex 24)" >/dev/null
    fi
    rmqctl clear_password "$CORE_USER" >/dev/null
    rmqctl set_permissions -p "$VHOST" "$CORE_USER" '.*' '.*' '.*' >/dev/null
    rmqctl clear_topic_permissions -p "$VHOST" "$CORE_USER" >/dev/null 2>&1 || true
    for _ in $(seq 1 20); do
        rmq_bootstrapped && return 0
        sleep 0.5
    done
    die "rabbitmq bootstrap did not take effect (management API on $MGMT_PORT)"
}

rmq_up() {
    [[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]] || die "rabbitmq-server is not installed (scripts/stack.sh install)"
    local changed
    changed="$(rmq_write_config)"
    if [[ -n "$changed" ]] && rmq_running; then
        log "rabbitmq: configuration changed, restarting"
        rmq_stop
    fi
    rmq_running || rmq_start
    # The management listener may trail the node's boot by a moment.
    for _ in $(seq 1 20); do
        [[ "$(mgmt_status /api/overview)" != 000 ]] && break
        sleep 0.5
    done
    rmq_bootstrapped || rmq_bootstrap
}

# ----------------------------------------------------------------------------------------- nginx

# nginx daemonizes by default; -t tests the config, -s reload signals the master by the pid file.
nginx_cmd() { nginx -p "$NGINX_DIR/" -c nginx.conf -e logs/error.log -g "pid $NGINX_DIR/nginx.pid;" "$@"; }

nginx_pid() {
    local pid
    [[ -s "$NGINX_DIR/nginx.pid" ]] || return 1
    pid="$(cat "$NGINX_DIR/nginx.pid")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    # Only the master we started (its command line keeps our prefix), not a reused pid.
    tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -qF "$NGINX_DIR/" || return 1
    echo "$pid"
}

# Renders nginx/nginx.conf.template for this stack; starts nginx, or reloads it when its config
# or its njs changed.
nginx_up() {
    command -v nginx >/dev/null || die "nginx is not installed (scripts/stack.sh install)"
    NGINX_LISTEN="127.0.0.1:$NGINX_PORT" NGINX_UPSTREAM="127.0.0.1:$APP_PORT" \
        NGINX_CERT_FILE="$PKI/nginx.crt" NGINX_KEY_FILE="$PKI/nginx.key" \
        NGINX_JWT_PUBLIC_KEY_FILE="$JWT_PUBLIC_KEY" NGINX_JWT_AUDIENCE="$JWT_AUDIENCE" \
        NGINX_JWT_ISSUER="$JWT_ISSUER" sh "$ROOT/nginx/render.sh" "$NGINX_DIR"
    local stamp
    stamp="$(cat "$NGINX_DIR/nginx.conf" "$ROOT/nginx/edge.js" | sha256sum | cut -d' ' -f1)"
    nginx_cmd -t >"$NGINX_DIR/logs/check.log" 2>&1 || {
        cat "$NGINX_DIR/logs/check.log" >&2
        die "nginx refused its configuration ($NGINX_DIR/nginx.conf)"
    }
    if nginx_pid >/dev/null; then
        if [[ "$(cat "$NGINX_DIR/.stamp" 2>/dev/null)" != "$stamp" ]]; then
            log "nginx: configuration changed, reloading"
            nginx_cmd -s reload
        fi
    else
        require_free_ports nginx "$NGINX_PORT"
        log "nginx: starting on https://localhost:$NGINX_PORT"
        nginx_cmd 9>&-
    fi
    echo "$stamp" >"$NGINX_DIR/.stamp"
}

nginx_down() {
    local pid
    pid="$(nginx_pid)" || return 0
    log "nginx: stopping"
    kill -QUIT "$pid" 2>/dev/null || true
    for _ in $(seq 1 20); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
}

# ----------------------------------------------------------------------------------------- app

write_app_env() {
    local content
    content="$(
        cat <<EOF
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
EOF
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

# ------------------------------------------------------------------------------------ commands

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
    cat <<EOF
  postgres   127.0.0.1:$PG_PORT         db swarm, role swarm (password in $SECRETS/pg_password)
  rabbitmq   amqps://localhost:$AMQPS_PORT/$VHOST (EXTERNAL, cert $PKI/core.crt)
             amqp 127.0.0.1:$AMQP_PORT (diagnostics)   mqtts localhost:$MQTTS_PORT
             management http://127.0.0.1:$MGMT_PORT ($ADMIN_USER, password in $SECRETS/admin_password)
  app        http://127.0.0.1:$APP_PORT (when started)
  nginx      https://localhost:$NGINX_PORT -> app (JWT, CA $PKI/ca.crt; tokens: python -m app.cli token)
  settings   $APP_ENV
EOF
}

cmd_down() {
    need_root
    take_lock
    if [[ -f "$RUN/app.pid" ]]; then
        SWARM_STACK="$STACK" bash "$ROOT/scripts/app.sh" stop 9>&-
    fi
    if [[ -d "$NGINX_DIR" ]]; then
        nginx_down
    fi
    if [[ -d "$RMQ_DIR" ]]; then
        rmq_stop
    fi
    if [[ -d "$PG_DIR" ]]; then
        pg_down
    fi
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
        echo "  rabbitmq   running   pid $pid, node $RMQ_NODE, amqps $AMQPS_PORT, mqtts $MQTTS_PORT, mgmt $MGMT_PORT"
    else
        echo "  rabbitmq   stopped"
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
