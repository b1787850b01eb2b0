#!/bin/sh
# Renders nginx/nginx.conf.template into PREFIX/nginx.conf (and makes PREFIX/logs, PREFIX/tmp),
# for `nginx -p PREFIX -c nginx.conf`. POSIX sh + sed: it runs in the official nginx image too.
#
#   render.sh PREFIX
#
# Required: NGINX_LISTEN (port or addr:port), NGINX_UPSTREAM (host:port of the app),
# NGINX_CERT_FILE, NGINX_KEY_FILE, NGINX_JWT_PUBLIC_KEY_FILE (PEM).
# Optional: NGINX_JWT_AUDIENCE, NGINX_JWT_ISSUER (default swarm-core), NGINX_RATE (50r/s),
# NGINX_BURST (100), NGINX_BODY_LIMIT (1m), NGINX_WORKERS (auto),
# NGINX_ERROR_LOG (logs/error.log), NGINX_ACCESS_LOG (logs/access.log).
set -eu

here="$(cd "$(dirname "$0")" && pwd)"
prefix="${1:?usage: render.sh PREFIX}"
: "${NGINX_LISTEN:?}" "${NGINX_UPSTREAM:?}" "${NGINX_CERT_FILE:?}" "${NGINX_KEY_FILE:?}"
: "${NGINX_JWT_PUBLIC_KEY_FILE:?}"

# The PEM body is the base64 of the DER SubjectPublicKeyInfo that WebCrypto imports as 'spki'.
grep -q 'BEGIN PUBLIC KEY' "$NGINX_JWT_PUBLIC_KEY_FILE" || {
    echo "render.sh: $NGINX_JWT_PUBLIC_KEY_FILE is not a PEM public key" >&2
    exit 1
}
public_key="$(sed '/-----/d' "$NGINX_JWT_PUBLIC_KEY_FILE" | tr -d '\n\r')"

mkdir -p "$prefix/logs" "$prefix/tmp"
sed -e "s|@LISTEN@|$NGINX_LISTEN|g" \
    -e "s|@UPSTREAM@|$NGINX_UPSTREAM|g" \
    -e "s|@CERT_FILE@|$NGINX_CERT_FILE|g" \
    -e "s|@KEY_FILE@|$NGINX_KEY_FILE|g" \
    -e "s|@JWT_PUBLIC_KEY@|$public_key|g" \
    -e "s|@JWT_AUDIENCE@|${NGINX_JWT_AUDIENCE:-swarm-core}|g" \
    -e "s|@JWT_ISSUER@|${NGINX_JWT_ISSUER:-swarm-core}|g" \
    -e "s|@RATE@|${NGINX_RATE:-50r/s}|g" \
    -e "s|@BURST@|${NGINX_BURST:-100}|g" \
    -e "s|@BODY_LIMIT@|${NGINX_BODY_LIMIT:-1m}|g" \
    -e "s|@WORKERS@|${NGINX_WORKERS:-auto}|g" \
    -e "s|@ERROR_LOG@|${NGINX_ERROR_LOG:-logs/error.log}|g" \
    -e "s|@ACCESS_LOG@|${NGINX_ACCESS_LOG:-logs/access.log}|g" \
    -e "s|@NJS_DIR@|$here|g" \
    "$here/nginx.conf.template" >"$prefix/nginx.conf.tmp"
if grep -q '@[A-Z_]*@' "$prefix/nginx.conf.tmp"; then
    echo "render.sh: unreplaced placeholder: $(grep -o '@[A-Z_]*@' "$prefix/nginx.conf.tmp" | head -1)" >&2
    exit 1
fi
mv "$prefix/nginx.conf.tmp" "$prefix/nginx.conf"
