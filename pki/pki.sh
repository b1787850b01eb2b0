#!/usr/bin/env bash
# A small openssl PKI for the local stack and docker-compose: one CA, server and client
# certificates signed by it. Every command is idempotent: what exists (and still verifies
# against the CA) is kept, so running it again never rotates a key behind a running broker.
set -euo pipefail

CA_DAYS=3650
LEAF_DAYS=825

usage() {
    cat >&2 <<USAGE
usage: pki.sh ca DIR                       CA key and certificate (DIR/ca.key, DIR/ca.crt)
       pki.sh server DIR NAME CN [SAN...]  server certificate, e.g. SAN DNS:localhost IP:127.0.0.1
       pki.sh client DIR NAME CN [SAN...]  client certificate (clientAuth); SAN defaults to DNS:CN
SANs may also be given comma-separated (DNS:localhost,IP:127.0.0.1).
USAGE
    exit 2
}

die() {
    echo "pki.sh: $*" >&2
    exit 1
}

# Writes an EC P-256 private key readable by its owner only.
new_key() {
    local path="$1"
    (umask 077 && openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$path.tmp" 2>/dev/null)
    mv "$path.tmp" "$path"
    chmod 600 "$path"
}

# Our own minimal openssl config, so that the result does not depend on the distribution's
# openssl.cnf (Debian and Alpine differ) and req never prompts.
# write_config FILE CN KIND [SANS]: KIND is ca, server or client; its section is named "ext".
write_config() {
    local cfg="$1" cn="$2" kind="$3" sans="${4:-}"
    printf '[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = %s\n[ext]\n' "$cn" >"$cfg"
    case "$kind" in
    ca)
        printf 'basicConstraints = critical, CA:TRUE\nkeyUsage = critical, keyCertSign, cRLSign\n' >>"$cfg"
        printf 'subjectKeyIdentifier = hash\n' >>"$cfg"
        ;;
    server | client)
        printf 'basicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature\n' >>"$cfg"
        printf 'extendedKeyUsage = %s\n' "$([[ $kind == server ]] && echo serverAuth || echo clientAuth)" >>"$cfg"
        printf 'subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n' >>"$cfg"
        ;;
    esac
    if [[ -n "$sans" ]]; then
        printf 'subjectAltName = %s\n' "$sans" >>"$cfg"
    fi
}

cmd_ca() {
    local dir="$1"
    mkdir -p "$dir"
    if [[ -s "$dir/ca.crt" ]]; then
        [[ -s "$dir/ca.key" ]] || die "$dir/ca.crt exists without $dir/ca.key"
        return 0
    fi
    write_config "$tmp/openssl.cnf" "Swarm Core CA" ca
    new_key "$dir/ca.key"
    openssl req -x509 -new -config "$tmp/openssl.cnf" -extensions ext -key "$dir/ca.key" \
        -sha256 -days "$CA_DAYS" -out "$dir/ca.crt.tmp"
    mv "$dir/ca.crt.tmp" "$dir/ca.crt"
    chmod 644 "$dir/ca.crt"
    echo "pki: created CA $dir/ca.crt"
}

# leaf KIND DIR NAME CN SAN...
leaf() {
    local kind="$1" dir="$2" name="$3" cn="$4"
    shift 4
    [[ -s "$dir/ca.crt" && -s "$dir/ca.key" ]] || die "no CA in $dir (run: pki.sh ca $dir)"
    [[ "$name" =~ ^[A-Za-z0-9_.-]+$ && "$name" != "ca" ]] || die "bad NAME: $name"
    local crt="$dir/$name.crt" key="$dir/$name.key"
    if [[ -s "$crt" && -s "$key" ]] && openssl verify -CAfile "$dir/ca.crt" "$crt" >/dev/null 2>&1; then
        return 0
    fi
    local sans
    sans="$(IFS=,; echo "$*")"
    write_config "$tmp/openssl.cnf" "$cn" "$kind" "$sans"
    new_key "$key"
    openssl req -new -config "$tmp/openssl.cnf" -key "$key" -out "$tmp/req.csr"
    openssl x509 -req -in "$tmp/req.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
        -set_serial "0x$(openssl rand -hex 16)" -days "$LEAF_DAYS" -sha256 \
        -extfile "$tmp/openssl.cnf" -extensions ext -out "$crt.tmp" 2>/dev/null
    mv "$crt.tmp" "$crt"
    chmod 644 "$crt"
    echo "pki: created $kind certificate $crt (CN=$cn${sans:+, $sans})"
}

[[ $# -ge 1 ]] || usage
command -v openssl >/dev/null || die "openssl is not installed"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
case "$1" in
ca)
    [[ $# -eq 2 ]] || usage
    cmd_ca "$2"
    ;;
server)
    [[ $# -ge 4 ]] || usage
    leaf server "${@:2}"
    ;;
client)
    [[ $# -ge 4 ]] || usage
    if [[ $# -eq 4 ]]; then
        # RabbitMQ 4.x binds the MQTT client id to a certificate SAN
        # (mqtt.ssl_cert_client_id_from = subject_alternative_name, type dns): carry the CN there too.
        leaf client "$2" "$3" "$4" "DNS:$4"
    else
        leaf client "${@:2}"
    fi
    ;;
*)
    usage
    ;;
esac
