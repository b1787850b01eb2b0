#!/usr/bin/env bash
# A Swarm Core device in shell with the stock mosquitto clients and jq: a starting point for
# firmware authors (the protocol: docs/DESIGN.md section 4 and /asyncapi/device.json).
#
#   device.sh ID HOST PORT CA_FILE CERT_FILE KEY_FILE
#
# Runs `echo` (result = params) and `sleep` (params.seconds); rejects other methods.
# The broker binds the client id to the certificate, so a device has one connection at a time:
# every request is one `mosquitto_rr` call (MQTT 5 request/response: the reply comes on the
# Response Topic dev/ID/down/rpc with the request's Correlation Data). Without a standing
# subscription it hears no notices, so it polls `tasks/next` every POLL_S seconds (default 1):
# the pull is the protocol's source of truth, the notice only a hint.
set -euo pipefail
ID=$1 HOST=$2 PORT=$3 CA=$4 CERT=$5 KEY=$6
TLS=(-h "$HOST" -p "$PORT" --cafile "$CA" --cert "$CERT" --key "$KEY")
DOWN="dev/$ID/down" UP="dev/$ID/up/rpc"
STATE=${DEVICE_STATE_DIR:-$(mktemp -d)} # task id and attempt -> report: never run one twice
mkdir -p "$STATE/done"
SEQ=0

call() { # call METHOD PARAMS_JSON: print the reply's result; resend with the same id until answered
    local id reply
    SEQ=$((SEQ + 1)) id="${1//\//-}-$SEQ"
    while :; do
        reply=$(mosquitto_rr "${TLS[@]}" -i "$ID" -q 1 -W 10 -t "$UP/$1" -e "$DOWN/rpc" \
            -m "{\"id\":\"$id\",\"params\":$2}" 2>/dev/null) || true
        # Only the answer to this request counts; an error reply is logged and not retried.
        if [[ $(jq -r '.id // ""' <<<"$reply" 2>/dev/null) == "$id" ]]; then
            jq -e '.error == null' <<<"$reply" >/dev/null || echo "error: $reply" >&2
            jq -c '.result' <<<"$reply"
            return 0
        fi
        sleep 1
    done
}

run() { # run TASK_JSON: print the report
    local method params
    method=$(jq -r .method <<<"$1") params=$(jq -c .params <<<"$1")
    case $method in
    echo) jq -nc --argjson p "$params" '{status: "succeeded", result: $p}' ;;
    sleep)
        sleep "$(jq -r '.seconds // 0' <<<"$params")"
        jq -nc --argjson p "$params" '{status: "succeeded", result: {slept: $p.seconds}}'
        ;;
    *) jq -nc --arg m "$method" '{status: "rejected", error: {message: ("no handler for method " + $m)}}' ;;
    esac
}

device=$(call hello '{"firmware":"shell-example-1","model":"example","capabilities":["echo","sleep"]}')
# The hello reply carries the desired configuration: apply it (here: take it as is) and report it.
config=$(jq -c '.desired_config // empty' <<<"$device")
[[ -z $config ]] || call state "{\"reported\":$config}" >/dev/null

while :; do
    task=$(call tasks/next '{}')
    if [[ $task == null ]]; then
        sleep "${POLL_S:-1}"
        continue
    fi
    task_id=$(jq -r .id <<<"$task") attempt=$(jq -r .attempt <<<"$task")
    [[ $task_id =~ ^[0-9a-f-]{36}$ && $attempt =~ ^[0-9]+$ ]] || continue
    done_file="$STATE/done/$task_id.$attempt"
    if [[ -f $done_file ]]; then report=$(<"$done_file"); else
        report=$(run "$task")
        echo "$report" >"$done_file"
    fi
    call "tasks/$task_id/result" "$report" >/dev/null
done
