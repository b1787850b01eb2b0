# Sourced by scripts/stack.sh: the stack's nginx (TLS and operator tokens in front of the app),
# rendered from nginx/nginx.conf.template like the compose file's.

NGINX_DIR="$RUN/nginx"

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

# Starts nginx, or reloads it when its config or its njs changed.
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
    wait_gone "$pid" 10 || true
}
