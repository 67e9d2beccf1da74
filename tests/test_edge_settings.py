"""EdgeSettings: defaults < config file < EDGEFL_EDGE_* environment < explicit options."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from edge_node.settings import EdgeSettings
from schemas.settings_files import ConfigFileError


def test_priority_file_env_explicit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "edge.toml"
    config.write_text('device_id = "from-file"\n[mqtt]\nhost = "file-host"\nport = 1111\n'
                      '[telemetry]\ninterval_s = 3.0\n')
    monkeypatch.setenv("EDGEFL_EDGE_MQTT__PORT", "2222")
    settings = EdgeSettings.load(config, device_id="explicit", telemetry=None)
    assert settings.device_id == "explicit"
    assert settings.mqtt.host == "file-host"  # file, untouched by env
    assert settings.mqtt.port == 2222  # env over file
    assert settings.telemetry.interval_s == 3.0  # None options fall through
    assert settings.username == "explicit"


@pytest.mark.parametrize(("name", "text"), [
    ("edge.yaml", "device_id: pi-1\nmqtt:\n  protocol: 4\n"),
    ("edge.json", '{"device_id": "pi-1", "mqtt": {"protocol": 4}}'),
])
def test_yaml_and_json_files(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    assert EdgeSettings.load(path).mqtt.protocol == 4


def test_bad_settings_fail_at_start(tmp_path: Path) -> None:
    bad = tmp_path / "edge.toml"
    bad.write_text("device_id = [")
    with pytest.raises(ConfigFileError):
        EdgeSettings.load(bad)
    with pytest.raises(ValidationError):
        EdgeSettings.load(None, device_id="bad/id")
    with pytest.raises(ValidationError):
        EdgeSettings.load(None, device_id="ok", mqtt={"reconnect_min_s": 5,
                                                      "reconnect_max_s": 1})
    with pytest.raises(ConfigFileError):
        EdgeSettings.load(tmp_path / "missing.toml", device_id="x")


def test_the_agents_packet_limit_is_the_project_brokers() -> None:
    """Under MQTT 3.1.1 the broker advertises no maximum: the agent's default must be the
    limit the project's Mosquitto config sets, or oversized packets wedge the session."""
    from broker.config import render_config
    from broker.settings import BrokerSettings
    from edge_node.settings import MqttSettings

    broker = BrokerSettings()
    assert MqttSettings().max_packet_bytes == broker.max_packet_size
    assert f"max_packet_size {broker.max_packet_size}" in render_config(broker)
