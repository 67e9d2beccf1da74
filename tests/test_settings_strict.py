"""Every settings section refuses unknown keys; edge and cloud read their own variables."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from broker.settings import BrokerSettings
from cloud.fl.config import FLTaskConfig
from cloud.settings import CloudSettings
from edge_node.settings import EdgeSettings
from schemas.fl import Compression


@pytest.mark.parametrize("values", [
    {"fl": {"digits": {"task": "fl_tasks.digits:DigitsTask", "rounnds": 3}}},
    {"fl": {"digits": {"task": "fl_tasks.digits:DigitsTask",
                       "privacy": {"clip_norm": 1, "noise_multiplier": 1, "epsilon": 3}}}},
    {"fl": {"digits": {"task": "fl_tasks.digits:DigitsTask", "selection": {"polcy": "fair"}}}},
    {"ingest": {"rate_limit": {"messages_per_second": 5}}},
    {"mqtt": {"hots": "broker"}},
    {"alerts": {"tick_interval": 1}},
])
def test_a_typo_in_the_cloud_settings_is_an_error(values: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        CloudSettings.model_validate(values)


@pytest.mark.parametrize("values", [
    {"telemetry": {"intervall_s": 1}},
    {"buffer": {"max_message": 5}},
    {"fl": {"tasks": {"digits": {"path": "fl_tasks.digits:DigitsTask", "partitons": 2}}}},
    {"mqtt": {"tls": {"ca_file": "/ca", "cert": "/c"}}},
    {"ota": {"trusted_key": {}}},
])
def test_a_typo_in_the_edge_settings_is_an_error(values: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        EdgeSettings.model_validate({"device_id": "d", **values})


def test_a_typo_in_the_broker_settings_is_an_error() -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        BrokerSettings.model_validate({"tls": {"enabled": True, "prot": 1}})


def test_edge_and_cloud_variables_do_not_mix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFL_EDGE_FL__TASKS__DIGITS__PATH", "fl_tasks.digits:DigitsTask")
    monkeypatch.setenv("EDGEFL_EDGE_MQTT__PORT", "1999")
    monkeypatch.setenv("EDGEFL_CLOUD_MQTT__PORT", "2888")
    cloud = CloudSettings()
    assert cloud.fl == {} and cloud.mqtt.port == 2888
    edge = EdgeSettings(device_id="d")
    assert list(edge.fl.tasks) == ["digits"] and edge.mqtt.port == 1999


@pytest.mark.parametrize(("section", "unknown"), [
    ({"hyperparams": {"local_epoch": 5}}, "hyperparams.local_epoch"),
    ({"compression": {"kin": "topk_int8"}}, "compression.kin"),
])
def test_a_typo_in_a_wire_model_of_a_task_is_an_error(
    section: dict[str, Any], unknown: str, tmp_path: Path,
) -> None:
    """Wire models ignore unknown keys on the wire; in a settings file it is a typo."""
    task = {"task": "fl_tasks.digits:DigitsTask", **section}
    with pytest.raises(ValidationError, match=rf"FLTaskConfig: {re.escape(unknown)}\b"):
        FLTaskConfig.model_validate(task)
    config = tmp_path / "cloud.yaml"
    config.write_text(yaml.safe_dump({"fl": {"digits": task}}))
    with pytest.raises(ValidationError, match=re.escape(unknown)):
        CloudSettings.load(config)


def test_the_valid_wire_models_of_a_task_still_load(tmp_path: Path) -> None:
    task = {"task": "fl_tasks.digits:DigitsTask",
            "hyperparams": {"local_epochs": 5, "schema_version": 1},
            "compression": {"kind": "topk_int8", "topk_fraction": 0.1}}
    config = tmp_path / "cloud.yaml"
    config.write_text(yaml.safe_dump({"fl": {"digits": task}}))
    loaded = CloudSettings.load(config).fl["digits"]
    assert loaded.hyperparams.local_epochs == 5
    assert loaded.compression.kind is Compression.TOPK_INT8
    assert FLTaskConfig.model_validate_json(loaded.model_dump_json()) == loaded
