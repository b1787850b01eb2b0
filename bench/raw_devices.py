"""The devices of the raw round-trip ceiling (`bench.raw.roundtrip_ceiling`): bare aiomqtt clients,
MQTT 5 over TLS with their certificates, no SDK, doing what a device does for one task.

    python -m bench.raw_devices --host H --port P --ca ca.crt --cert-dir D --prefix b- --count N

Each device subscribes to its notice and reply topics; on every notice it publishes a `next`
request, waits for the reply, publishes a `result` request and waits for that reply, both QoS 1
with a Response Topic and Correlation Data. The topics are `dev/{id}/up/raw/...`: inside the
device's ACL, outside every app queue's binding. Prints `ready N` once all are subscribed; runs
until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import ssl
from pathlib import Path

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from swarm_device.protocol import notify_topic, reply_topic


async def device(args: argparse.Namespace, device_id: str, subscribed: asyncio.Queue[str]) -> None:
    tls = ssl.create_default_context(cafile=str(args.ca))
    tls.load_cert_chain(args.cert_dir / f"{device_id}.crt", args.cert_dir / f"{device_id}.key")
    async with aiomqtt.Client(
        args.host, args.port, identifier=device_id, protocol=aiomqtt.ProtocolVersion.V5, tls_context=tls
    ) as client:
        # As the SDK does: without it, Nagle holds each small request back for the previous ACK.
        sock = client._client.socket()
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        replies = reply_topic(device_id)
        await client.subscribe([(notify_topic(device_id), 1), (replies, 1)])
        await subscribed.put(device_id)
        sequence = 0
        async for message in client.messages:
            if message.topic.value != notify_topic(device_id):
                continue  # a reply: the requests below wait for theirs in the same stream
            for step in ("next", "result"):
                sequence += 1
                properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                properties.ResponseTopic = replies
                properties.CorrelationData = str(sequence).encode()
                await client.publish(f"dev/{device_id}/up/raw/{step}", b"{}", 1, properties=properties)
                async for reply in client.messages:
                    if reply.topic.value == replies:
                        break


async def main(args: argparse.Namespace) -> None:
    subscribed: asyncio.Queue[str] = asyncio.Queue()
    ids = [f"{args.prefix}{n}" for n in range(args.start, args.start + args.count)]
    runs = [asyncio.create_task(device(args, device_id, subscribed)) for device_id in ids]
    for _ in ids:
        await subscribed.get()
    print(f"ready {len(ids)}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    for run in runs:
        run.cancel()
    await asyncio.gather(*runs, return_exceptions=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.raw_devices")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ca", type=Path, required=True)
    parser.add_argument("--cert-dir", type=Path, required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--start", type=int, default=1)
    parser.add_argument("--count", type=int, required=True)
    asyncio.run(main(parser.parse_args()))
