"""Generate JSON Schema files and the AsyncAPI 3.0 document from the models.

Usage::

    python -m schemas.export          # write schemas/json/*.json and schemas/asyncapi.yaml
    python -m schemas.export --check  # exit 1 if the committed files are out of date
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Final

import yaml
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from schemas.base import SCHEMA_VERSION
from schemas.catalog import CHANNELS, JSON, JSON_MESSAGES, OCTET_STREAM, Channel
from schemas.device import COMMAND_ARGS
from schemas.topics import DEFAULT_ROOT, TOPIC_TEMPLATES, TopicKind

PACKAGE_DIR: Final = Path(__file__).resolve().parent
JSON_DIR: Final = PACKAGE_DIR / "json"
ASYNCAPI_PATH: Final = PACKAGE_DIR / "asyncapi.yaml"
MQTT_BINDING_VERSION: Final = "0.2.0"

_PARAMETER_DOCS: Final = {
    "device_id": "Device id, `[A-Za-z0-9_-]{1,64}`; equals the device's MQTT username",
    "model": "Model name, `[A-Za-z0-9_-]{1,64}`",
    "task": "Federated task name, `[A-Za-z0-9_-]{1,64}`",
    "command": "Command name, e.g. `ping`, `report_now`, `rollback`",
    "rule": "Alert rule name",
    "stage": "Secure-aggregation stage, e.g. `advertise`, `shares`, `masked`, `unmask`",
    "version": "Version, `[A-Za-z0-9][A-Za-z0-9_.-]{0,63}`",
    "round": "Round number, decimal",
    "chunk": "Chunk index from 0, decimal",
    "instance": "Cloud instance name, `[A-Za-z0-9_-]{1,64}`",
}


def _camel(kind: TopicKind) -> str:
    head, *rest = kind.value.split("_")
    return head + "".join(part.title() for part in rest)


def _message_name(channel: Channel) -> str:
    if channel.message is not None and channel.content_type == "application/json":
        return channel.message.__name__
    return _camel(channel.kind)[0].upper() + _camel(channel.kind)[1:] + "Payload"


def _pascal(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.split("_"))


def command_message_name(command: str) -> str:
    """Name of the message (and payload schema) of one command, e.g. ``RollbackCommand``."""
    return f"{_pascal(command)}Command"


def clear_message_name(channel: Channel) -> str:
    """Name of the empty retained message that clears ``channel``'s topic."""
    return _pascal(channel.kind.value) + "Clear"


def _mqtt_message_binding(content_type: str | None) -> dict[str, Any]:
    """What the MQTT 5 publisher sets: content type and payload format indicator."""
    binding: dict[str, Any] = {"bindingVersion": MQTT_BINDING_VERSION}
    if content_type is not None:
        binding["contentType"] = content_type
        binding["payloadFormatIndicator"] = 1 if content_type == JSON else 0
    return {"mqtt": binding}


def model_json_schema(model: type[BaseModel]) -> dict[str, Any]:
    """Standalone JSON Schema (draft 2020-12) of one message model."""
    schema = model.model_json_schema(mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def _component_schemas() -> dict[str, Any]:
    _, top = models_json_schema(
        [(m, "validation") for m in (*JSON_MESSAGES, *COMMAND_ARGS.values())],
        ref_template="#/components/schemas/{model}",
    )
    defs: dict[str, Any] = top.get("$defs", {})
    defs |= _command_schemas()
    return dict(sorted(defs.items()))


def _command_schemas() -> dict[str, Any]:
    """One payload schema per command: a ``Command`` whose ``args`` follow its own model."""
    schemas: dict[str, Any] = {}
    for name, model in COMMAND_ARGS.items():
        schema: dict[str, Any] = {
            "title": command_message_name(name),
            "description": (f"A `Command` published on `devices/{{device_id}}/cmd/{name}`; "
                            f"`args` follows `{model.__name__}`."),
            "allOf": [{"$ref": "#/components/schemas/Command"}],
            "type": "object",
            "properties": {"args": {"$ref": f"#/components/schemas/{model.__name__}"}},
            "x-edgefl-command": name,
        }
        if model.model_json_schema().get("required"):
            schema["required"] = ["args"]
        schemas[command_message_name(name)] = schema
    return schemas


def _content_type_text(content_type: str) -> str:
    indicator = 1 if content_type == JSON else 0
    return (f"MQTT 5 publishers set the content type `{content_type}` and the payload "
            f"format indicator {indicator} (MQTT 3.1.1 has no properties).")


def _message(channel: Channel) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "name": _message_name(channel),
        "title": _message_name(channel),
        "summary": channel.summary,
        "contentType": channel.content_type,
    }
    if channel.message is not None and channel.content_type == JSON:
        msg["payload"] = {"$ref": f"#/components/schemas/{channel.message.__name__}"}
        msg["description"] = "JSON, UTF-8. " + _content_type_text(channel.content_type)
    else:
        msg["payload"] = {"type": "string", "format": "binary"}
        description = ""
        if channel.message is not None:
            description = (
                "safetensors bytes; the JSON envelope in `__metadata__.envelope` follows "
                f"`{channel.message.__name__}` (see `x-edgefl-envelope`). ")
            msg["x-edgefl-envelope"] = {"$ref": f"#/components/schemas/{channel.message.__name__}"}
        msg["description"] = description + _content_type_text(channel.content_type)
    if channel.note is not None:
        msg["description"] += " " + channel.note
    if channel.cleared is not None:
        msg["description"] += (" An empty retained message on this topic clears it: "
                               f"{channel.cleared}.")
    msg["bindings"] = _mqtt_message_binding(channel.content_type)
    return msg


def _command_message(name: str) -> dict[str, Any]:
    model = COMMAND_ARGS[name]
    summary = (model.__doc__ or name).strip().splitlines()[0].replace("``", "`")
    return {
        "name": name,
        "title": command_message_name(name),
        "summary": summary,
        "contentType": JSON,
        "payload": {"$ref": f"#/components/schemas/{command_message_name(name)}"},
        "description": (
            f"JSON, UTF-8, published on `devices/{{device_id}}/cmd/{name}` (the command is "
            f"the last topic level). `args` follows `{model.__name__}`; unknown arguments "
            "are refused and the reply says why. " + _content_type_text(JSON)),
        "bindings": _mqtt_message_binding(JSON),
        "x-edgefl-command": name,
    }


def _clear_message(channel: Channel, cleared: str) -> dict[str, Any]:
    return {
        "name": "clear",
        "title": clear_message_name(channel),
        "summary": f"Empty retained message: clears the topic {cleared}",
        "contentType": OCTET_STREAM,
        "payload": {"type": "string", "maxLength": 0, "description": "Zero bytes"},
        "description": (
            "Zero bytes, retained: the broker drops the retained message of the topic, and "
            "a subscriber receives an empty payload (the topic no longer holds a "
            f"`{_message_name(channel)}`). Sent {cleared}. It carries no MQTT 5 "
            "content type or payload format indicator."),
        "bindings": _mqtt_message_binding(None),
    }


def _channel_messages(channel: Channel) -> dict[str, dict[str, Any]]:
    """The messages of one channel by name: the payload(s), then the clear if retained."""
    if channel.kind is TopicKind.COMMAND:
        messages = {command_message_name(n): _command_message(n) for n in COMMAND_ARGS}
    else:
        messages = {_message_name(channel): _message(channel)}
    if channel.retain and channel.cleared is not None:
        messages[clear_message_name(channel)] = _clear_message(channel, channel.cleared)
    return messages


def _parameter(kind: TopicKind, name: str) -> dict[str, Any]:
    parameter: dict[str, Any] = {"description": _PARAMETER_DOCS[name]}
    if kind is TopicKind.COMMAND and name == "command":
        parameter["enum"] = list(COMMAND_ARGS)  # a reply may also answer an unknown one
    return parameter


def asyncapi_document(root: str = DEFAULT_ROOT) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of the whole topic table under ``root``."""
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for kind, template in TOPIC_TEMPLATES.items():
        channel = CHANNELS[kind]
        name = _camel(kind)
        own = _channel_messages(channel)
        messages |= own
        params = re.findall(r"\{(\w+)\}", template)
        entry: dict[str, Any] = {
            "address": f"{root}/{template}",
            "title": name,
            "summary": channel.summary,
            "messages": {m: {"$ref": f"#/components/messages/{m}"} for m in own},
        }
        if params:
            entry["parameters"] = {p: _parameter(kind, p) for p in params}
        channels[name] = entry
        action = "send" if channel.sender == "cloud" else "receive"
        operations[f"{action}{name[0].upper()}{name[1:]}"] = {
            "action": action,
            "channel": {"$ref": f"#/channels/{name}"},
            "summary": f"{'Published by the cloud' if action == 'send' else 'Published by devices'}"
            f"; QoS {channel.qos}{', retained' if channel.retain else ''}",
            "messages": [{"$ref": f"#/channels/{name}/messages/{m}"} for m in own],
            "bindings": {
                "mqtt": {
                    "qos": channel.qos,
                    "retain": channel.retain,
                    "bindingVersion": MQTT_BINDING_VERSION,
                }
            },
        }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "edgefl",
            "version": f"{SCHEMA_VERSION}.0.0",
            "description": (
                "MQTT topics of edgefl, described from the cloud service's side: it "
                "receives what devices publish and sends plans, weights, releases and "
                "alerts. Any other system may subscribe to the same channels. Every JSON "
                "message carries `schema_version`; tensors travel as safetensors, never "
                "pickle. Device identity is the MQTT username, enforced by the broker ACL."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "mosquitto": {
                "host": "localhost:1883",
                "protocol": "mqtt",
                "protocolVersion": "5",
                "description": "Mosquitto with edgefl's generated config; password auth",
                "security": [{"$ref": "#/components/securitySchemes/password"}],
            },
            "mosquittoTls": {
                "host": "localhost:8883",
                "protocol": "secure-mqtt",
                "protocolVersion": "5",
                "description": "TLS listener; with mTLS the certificate CN is the device id",
                "security": [{"$ref": "#/components/securitySchemes/certificate"}],
            },
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": _component_schemas(),
            "messages": messages,
            "securitySchemes": {
                "password": {
                    "type": "userPassword",
                    "description": "MQTT username (the device id) and password",
                },
                "certificate": {
                    "type": "X509",
                    "description": "Client certificate signed by the fleet CA",
                },
            },
        },
    }


def render_files() -> dict[Path, str]:
    """Every generated file and its exact content."""
    files: dict[Path, str] = {}
    for model in JSON_MESSAGES:
        text = json.dumps(model_json_schema(model), indent=2, sort_keys=False) + "\n"
        files[JSON_DIR / f"{model.__name__}.json"] = text
    header = "# Generated by `python -m schemas.export` from the pydantic models. Do not edit.\n"
    body = yaml.safe_dump(asyncapi_document(), sort_keys=False, allow_unicode=True, width=100)
    files[ASYNCAPI_PATH] = header + body
    return files


def stale_files() -> list[Path]:
    """Generated files whose committed content differs from a fresh export."""
    stale = [
        path for path, text in render_files().items()
        if not path.exists() or path.read_text() != text
    ]
    known = {p.name for p in render_files() if p.parent == JSON_DIR}
    stale += [p for p in JSON_DIR.glob("*.json") if p.name not in known]
    return stale


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m schemas.export", description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if files are out of date")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for path in stale:
            print(f"out of date: {path}", file=sys.stderr)
        return 1 if stale else 0
    JSON_DIR.mkdir(exist_ok=True)
    files = render_files()
    for old in JSON_DIR.glob("*.json"):
        if old not in files:
            old.unlink()
    for path, text in files.items():
        path.write_text(text)
    print(f"wrote {len(files)} files under {PACKAGE_DIR}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
