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
from schemas.catalog import CHANNELS, JSON_MESSAGES, Channel
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
    return dict(sorted(defs.items()))


def _message(channel: Channel) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "name": _message_name(channel),
        "title": _message_name(channel),
        "summary": channel.summary,
        "contentType": channel.content_type,
    }
    if channel.message is not None and channel.content_type == "application/json":
        msg["payload"] = {"$ref": f"#/components/schemas/{channel.message.__name__}"}
    else:
        msg["payload"] = {"type": "string", "format": "binary"}
        if channel.message is not None:
            msg["description"] = (
                "safetensors bytes; the JSON envelope in `__metadata__.envelope` follows "
                f"`{channel.message.__name__}` (see `x-edgefl-envelope`)."
            )
            msg["x-edgefl-envelope"] = {"$ref": f"#/components/schemas/{channel.message.__name__}"}
    if channel.content_type == "application/json":
        msg["description"] = ("JSON, UTF-8. MQTT 5 publishers set the content type "
                              "`application/json` and the payload format indicator 1.")
    else:
        msg["description"] = (msg.get("description", "") + " MQTT 5 publishers set the content "
                              f"type `{channel.content_type}` and the payload format "
                              "indicator 0.").strip()
    if channel.kind is TopicKind.COMMAND:
        msg["description"] += (
            " `args` depends on the command (the last topic level): "
            + "; ".join(f"`{name}`: `{model.__name__}`" for name, model in COMMAND_ARGS.items())
            + ". Unknown arguments are refused; the reply says why.")
        msg["x-edgefl-command-args"] = {
            name: {"$ref": f"#/components/schemas/{model.__name__}"}
            for name, model in COMMAND_ARGS.items()}
    if channel.cleared is not None:
        msg["description"] += (" An empty retained message on this topic clears it: "
                               f"{channel.cleared}.")
    return msg


def asyncapi_document(root: str = DEFAULT_ROOT) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of the whole topic table under ``root``."""
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for kind, template in TOPIC_TEMPLATES.items():
        channel = CHANNELS[kind]
        name = _camel(kind)
        msg_name = _message_name(channel)
        messages[msg_name] = _message(channel)
        params = re.findall(r"\{(\w+)\}", template)
        entry: dict[str, Any] = {
            "address": f"{root}/{template}",
            "title": name,
            "summary": channel.summary,
            "messages": {msg_name: {"$ref": f"#/components/messages/{msg_name}"}},
        }
        if params:
            entry["parameters"] = {p: {"description": _PARAMETER_DOCS[p]} for p in params}
        channels[name] = entry
        action = "send" if channel.sender == "cloud" else "receive"
        operations[f"{action}{name[0].upper()}{name[1:]}"] = {
            "action": action,
            "channel": {"$ref": f"#/channels/{name}"},
            "summary": f"{'Published by the cloud' if action == 'send' else 'Published by devices'}"
            f"; QoS {channel.qos}{', retained' if channel.retain else ''}",
            "messages": [{"$ref": f"#/channels/{name}/messages/{msg_name}"}],
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
