# Sourced by scripts/stack.sh: `install`, what the machine needs (apt packages, the .venv and
# RabbitMQ's Debian 13 root, see rabbitmq.sh). Idempotent and quick when done.

APT_PACKAGES=(debootstrap nginx libnginx-mod-http-js mosquitto-clients postgresql-15 openssl curl ca-certificates jq chromium)

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
    rmq_rootfs_install
}
