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
