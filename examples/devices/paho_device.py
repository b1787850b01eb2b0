"""A whole Swarm Core device in plain paho-mqtt (no SDK): a starting point for firmware authors.

    python paho_device.py --id dev-1 --host localhost --port 35883 --ca ca.crt --cert dev-1.crt --key dev-1.key

Runs `echo` (result = params) and `sleep` (params.seconds, progress every params.progress_interval);
rejects other methods. Protocol: docs/DESIGN.md section 4 and /asyncapi/device.json.
"""

import argparse
import json
import queue
import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

parser = argparse.ArgumentParser()
for flag in ("--id", "--host", "--ca", "--cert", "--key"):
    parser.add_argument(flag, required=True)
parser.add_argument("--port", type=int, default=8883)
args = parser.parse_args()
DOWN, UP = f"dev/{args.id}/down/", f"dev/{args.id}/up/rpc/"

replies: dict[str, dict[str, Any]] = {}  # request id -> reply
arrived = threading.Condition()
wakeups: queue.Queue[str] = queue.Queue()  # "connect" or "notice": time to pull
canceled: set[str] = set()
finished: dict[str, dict[str, Any]] = {}  # task id -> its report: a task handed out again is never run twice


def call(method: str, params: dict[str, Any]) -> dict[str, Any]:
    """Publish a request (QoS 1) and wait for its reply, resending it with the same id meanwhile."""
    request_id = uuid.uuid4().hex
    body = json.dumps({"id": request_id, "params": params})
    with arrived:
        while request_id not in replies:
            client.publish(UP + method, body, qos=1)  # queued by paho while offline
            arrived.wait_for(lambda: request_id in replies, timeout=10)
        return replies.pop(request_id)


def on_connect(client: mqtt.Client, userdata: None, flags: object, reason: object, properties: object) -> None:
    # Exact topics at QoS 1 on every connect: a wildcard would get no retained configuration.
    client.subscribe([(DOWN + "notify", 1), (DOWN + "rpc", 1), (DOWN + "config", 1)])
    wakeups.put("connect")


def on_message(client: mqtt.Client, userdata: None, message: mqtt.MQTTMessage) -> None:
    try:
        body = json.loads(message.payload)
        assert isinstance(body, dict)
    except (ValueError, AssertionError):
        return  # malformed: ignore it, never crash
    if message.topic == DOWN + "rpc":
        with arrived:
            replies[str(body.get("id"))] = body
            arrived.notify_all()
    elif message.topic == DOWN + "notify" and body.get("event") == "task_queued":
        wakeups.put("notice")
    elif message.topic == DOWN + "notify" and body.get("event") == "task_canceled":
        canceled.add(str(body.get("task_id")))
    elif message.topic == DOWN + "config":  # apply it here, then report what was applied
        threading.Thread(target=call, args=("state", {"reported": body}), daemon=True).start()


def run(task: dict[str, Any]) -> dict[str, Any] | None:
    """Run one task; its report, or None when it was canceled (then nothing is reported)."""
    params, task_id = task["params"], task["id"]
    if task["method"] == "echo":
        return {"status": "succeeded", "result": params}
    if task["method"] != "sleep":
        return {"status": "rejected", "error": {"message": f"no handler for method {task['method']}"}}
    started, interval = time.monotonic(), float(params.get("progress_interval") or 1)
    while (elapsed := time.monotonic() - started) < float(params.get("seconds", 0)):
        if task_id in canceled:
            return None
        time.sleep(min(interval, float(params["seconds"]) - elapsed))
        if params.get("progress_interval"):  # extends the task's deadline by its step timeout
            call(f"tasks/{task_id}/progress", {"status_details": {"elapsed": round(elapsed, 3)}})
    return None if task_id in canceled else {"status": "succeeded", "result": {"slept": params["seconds"]}}


client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=args.id, clean_session=False)
client.tls_set(ca_certs=args.ca, certfile=args.cert, keyfile=args.key)
client.reconnect_delay_set(1, 60)
client.on_connect, client.on_message = on_connect, on_message
client.connect_async(args.host, args.port, keepalive=60)
client.loop_start()
while True:  # pull on every connect and every notice, until tasks/next answers null
    if wakeups.get() == "connect":
        call("hello", {"firmware": "paho-example-1", "model": "example", "capabilities": ["echo", "sleep"]})
    while (task := call("tasks/next", {}).get("result")) is not None:
        report = finished.get(task["id"]) or run(task)
        if report is not None:
            finished[task["id"]] = report
            call(f"tasks/{task['id']}/result", report)
