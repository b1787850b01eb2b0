# Sourced by scripts/stack.sh: the stack's name, ports and folders, and the helpers every
# service uses. Needs ROOT (the checkout).

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
EPMD_PORT=$((BASE + 369))
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

# One stack.sh at a time per stack: the tests start the test stack themselves, so two runs may
# meet. The daemons started under the lock must not inherit its descriptor (9>&-).
take_lock() {
    mkdir -p "$ROOT/.run"
    exec 9>"$ROOT/.run/.$STACK.lock"
    flock -w 300 9 || die "another scripts/stack.sh is busy with stack $STACK"
}

need_root() {
    [[ "$(id -u)" -eq 0 ]] || die "run as root (PostgreSQL runs as the postgres user, RabbitMQ in a chroot)"
}

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
                log "chmod o+x $d (postgres must traverse it to reach $RUN)"
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

# wait_gone PID SECONDS: true once the process has ended.
wait_gone() {
    local pid="$1" i
    for ((i = 0; i < $2 * 2; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.5
    done
    ! kill -0 "$pid" 2>/dev/null
}
