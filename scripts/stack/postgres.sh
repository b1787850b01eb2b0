# Sourced by scripts/stack.sh: the stack's PostgreSQL 15 (Debian's), run as the postgres user on
# the stack's own port and data folder.

PGBIN=/usr/lib/postgresql/15/bin
PG_DIR="$RUN/pg"
PGDATA="$PG_DIR/data"
PG_SOCK="$PG_DIR/run"

as_pg() { runuser -u postgres -- "$@"; }

pg_running() {
    [[ -f "$PGDATA/PG_VERSION" ]] && as_pg "$PGBIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1
}

pg_config() {
    cat <<CONF
# Written by scripts/stack.sh on every run; edit scripts/stack/postgres.sh, not this file.
port = $PG_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$PG_SOCK'
password_encryption = scram-sha-256
max_connections = 200
CONF
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
    [[ -d "$PG_DIR" ]] || return 0
    if pg_running; then
        log "postgres: stopping"
        as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -m fast -w -t 60 stop >/dev/null
    fi
}
