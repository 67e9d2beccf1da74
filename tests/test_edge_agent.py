"""The edge agent against the real Mosquitto: session, telemetry, commands, limits."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from edge_node.errors import PacketTooLargeError
from schemas.base import decode_message, now
from schemas.device import Command, CommandStatus, DeviceState, DeviceTelemetry
from schemas.topics import TopicKind, Topics
from tests.agent_fixtures import AgentFactory, is_state, send_command, telemetry, wait_until
from tests.cloud_fixtures import CloudFactory
from tests.conftest import RunningBroker
from tests.mqtt_client import SyncClient

pytestmark = pytest.mark.integration


def test_birth_cadence_and_lwt_with_matching_bdseq(make_agent: AgentFactory, cloud: SyncClient,
                                                   topics: Topics) -> None:
    agent = make_agent(interval_s=0.2)
    d = agent.device_id
    birth = decode_message(DeviceState, cloud.wait_for(is_state(topics, d, "online")).payload)
    assert birth.bd_seq == agent.session.bd_seq
    assert birth.hardware is not None and birth.hardware.cpu_count >= 1
    assert set(birth.model_formats) == {"onnx", "tflite", "torchscript"}
    assert "onnxruntime" in birth.runtimes

    cloud.wait_for(lambda m: m.topic == topics.telemetry(d)
                   and decode_message(DeviceTelemetry, m.payload).seq >= 4, timeout=10)
    reports = telemetry(cloud, topics, d)[:5]
    assert [t.seq for t in reports] == [0, 1, 2, 3, 4]
    assert len({t.session_id for t in reports}) == 1
    gaps = np.diff([t.ts for t in reports])
    assert 0.1 < float(np.median(gaps)) < 0.5, gaps
    assert reports[-1].network_latency_ms is not None  # measured from PUBACKs
    assert not any(t.historical for t in reports)

    first = agent.session.bd_seq
    agent.session.drop()  # abrupt: the broker publishes the will
    death = decode_message(DeviceState, cloud.wait_for(
        is_state(topics, d, "offline", first)).payload)
    assert (death.reason, death.bd_seq) == ("lwt", first)
    rebirth = decode_message(DeviceState, cloud.wait_for(
        is_state(topics, d, "online", first + 1)).payload)
    assert rebirth.bd_seq == first + 1


def test_clean_stop_publishes_offline_shutdown(make_agent: AgentFactory, cloud: SyncClient,
                                               topics: Topics) -> None:
    agent = make_agent()
    agent.stop()
    stopped = decode_message(DeviceState, cloud.wait_for(
        is_state(topics, agent.device_id, "offline")).payload)
    assert stopped.reason == "shutdown"
    assert stopped.bd_seq == agent.session.bd_seq


def test_commands_answer_with_the_correlation_id(make_agent: AgentFactory, cloud: SyncClient,
                                                 topics: Topics) -> None:
    agent = make_agent(interval_s=30)
    d = agent.device_id
    pong = send_command(cloud, topics, d, "ping")
    assert pong.status is CommandStatus.OK and pong.result["bd_seq"] == agent.session.bd_seq

    unknown = send_command(cloud, topics, d, "self_destruct")
    assert unknown.status is CommandStatus.ERROR and "unknown command" in (unknown.error or "")

    bad = send_command(cloud, topics, d, "set_telemetry_interval", {"interval_s": -1})
    assert bad.status is CommandStatus.ERROR
    ok = send_command(cloud, topics, d, "set_telemetry_interval", {"interval_s": 0.1})
    assert ok.status is CommandStatus.OK and agent.interval_s == 0.1

    report = send_command(cloud, topics, d, "report_now")
    assert report.status is CommandStatus.OK
    cloud.wait_for(lambda m: m.topic == topics.telemetry(d))

    garbage = send_command(cloud, topics, d, "ping", raw=b"{not json")
    assert garbage.status is CommandStatus.ERROR and garbage.correlation_id == "invalid"
    expired = send_command(cloud, topics, d, "ping", raw=Command(
        correlation_id="late", ts=now() - 100, expires_at=now() - 50).to_json())
    assert expired.status is CommandStatus.ERROR and "expired" in (expired.error or "")
    assert agent.counters["command_unknown"] == 1
    assert agent.counters["command_invalid_json"] == 1

    no_model = send_command(cloud, topics, d, "rollback", {"model": "nothing-installed"})
    assert no_model.status is CommandStatus.ERROR and "no previous" in (no_model.error or "")


def test_refuses_packets_over_the_brokers_maximum(make_agent: AgentFactory,
                                                  mosquitto: RunningBroker) -> None:
    agent = make_agent()
    assert agent.session.max_packet_size == mosquitto.settings.max_packet_size
    topic = agent.topics.model_metrics(agent.device_id, "m")
    with pytest.raises(PacketTooLargeError):
        agent.session.publish(topic, b"x" * mosquitto.settings.max_packet_size)
    # Still connected and publishing afterwards.
    assert agent.session.publish_wait(topic, b"{}") in (0, 0x10)


def test_counters_and_latency_reach_telemetry(make_agent: AgentFactory, cloud: SyncClient,
                                              topics: Topics) -> None:
    agent = make_agent(interval_s=0.2)
    send_command(cloud, topics, agent.device_id, "nope")
    cloud.wait_for(lambda m: m.topic == topics.telemetry(agent.device_id)
                   and decode_message(DeviceTelemetry, m.payload).counters.get(
                       "command_unknown") == 1)
    last = telemetry(cloud, topics, agent.device_id)[-1]
    assert last.counters["buffer_evicted"] == 0
    assert json.loads(last.to_json())["error_rate_percent"] == 0.0


def test_filters_cover_what_the_agent_subscribes(topics: Topics) -> None:
    assert topics.filter(TopicKind.COMMAND, device_id="dev-1").endswith("/devices/dev-1/cmd/+")


def test_mqtt_311_agent(make_agent: AgentFactory, cloud: SyncClient, topics: Topics) -> None:
    agent = make_agent(mqtt={"protocol": 4})
    cloud.wait_for(is_state(topics, agent.device_id, "online"))
    cloud.wait_for(lambda m: m.topic == topics.telemetry(agent.device_id))
    assert agent.session.max_packet_size is None  # 3.1.1 has no CONNACK properties
    first = agent.session.bd_seq
    agent.session.drop()
    cloud.wait_for(is_state(topics, agent.device_id, "offline", first))
    cloud.wait_for(is_state(topics, agent.device_id, "online", first + 1))


def test_edgefl_cmd_sends_a_command_and_prints_the_reply(
    make_agent: AgentFactory, mosquitto: RunningBroker, topics: Topics, tmp_path: Path,
) -> None:
    import json
    import subprocess
    import sys

    agent = make_agent()
    password = tmp_path / "cloud.password"
    password.write_text(mosquitto.password(mosquitto.cloud_username))
    repo = Path(__file__).resolve().parents[1]
    env = {"EDGEFL_CLOUD_TOPIC_ROOT": topics.root, "PATH": "/usr/bin:/bin"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "edgefl", "cmd", *args, "--broker",
             f"{mosquitto.host}:{mosquitto.service_port}", "--password-file", str(password)],
            cwd=repo, env=env, capture_output=True, text=True, timeout=60, check=False)

    ok = run(agent.device_id, "set_telemetry_interval", "--arg", "interval_s=0.5")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads(ok.stdout)["result"] == {"interval_s": 0.5}
    failed = run(agent.device_id, "rollback", "--arg", "model=nope")
    assert failed.returncode == 1 and json.loads(failed.stdout)["status"] == "error"
    silent = run("dev-599", "ping", "--timeout", "2")  # provisioned, never connected
    assert silent.returncode == 1 and "no reply" in silent.stderr


def test_birth_will_and_edgefl_cmd_say_what_their_payload_is(
    make_agent: AgentFactory, mosquitto: RunningBroker, cloud: SyncClient, topics: Topics,
    tmp_path: Path,
) -> None:
    import subprocess
    import sys

    json_5 = ("application/json", 1)
    agent = make_agent()
    d = agent.device_id
    birth = cloud.wait_for(is_state(topics, d, "online"))
    assert (birth.content_type, birth.payload_format) == json_5
    first = agent.session.bd_seq
    agent.session.drop()  # abrupt: the broker publishes the will with its properties
    will = cloud.wait_for(is_state(topics, d, "offline", first))
    assert (will.content_type, will.payload_format) == json_5
    cloud.wait_for(is_state(topics, d, "online", first + 1))

    password = tmp_path / "cloud.password"
    password.write_text(mosquitto.password(mosquitto.cloud_username))
    sent = subprocess.run(
        [sys.executable, "-m", "edgefl", "cmd", d, "ping", "--broker",
         f"{mosquitto.host}:{mosquitto.service_port}", "--password-file", str(password)],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=60,
        env={"EDGEFL_CLOUD_TOPIC_ROOT": topics.root, "PATH": "/usr/bin:/bin"}, check=False)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    command = cloud.wait_for(lambda m: m.topic == topics.command(d, "ping"))
    assert (command.content_type, command.payload_format) == json_5


def test_an_mqtt_311_agent_sends_no_properties(make_agent: AgentFactory, cloud: SyncClient,
                                               topics: Topics) -> None:
    agent = make_agent(mqtt={"protocol": 4})
    birth = cloud.wait_for(is_state(topics, agent.device_id, "online"))
    first = agent.session.bd_seq
    agent.session.drop()
    will = cloud.wait_for(is_state(topics, agent.device_id, "offline", first))
    assert (birth.content_type, birth.payload_format) == (None, None)
    assert (will.content_type, will.payload_format) == (None, None)


def test_a_session_taken_over_is_one_warning_and_a_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """The DISCONNECT reason 0x8E, injected: Mosquitto sends it from 2.0.15 on only."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    from edge_node.counters import Counters
    from edge_node.session import MqttSession
    from edge_node.settings import EdgeSettings

    counters = Counters()
    session = MqttSession(EdgeSettings(device_id="dev-x", state_dir=tmp_path),
                          Topics("edgefl/v1"), birth=lambda _s: pytest.fail("no birth"),
                          on_message=lambda _m: None, counters=counters)
    taken = ReasonCode(PacketTypes.DISCONNECT, identifier=0x8E)
    other = ReasonCode(PacketTypes.DISCONNECT, identifier=0x8D)
    with caplog.at_level(logging.INFO, logger="edge_node.session"):
        session._on_disconnect(session.client, None, None, taken, None)
        session._on_disconnect(session.client, None, None, other, None)
    assert counters["session_taken_over"] == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "session taken over" in warnings[0]


def test_edgefl_cmd_with_no_broker_is_one_line_and_exit_2(tmp_path: Path) -> None:
    import subprocess
    import sys

    from broker.launcher import free_port

    password = tmp_path / "cloud.password"
    password.write_text("x")
    result = subprocess.run(
        [sys.executable, "-m", "edgefl", "cmd", "dev-1", "ping", "--broker",
         f"127.0.0.1:{free_port()}", "--password-file", str(password), "--timeout", "5"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin"}, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the broker" in lines[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_the_agent_and_the_cloud_turn_nagle_off(make_agent: AgentFactory,
                                                 make_cloud: CloudFactory) -> None:
    """Small packets (SUBSCRIBE, PUBACK, statuses) leave at once: with Nagle on, a release's
    first chunk came 47 ms after the SUBSCRIBE (the broker's delayed ACK), 3-15 ms without."""
    import socket

    agent = make_agent()
    sock = agent.session.client.socket()
    assert isinstance(sock, socket.socket)
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    cloud = make_cloud()
    wait_until(cloud.service.link.connected.is_set, what="the cloud connected")
    link_sock = cloud.service.link.client._client.socket()
    assert isinstance(link_sock, socket.socket)
    assert link_sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
