#!/usr/bin/env bash
# A Swarm Core device in shell with the stock mosquitto clients and jq: a starting point for
# firmware authors (the protocol: docs/DESIGN.md section 4 and /asyncapi/device.json).
#
#   device.sh ID HOST PORT CA_FILE CERT_FILE KEY_FILE
#
# Runs `echo` (result = params) and `sleep` (params.seconds); rejects other methods.
# mosquitto_sub keeps one persistent session (-c, QoS 1, exact topics) and prints what arrives;
# every request is a separate mosquitto_pub under the client id ID-pub (RabbitMQ 3.10 does not
# bind client ids to certificates; a broker that does needs one connection: use paho_device.py).
set -euo pipefail
ID=$1 HOST=$2 PORT=$3 CA=$4 CERT=$5 KEY=$6
TLS=(-h "$HOST" -p "$PORT" --cafile "$CA" --cert "$CERT" --key "$KEY" -V mqttv311)
DOWN="dev/$ID/down" UP="dev/$ID/up/rpc"
STATE=${DEVICE_STATE_DIR:-$(mktemp -d)}  # task id -> report: a task handed out again never runs twice
mkdir -p "$STATE/done"
SEQ=0

call() { # call METHOD PARAMS_JSON: publish a request; its reply arrives on $DOWN/rpc
    SEQ=$((SEQ + 1))
    mosquitto_pub "${TLS[@]}" -i "$ID-pub" -q 1 -t "$UP/$1" -m "{\"id\":\"${1//\//-}-$SEQ\",\"params\":$2}"
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

on_reply() { # a reply to tasks/next: run the task and report it; a reply to a result: pull again
    local id task task_id report
    id=$(jq -r '.id // ""' <<<"$1")
    case $id in
    tasks-next-*)
        task=$(jq -c '.result // empty' <<<"$1") || return 0
        [[ -n $task ]] || return 0 # null: nothing to do until the next notice
        task_id=$(jq -r .id <<<"$task")
        [[ $task_id =~ ^[0-9a-f-]{36}$ ]] || return 0
        if [[ -f $STATE/done/$task_id ]]; then report=$(<"$STATE/done/$task_id"); else
            report=$(run "$task")
            echo "$report" >"$STATE/done/$task_id"
        fi
        call "tasks/$task_id/result" "$report"
        ;;
    tasks-*-result-*) call tasks/next '{}' ;;
    esac
}

# -d prints SUBACK: the first requests go out only once their replies can arrive.
exec 3< <(exec stdbuf -oL mosquitto_sub "${TLS[@]}" -i "$ID" -c -q 1 -v -d \
    -t "$DOWN/notify" -t "$DOWN/rpc" -t "$DOWN/config")
while read -r line <&3; do
    case $line in
    *"received SUBACK"*)
        call hello '{"firmware":"shell-example-1","model":"example","capabilities":["echo","sleep"]}'
        call tasks/next '{}'
        ;;
    "$DOWN/rpc "*) on_reply "${line#* }" || true ;; # a malformed reply is ignored
    "$DOWN/notify "*) [[ ${line#* } != *task_queued* ]] || call tasks/next '{}' ;;
    "$DOWN/config "*) jq -e 'type == "object"' <<<"${line#* }" >/dev/null 2>&1 &&
        call state "{\"reported\":${line#* }}" ;;
    esac
done
