# Sourced by scripts/stack.sh: the stack's CA, server and client certificates, and the operator
# token keys. Both are made once and kept.

# Operator tokens: ES256, signed by the CLI with the private key; nginx and the app get only the
# public key.
JWT_SIGNING_KEY="$SECRETS/jwt-signing.key"
JWT_PUBLIC_KEY="$SECRETS/jwt-public.pem"
JWT_AUDIENCE=swarm-core
JWT_ISSUER=swarm-core
CORE_USER=swarm-core

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
