"""The MQTT view of the device protocol: valid by the official AsyncAPI parser, and what protocol.py says."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from app.device_asyncapi import DOWN_CHANNELS, device_document
from swarm_device import protocol

ROOT = Path(__file__).resolve().parents[2]
CHECKER = ROOT / "tools" / "asyncapi-check"


def official_parser(document: dict[str, Any], tmp_path: Path) -> tuple[int, list[dict[str, str]]]:
    """Run @asyncapi/parser (installed by `make install`, no network here) on a document."""
    node = shutil.which("node")
    assert node is not None, "node is not installed"
    assert (CHECKER / "node_modules" / "@asyncapi" / "parser").is_dir(), "run `make asyncapi-tool` (or make install)"
    source = tmp_path / "asyncapi.json"
    source.write_text(json.dumps(document))
    done = subprocess.run([node, str(CHECKER / "check.mjs"), str(source)], capture_output=True, text=True, timeout=120)
    diagnostics = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    return done.returncode, diagnostics


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return device_document("mqtt.example.org", 8883)


def test_the_official_parser_accepts_the_document(document: dict[str, Any], tmp_path: Path) -> None:
    code, diagnostics = official_parser(document, tmp_path)
    assert code == 0, diagnostics
    assert [d for d in diagnostics if d["severity"] in ("error", "warning")] == []


def test_the_official_parser_refuses_a_broken_document(document: dict[str, Any], tmp_path: Path) -> None:
    broken = json.loads(json.dumps(document))
    del broken["operations"]["hello"]["action"]
    broken["channels"]["notify"]["messages"]["notify"]["$ref"] = "#/components/messages/missing"
    code, diagnostics = official_parser(broken, tmp_path)
    assert code == 1
    errors = {d["path"] for d in diagnostics if d["severity"] == "error"}
    assert "operations.hello" in errors, diagnostics


def test_every_topic_of_the_protocol_is_documented(document: dict[str, Any]) -> None:
    device = "{device_id}"
    expected = set(protocol.down_topics(device)) | {protocol.request_topic(device, m.name) for m in protocol.METHODS}
    assert {channel["address"] for channel in document["channels"].values()} == expected
    assert {"hello", "tasks/next", "tasks/{task_id}/progress", "tasks/{task_id}/result", "state"} == {
        m.name for m in protocol.METHODS
    }


def test_qos_retain_and_direction_per_channel(document: dict[str, Any]) -> None:
    by_address = {op["channel"]["$ref"].split("/")[-1]: op for op in document["operations"].values()}
    for key, channel in document["channels"].items():
        operation = by_address[key]
        binding = operation["bindings"]["mqtt"]
        assert binding["qos"] == 1
        assert binding["retain"] == (channel["address"] == protocol.config_topic("{device_id}"))
        down = "/down/" in channel["address"]
        assert operation["action"] == ("receive" if down else "send")
        assert ("reply" in operation) == (not down)
    assert len(DOWN_CHANNELS) == len(protocol.down_topics("x"))


def test_mqtt5_properties_security_and_error_codes(document: dict[str, Any]) -> None:
    assert {server["protocol"] for server in document["servers"].values()} == {"mqtts"}
    assert {server["protocolVersion"] for server in document["servers"].values()} == {"5", "3.1.1"}
    scheme = document["components"]["securitySchemes"]["deviceCertificate"]
    assert scheme["type"] == "X509"
    hello = document["components"]["messages"]["hello_request"]["bindings"]["mqtt"]
    assert set(hello) >= {"responseTopic", "correlationData"}
    schemas = document["components"]["schemas"]
    assert schemas["ErrorCode"]["enum"] == [code.value for code in protocol.ErrorCode]
    for code in protocol.ErrorCode:
        assert f"`{code}`: {protocol.ERROR_MEANINGS[code]}" in document["info"]["description"]
    assert "Message Expiry is not set" in document["info"]["description"]
    # The payloads are the protocol's models.
    assert schemas["Notice"]["properties"]["event"]["enum"] == ["task_queued", "task_canceled"]
    assert set(schemas["ResultParams"]["properties"]) == set(protocol.ResultParams.model_fields)
