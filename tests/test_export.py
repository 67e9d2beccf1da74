"""The generated JSON Schemas and AsyncAPI document are in sync and valid."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from schemas.catalog import CHANNELS, JSON_MESSAGES
from schemas.device import COMMAND_ARGS
from schemas.export import ASYNCAPI_PATH, JSON_DIR, asyncapi_document, stale_files
from schemas.topics import TOPIC_TEMPLATES
from tests.examples import EXAMPLES

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / ".cache" / "asyncapi" / "asyncapi-3.0.0.json"


def test_committed_files_match_a_fresh_export() -> None:
    assert stale_files() == [], "run `python -m schemas.export` and commit the result"


@pytest.fixture(scope="module")
def asyncapi_validator() -> jsonschema.Draft7Validator:
    if not SPEC.exists():
        pytest.fail(f"{SPEC} is missing: `make test` fetches it from the npm package "
                    "@asyncapi/specs")
    schema = json.loads(SPEC.read_text())
    return jsonschema.Draft7Validator(schema)


def test_asyncapi_document_validates(asyncapi_validator: jsonschema.Draft7Validator) -> None:
    document = yaml.safe_load(ASYNCAPI_PATH.read_text())
    errors = [f"{list(e.absolute_path)}: {e.message}"
              for e in asyncapi_validator.iter_errors(document)]
    assert errors == []


def _break(document: dict[str, Any]) -> dict[str, Any]:
    broken = copy.deepcopy(document)
    broken["operations"]["receiveTelemetry"]["action"] = "publish"  # AsyncAPI 2 wording
    return broken


def test_the_validator_catches_a_broken_document(
    asyncapi_validator: jsonschema.Draft7Validator,
) -> None:
    assert list(asyncapi_validator.iter_errors(_break(asyncapi_document())))


def test_every_topic_is_a_channel_with_bindings() -> None:
    document = asyncapi_document()
    addresses = {c["address"] for c in document["channels"].values()}
    assert addresses == {f"edgefl/v1/{t}" for t in TOPIC_TEMPLATES.values()}
    for operation in document["operations"].values():
        binding = operation["bindings"]["mqtt"]
        assert binding["qos"] == 1
        assert isinstance(binding["retain"], bool)
    retained = {op["channel"]["$ref"].split("/")[-1] for op in document["operations"].values()
                if op["bindings"]["mqtt"]["retain"]}
    assert "deviceState" in retained
    assert "telemetry" not in retained
    assert sum(c.retain for c in CHANNELS.values()) == len(retained)


@pytest.mark.parametrize("model", JSON_MESSAGES, ids=lambda m: m.__name__)
def test_json_schema_files_accept_the_examples(model: type) -> None:
    schema = json.loads((JSON_DIR / f"{model.__name__}.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    instance = json.loads(EXAMPLES[model].model_dump_json())
    jsonschema.Draft202012Validator(schema).validate(instance)


def _committed() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(ASYNCAPI_PATH.read_text())
    return document


def _resolve(document: dict[str, Any], ref: str) -> dict[str, Any]:
    node: Any = document
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    if "$ref" in node:
        return _resolve(document, node["$ref"])
    assert isinstance(node, dict)
    return node


def _channel_messages(document: dict[str, Any], address_end: str) -> list[dict[str, Any]]:
    [channel] = [c for c in document["channels"].values()
                 if c["address"].endswith(address_end)]
    return [_resolve(document, m["$ref"]) for m in channel["messages"].values()]


def _payload_validator(document: dict[str, Any], schema: str) -> jsonschema.Validator:
    root = {"$ref": f"#/components/schemas/{schema}", "components": document["components"]}
    return jsonschema.Draft202012Validator(root)


@pytest.mark.parametrize("address_end", ["/fl/{task}/global/{version}", "/fl/{task}/round",
                                         "/alerts/{device_id}/{rule}"])
def test_the_clear_messages_are_documented(address_end: str) -> None:
    document = _committed()
    clears = [m for m in _channel_messages(document, address_end) if m["name"] == "clear"]
    assert len(clears) == 1, f"{address_end} documents no empty retained clear message"
    assert clears[0]["payload"]["maxLength"] == 0
    assert "retained" in clears[0]["description"]
    [operation] = [op for op in document["operations"].values()
                   if document["channels"][op["channel"]["$ref"].split("/")[-1]]["address"]
                   .endswith(address_end)]
    assert operation["bindings"]["mqtt"]["retain"] is True
    assert len(operation["messages"]) == 2  # the payload and its clear


def test_every_command_has_its_own_args_schema() -> None:
    document = _committed()
    commands = {m["x-edgefl-command"]: m for m in _channel_messages(document, "/cmd/{command}")}
    assert set(commands) == set(COMMAND_ARGS)
    command_channel = document["channels"]["command"]
    assert command_channel["parameters"]["command"]["enum"] == list(COMMAND_ARGS)
    for name, model in COMMAND_ARGS.items():
        message = commands[name]
        assert message["name"] == name
        schema = _resolve(document, message["payload"]["$ref"])
        assert schema["properties"]["args"] == {"$ref": f"#/components/schemas/{model.__name__}"}
        assert document["components"]["schemas"][model.__name__]["additionalProperties"] is False
    rollback = document["components"]["schemas"]["RollbackArgs"]
    assert "model" in rollback["required"]
    validator = _payload_validator(document, "RollbackCommand")
    base = {"schema_version": 1, "correlation_id": "c-1", "ts": 1_700_000_000.0}
    assert not list(validator.iter_errors({**base, "args": {"model": "digits"}}))
    assert list(validator.iter_errors({**base, "args": {}}))  # no model
    assert list(validator.iter_errors(base))  # no args at all
    assert list(validator.iter_errors({**base, "args": {"model": "digits", "modle": "x"}}))
    ping = _payload_validator(document, "PingCommand")
    assert not list(ping.iter_errors(base))
    assert list(ping.iter_errors({**base, "args": {"model": "digits"}}))


def test_the_release_channel_says_chunks_come_first() -> None:
    document = _committed()
    [release] = [m for m in _channel_messages(document, "/models/{model}/release")
                 if m["name"] != "clear"]
    assert "chunks before the manifest" in release["description"].lower()
    assert "chunks are published first" in document["channels"]["release"]["summary"]
    [chunk] = [m for m in _channel_messages(document, "/chunks/{chunk}") if m["name"] != "clear"]
    assert "before the release manifest" in chunk["description"]


def test_every_message_states_its_content_type() -> None:
    document = _committed()
    for kind, channel in CHANNELS.items():
        address = "/" + TOPIC_TEMPLATES[kind]
        for message in _channel_messages(document, address):
            binding = message["bindings"]["mqtt"]
            if message["name"] == "clear":  # zero bytes, sent without properties
                assert "contentType" not in binding and "payloadFormatIndicator" not in binding
                continue
            assert message["contentType"] == channel.content_type, address
            assert binding["contentType"] == channel.content_type, address
            indicator = 1 if channel.content_type == "application/json" else 0
            assert binding["payloadFormatIndicator"] == indicator, address
            assert f"content type `{channel.content_type}`" in message["description"]
            assert f"payload format indicator {indicator}" in message["description"]
