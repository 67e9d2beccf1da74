"""Fixtures and helpers for tests that run real edge agents against the Mosquitto fixture."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from edge_node.agent import EdgeAgent, Sampler
from edge_node.settings import EdgeSettings, MqttSettings, OtaSettings, TelemetrySettings
from schemas.base import decode_message, now
from schemas.device import Command, CommandResult, DeviceState, DeviceTelemetry
from schemas.topics import Topics
from tests.conftest import RunningBroker
from tests.mqtt_client import Received, SyncClient
from tests.releases import KEY_ID, public_key_b64

AgentFactory = Callable[..., EdgeAgent]


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition",
               ) -> None:
    """Poll ``condition`` (bounded) for state that has no message to wait on."""
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout} s")
        tick.wait(0.02)


def agent_settings(broker: RunningBroker, topics: Topics, device_id: str, state_dir: Path,
                   **overrides: Any) -> EdgeSettings:
    """Settings for a test agent: fast cadence, fast reconnects, the test signing key."""
    mqtt_values: dict[str, Any] = {
        "host": broker.host, "port": broker.port,
        "password": SecretStr(broker.password(device_id)),
        "reconnect_min_s": 0.05, "reconnect_max_s": 0.5, "publish_timeout_s": 5.0,
    }
    mqtt = MqttSettings(**(mqtt_values | overrides.pop("mqtt", {})))
    return EdgeSettings(
        device_id=device_id, topic_root=topics.root, state_dir=state_dir, mqtt=mqtt,
        telemetry=TelemetrySettings(interval_s=overrides.pop("interval_s", 0.2)),
        ota=OtaSettings(trusted_keys={KEY_ID: public_key_b64()},
                        **overrides.pop("ota", {})),
        **overrides,
    )


@pytest.fixture
def make_agent(mosquitto: RunningBroker, topics: Topics, tmp_path: Path,
               new_device_id: Callable[[], str]) -> Iterator[AgentFactory]:
    """Builds started agents (each with a fresh device id) and stops them after the test."""
    agents: list[EdgeAgent] = []

    def factory(device_id: str | None = None, *, start: bool = True,
                state_dir: Path | None = None, sampler: Sampler | None = None,
                **overrides: Any) -> EdgeAgent:
        device_id = device_id or new_device_id()
        settings = agent_settings(mosquitto, topics, device_id,
                                  state_dir or tmp_path / device_id, **overrides)
        agent = EdgeAgent(settings, sampler=sampler)
        agents.append(agent)
        if start:
            agent.start()
            assert agent.session.connected.wait(10), "agent did not connect"
        return agent

    yield factory
    for agent in agents:
        agent.stop()


@pytest.fixture
def cloud(mosquitto: RunningBroker, topics: Topics) -> Iterator[SyncClient]:
    """A client with the cloud identity, subscribed to the test's whole root."""
    client = mosquitto.connected(mosquitto.cloud_username)
    client.subscribe(topics.all())
    yield client
    client.close()


def states(cloud: SyncClient, topics: Topics, device_id: str) -> list[DeviceState]:
    """Every DeviceState received for a device."""
    return [decode_message(DeviceState, m.payload)
            for m in cloud.received_on(topics.device_state(device_id))]


def telemetry(cloud: SyncClient, topics: Topics, device_id: str) -> list[DeviceTelemetry]:
    """Every DeviceTelemetry received for a device."""
    return [decode_message(DeviceTelemetry, m.payload)
            for m in cloud.received_on(topics.telemetry(device_id))]


def is_state(topics: Topics, device_id: str, state: str, bd_seq: int | None = None,
             ) -> Callable[[Received], bool]:
    """Predicate: a DeviceState message with this state (and bd_seq)."""
    def check(m: Received) -> bool:
        if m.topic != topics.device_state(device_id):
            return False
        s = decode_message(DeviceState, m.payload)
        return s.state == state and (bd_seq is None or s.bd_seq == bd_seq)
    return check


def send_command(cloud: SyncClient, topics: Topics, device_id: str, name: str,
                 args: dict[str, Any] | None = None, raw: bytes | None = None) -> CommandResult:
    """Send a command and wait for its reply."""
    correlation = uuid.uuid4().hex[:12]
    payload = raw if raw is not None else Command(
        correlation_id=correlation, ts=now(), args=args or {}).to_json()
    reply_topic = topics.command_reply(device_id, name)
    before = len(cloud.received_on(reply_topic))
    assert cloud.publish(topics.command(device_id, name), payload) in (0, 0x10)
    cloud.wait_for(lambda m: m.topic == reply_topic
                   and len(cloud.received_on(reply_topic)) > before)
    result = decode_message(CommandResult, cloud.received_on(reply_topic)[before].payload)
    if raw is None:
        assert result.correlation_id == correlation
    return result
