# Sourced by scripts/stack.sh: the stack's RabbitMQ 4.0 node (Debian 13's package, Erlang 27) on
# this Debian 12 machine, without Docker.
#
# `install` builds one Debian 13 root with debootstrap (RMQ_ROOTFS, shared by every stack of the
# checkout, never written by a node). Each stack's node runs chrooted in its own view of it:
# RMQ_CHROOT is a private bind mount of the root with /proc, /dev and the stack's
# .run/<stack>/rabbitmq (at /swarm) mounted inside, so its files, ports, Erlang cookie and epmd
# (ERL_EPMD_PORT) are the stack's own and two stacks run side by side. Stopping the node kills
# what still runs in that view (epmd) by pid and unmounts all of it.

RMQ_ROOTFS="$ROOT/.run/rabbitmq-root"
RMQ_SUITE=trixie
RMQ_PACKAGES=rabbitmq-server,ca-certificates
RMQ_MIRROR="${SWARM_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# Written last by a complete build: its content says what was built.
RMQ_ROOTFS_STAMP="$RMQ_ROOTFS/.swarm-rootfs"
RMQ_ROOTFS_WANTED="$RMQ_SUITE $RMQ_PACKAGES"

RMQ_DIR="$RUN/rabbitmq"
RMQ_CHROOT="$RUN/rabbitmq-chroot"
# RMQ_DIR as the node sees it.
RMQ_INSIDE=/swarm
RMQ_NODE="swarm-$STACK@localhost"
RMQ_PIDFILE="$RMQ_DIR/node.pid"
VHOST=devices
ADMIN_USER=swarm-admin
# Open files of the node: one socket per connected device, and the node keeps ~10% of the
# limit for files. The shell's default here (20,000) caps the node near 18,000 sockets.
RMQ_NOFILE=100000
# The management statistics of every connection, channel and queue, collected this often: with
# thousands of devices the node's largest background work (docs/performance.md, Connections).
# The tests read consumer counts from them, so they want the 5 s default.
STATS_INTERVAL_MS="${SWARM_BROKER_STATS_INTERVAL_MS:-5000}"

# ----------------------------------------------------------------------------- the Debian 13 root

rmq_rootfs_ready() { [[ "$(cat "$RMQ_ROOTFS_STAMP" 2>/dev/null)" == "$RMQ_ROOTFS_WANTED" ]]; }

rmq_rootfs_install() {
    rmq_rootfs_ready && return 0
    command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
    local tmp="$RMQ_ROOTFS.tmp"
    # A stale root is only replaced when no stack of this checkout uses it.
    if findmnt -rn -o TARGET | awk -v run="$ROOT/.run/" 'index($0, run) == 1 && /\/rabbitmq-chroot/' | grep -q .; then
        die "a stack's RabbitMQ still runs on $RMQ_ROOTFS: scripts/stack.sh down first"
    fi
    log "rabbitmq: debootstrap $RMQ_SUITE with $RMQ_PACKAGES into $RMQ_ROOTFS (a minute or two, ~370 MB)"
    mkdir -p "$ROOT/.run"
    rm -rf "$tmp"
    debootstrap --variant=minbase --include="$RMQ_PACKAGES" "$RMQ_SUITE" "$tmp" "$RMQ_MIRROR" \
        >"$ROOT/.run/rabbitmq-root.log" 2>&1 || {
        tail -n 20 "$ROOT/.run/rabbitmq-root.log" >&2
        die "debootstrap failed (log: $ROOT/.run/rabbitmq-root.log)"
    }
    # The package's postinst starts no node (no init system in the root); mount points of a view.
    mkdir -p "$tmp$RMQ_INSIDE"
    rm -rf "$RMQ_ROOTFS"
    mv "$tmp" "$RMQ_ROOTFS"
    echo "$RMQ_ROOTFS_WANTED" >"$RMQ_ROOTFS_STAMP"
    log "rabbitmq: root ready with $(ls "$RMQ_ROOTFS/usr/lib/rabbitmq/lib")"
}

# ------------------------------------------------------------------------------ this stack's view

# This view's mounts, deepest first.
rmq_mounts() {
    findmnt -rn -o TARGET | awk -v top="$RMQ_CHROOT" '$0 == top || index($0, top "/") == 1' | sort -r
}

rmq_mount() {
    rmq_rootfs_ready || die "no RabbitMQ root in $RMQ_ROOTFS: run scripts/stack.sh install (make install)"
    mkdir -p "$RMQ_CHROOT"
    if ! mountpoint -q "$RMQ_CHROOT"; then
        mount --bind "$RMQ_ROOTFS" "$RMQ_CHROOT"
        # Mounts made inside this view stay out of the root and of other stacks' views.
        mount --make-private "$RMQ_CHROOT"
    fi
    mountpoint -q "$RMQ_CHROOT/proc" || mount -t proc proc "$RMQ_CHROOT/proc"
    mountpoint -q "$RMQ_CHROOT/dev" || mount --bind /dev "$RMQ_CHROOT/dev"
    mountpoint -q "$RMQ_CHROOT$RMQ_INSIDE" || mount --bind "$RMQ_DIR" "$RMQ_CHROOT$RMQ_INSIDE"
}

# Everything still running in the view (the node's epmd outlives the node), by pid: a process
# is ours when its root directory is the view.
rmq_view_pids() {
    local p
    for p in /proc/[0-9]*; do
        [[ "$(readlink "$p/root" 2>/dev/null)" == "$RMQ_CHROOT" ]] && echo "${p#/proc/}"
    done
    return 0
}

rmq_unmount() {
    local pids pid target
    pids="$(rmq_view_pids)"
    if [[ -n "$pids" ]]; then
        for pid in $pids; do kill "$pid" 2>/dev/null || true; done
        for pid in $pids; do wait_gone "$pid" 10 || kill -KILL "$pid" 2>/dev/null || true; done
    fi
    # Deepest first; a mount still busy is detached lazily, so nothing is left in the table.
    for target in $(rmq_mounts); do
        umount "$target" 2>/dev/null || umount -l "$target" 2>/dev/null || true
    done
    if [[ -n "$(rmq_mounts)" ]]; then
        die "could not unmount: $(rmq_mounts | tr '\n' ' ')"
    fi
}

# ------------------------------------------------------------------------------------ the node

# The node and its CLI see only what is under /swarm: own config, own Erlang cookie ($HOME), own
# ports and epmd. /usr/sbin/rabbitmq* would su to the rabbitmq user with another HOME.
rmq_in_root() {
    local base=$RMQ_INSIDE
    chroot "$RMQ_CHROOT" /usr/bin/env -i \
        HOME="$base/home" LANG=C.UTF-8 PATH=/usr/lib/rabbitmq/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        RABBITMQ_NODENAME="$RMQ_NODE" \
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
        RABBITMQ_NODE_PORT="$AMQP_PORT" \
        RABBITMQ_DIST_PORT="$DIST_PORT" \
        RABBITMQ_CTL_DIST_PORT_MIN=$((DIST_PORT + 1)) \
        RABBITMQ_CTL_DIST_PORT_MAX=$((DIST_PORT + 10)) \
        RABBITMQ_CONF_ENV_FILE="$base/conf/rabbitmq-env.conf" \
        RABBITMQ_CONFIG_FILE="$base/conf/rabbitmq.conf" \
        RABBITMQ_ADVANCED_CONFIG_FILE="$base/conf/advanced.config" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$base/conf/enabled_plugins" \
        RABBITMQ_MNESIA_BASE="$base/mnesia" \
        RABBITMQ_LOG_BASE="$base/log" \
        RABBITMQ_PID_FILE="$base/node.pid" \
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
        ERL_EPMD_ADDRESS=127.0.0.1 \
        ERL_EPMD_PORT="$EPMD_PORT" \
        "$@"
}

rmqctl() { rmq_in_root /usr/lib/rabbitmq/bin/rabbitmqctl -q "$@"; }

rmq_pid() {
    local pid
    [[ -s "$RMQ_PIDFILE" ]] || return 1
    pid="$(cat "$RMQ_PIDFILE")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    # Guard against a reused pid: it must run in this stack's view.
    [[ "$(readlink "/proc/$pid/root" 2>/dev/null)" == "$RMQ_CHROOT" ]] || return 1
    echo "$pid"
}

rmq_running() { rmq_pid >/dev/null; }

# Writes the node's files (config rendered for this stack, its certificate); prints "changed"
# when any of them changed.
rmq_write_config() {
    local conf="$RMQ_DIR/conf" tmp f
    mkdir -p "$conf" "$RMQ_DIR/mnesia" "$RMQ_DIR/log" "$RMQ_DIR/home"
    chmod 700 "$RMQ_DIR/home" "$conf"
    tmp="$(mktemp -d)"
    RABBITMQ_AMQP_LISTEN="127.0.0.1:$AMQP_PORT" RABBITMQ_AMQPS_LISTEN="127.0.0.1:$AMQPS_PORT" \
        RABBITMQ_MQTTS_LISTEN="127.0.0.1:$MQTTS_PORT" RABBITMQ_MGMT_IP=127.0.0.1 \
        RABBITMQ_MGMT_PORT="$MGMT_PORT" RABBITMQ_PKI_DIR="$RMQ_INSIDE/conf" RABBITMQ_VHOST="$VHOST" \
        RABBITMQ_STATS_INTERVAL_MS="$STATS_INTERVAL_MS" sh "$ROOT/rabbitmq/render.sh" "$tmp/rabbitmq.conf" ||
        die "rabbitmq: the configuration did not render"
    cp "$ROOT/rabbitmq/enabled_plugins" "$ROOT/rabbitmq/rabbitmq-env.conf" \
        "$ROOT/rabbitmq/advanced.config" "$PKI/ca.crt" "$PKI/rabbitmq.crt" "$PKI/rabbitmq.key" "$tmp/"
    for f in rabbitmq.conf enabled_plugins rabbitmq-env.conf advanced.config ca.crt rabbitmq.crt rabbitmq.key; do
        if ! cmp -s "$tmp/$f" "$conf/$f"; then
            cp "$tmp/$f" "$conf/$f"
            echo changed
        fi
    done
    rm -rf "$tmp"
}

rmq_start() {
    require_free_ports rabbitmq "$EPMD_PORT" "$AMQP_PORT" "$AMQPS_PORT" "$MGMT_PORT" "$MQTTS_PORT" "$DIST_PORT"
    log "rabbitmq: starting node $RMQ_NODE (amqps $AMQPS_PORT, mqtts $MQTTS_PORT, management $MGMT_PORT, epmd $EPMD_PORT)"
    rm -f "$RMQ_PIDFILE"
    rmq_mount
    local launcher waiter
    launcher="$(
        cd /
        ulimit -n "$RMQ_NOFILE" 2>/dev/null || ulimit -n "$(ulimit -Hn)"
        rmq_in_root /usr/lib/rabbitmq/bin/rabbitmq-server </dev/null >>"$RMQ_DIR/log/console.log" 2>&1 9>&- &
        echo $!
    )"
    # Wait for the node, but give up at once if it dies (a port in use, a config error).
    rmqctl wait --timeout 120 "$RMQ_INSIDE/node.pid" >"$RMQ_DIR/log/wait.log" 2>&1 9>&- &
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
        rmq_unmount
        die "rabbitmq did not start (logs in $RMQ_DIR/log)"
    fi
}

# Stops the node (if any) and clears the view: safe to repeat, and after a crash.
rmq_stop() {
    local pid
    if pid="$(rmq_pid)"; then
        log "rabbitmq: stopping node $RMQ_NODE"
        if ! rmqctl shutdown >/dev/null 2>&1; then
            # The CLI could not reach the node: end the process we started, by its pid.
            kill "$pid" 2>/dev/null || true
        fi
        wait_gone "$pid" 30 || kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$RMQ_PIDFILE"
    [[ -d "$RMQ_CHROOT" ]] && rmq_unmount
    return 0
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
