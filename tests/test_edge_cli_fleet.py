"""`edgefl node` and the fleet simulator against the real broker."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from edge_node.fleet import Fleet, fleet_settings
from edge_node.settings import EdgeSettings, MqttSettings
from schemas.base import decode_message
from schemas.device import DeviceState, DeviceTelemetry
from schemas.topics import Topics
from tests.agent_fixtures import is_state
from tests.conftest import RunningBroker
from tests.mqtt_client import SyncClient

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


def test_node_command_runs_until_sigterm_and_says_goodbye(
    mosquitto: RunningBroker, topics: Topics, cloud: SyncClient, tmp_path: Path,
    new_device_id: Callable[[], str],
) -> None:
    device_id = new_device_id()
    password_file = tmp_path / "pw"
    password_file.write_text(mosquitto.password(device_id))
    env = {"EDGEFL_EDGE_TOPIC_ROOT": topics.root, "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgefl", "node", "--device-id", device_id,
         "--broker", f"{mosquitto.host}:{mosquitto.port}", "--password-file", str(password_file),
         "--state-dir", str(tmp_path / "state"), "--interval", "0.2"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        cloud.wait_for(is_state(topics, device_id, "online"), timeout=30)
        cloud.wait_for(lambda m: m.topic == topics.telemetry(device_id), timeout=10)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    state = decode_message(DeviceState, cloud.wait_for(
        is_state(topics, device_id, "offline")).payload)
    assert state.reason == "shutdown"
    assert mosquitto.password(device_id) not in out


def test_fleet_runs_real_agents_with_their_own_connections(
    mosquitto: RunningBroker, topics: Topics, cloud: SyncClient, tmp_path: Path,
) -> None:
    settings = fleet_settings(
        3, prefix="sim-", state_root=tmp_path, topic_root=topics.root,
        mqtt=MqttSettings(host=mosquitto.host, port=mosquitto.port, reconnect_min_s=0.1),
        secrets_dir=mosquitto.settings.layout.secrets, interval_s=0.2,
    )
    ids = [s.device_id for s in settings]
    assert ids == ["sim-000", "sim-001", "sim-002"]
    fleet = Fleet(settings, tmp_path)
    fleet.start()
    try:
        assert fleet.wait_connected(15) == 3
        for device_id in ids:
            msg = cloud.wait_topic(topics.telemetry(device_id))
            assert decode_message(DeviceTelemetry, msg.payload).device_id == device_id
        sockets = {id(a.session.client.socket()) for a in fleet.agents}
        assert len(sockets) == 3  # one real connection each
    finally:
        fleet.stop()
    for device_id in ids:
        cloud.wait_for(is_state(topics, device_id, "offline"))


def test_fleet_command_spreads_agents_over_processes(
    mosquitto: RunningBroker, topics: Topics, cloud: SyncClient, tmp_path: Path,
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgefl", "fleet", "--devices", "4", "--per-process", "2",
         "--first-index", "5", "--broker", f"{mosquitto.host}:{mosquitto.port}",
         "--secrets-dir", str(mosquitto.settings.layout.secrets), "--topic-root", topics.root,
         "--state-dir", str(tmp_path), "--interval", "0.5"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    ids = ["sim-005", "sim-006", "sim-007", "sim-008"]
    try:
        for device_id in ids:
            cloud.wait_for(is_state(topics, device_id, "online"), timeout=60)
        children = psutil.Process(proc.pid).children()
        assert len(children) == 2
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    for device_id in ids:
        state = decode_message(DeviceState, cloud.wait_for(
            is_state(topics, device_id, "offline")).payload)
        assert state.reason == "shutdown"


def test_fleet_says_in_one_line_which_devices_are_not_provisioned(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "sim-000.password").write_text("x\n")
    result = subprocess.run(
        [sys.executable, "-m", "edgefl", "fleet", "--devices", "20",
         "--secrets-dir", str(tmp_path / "secrets"), "--state-dir", str(tmp_path / "state")],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "19 of 20 devices have no password" in lines[0]
    assert "edgefl broker add-device --range sim-000..sim-019" in lines[0]
    assert not (tmp_path / "state").exists(), "nothing left behind"


def test_fleet_devices_join_a_task_from_the_command_line(
    mosquitto: RunningBroker, topics: Topics, cloud: SyncClient, tmp_path: Path,
) -> None:
    config = tmp_path / "fleet.yaml"
    config.write_text("telemetry:\n  interval_s: 0.7\nmqtt:\n  reconnect_min_s: 0.1\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgefl", "fleet", "--devices", "1", "--first-index", "9",
         "--config", str(config), "--fl-task", "digits=fl_tasks.digits:DigitsTask",
         "--broker", f"{mosquitto.host}:{mosquitto.port}",
         "--secrets-dir", str(mosquitto.settings.layout.secrets), "--topic-root", topics.root,
         "--state-dir", str(tmp_path / "state")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        try:
            birth = decode_message(DeviceState, cloud.wait_for(
                is_state(topics, "sim-009", "online"), timeout=60).payload)
        except TimeoutError:
            proc.kill()
            raise AssertionError(proc.communicate()[0]) from None
        assert birth.fl_tasks == ["digits"]
        telemetry = decode_message(DeviceTelemetry, cloud.wait_topic(
            topics.telemetry("sim-009"), timeout=30).payload)
        assert telemetry.interval_s == 0.7  # the settings file's cadence, not a default
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out


def test_a_node_joins_a_task_from_its_settings_file_and_says_what_it_does(
    mosquitto: RunningBroker, topics: Topics, cloud: SyncClient, tmp_path: Path,
    new_device_id: Callable[[], str],
) -> None:
    """`edgefl node --config F --fl-task N=P`: the file's root and cadence, the task in the
    birth; it prints when connected and, at INFO, one line per telemetry interval."""
    device_id = new_device_id()
    password = tmp_path / "password"
    password.write_text(mosquitto.password(device_id))
    config = tmp_path / "edge.yaml"
    config.write_text(f"topic_root: {topics.root}\ntelemetry:\n  interval_s: 0.7\n"
                      f"mqtt:\n  host: {mosquitto.host}\n  port: {mosquitto.port}\n"
                      f"  password_file: {password}\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgefl", "--log-level", "INFO", "node", "--device-id",
         device_id, "--config", str(config), "--fl-task", "digits=fl_tasks.digits:DigitsTask",
         "--state-dir", str(tmp_path / "state")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        try:
            birth = decode_message(DeviceState, cloud.wait_for(
                is_state(topics, device_id, "online"), timeout=60).payload)
        except TimeoutError:
            proc.kill()
            raise AssertionError(proc.communicate()) from None
        assert birth.fl_tasks == ["digits"]
        first = decode_message(DeviceTelemetry, cloud.wait_topic(
            topics.telemetry(device_id), timeout=30).payload)
        assert first.interval_s == 0.7
        cloud.wait_for(lambda m: m.topic == topics.telemetry(device_id) and decode_message(
            DeviceTelemetry, m.payload).seq >= first.seq + 2, timeout=30)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert f"{device_id}: connected" in out.splitlines()
    lines = [line for line in err.splitlines() if f"{device_id}: telemetry " in line]
    assert len(lines) >= 3 and all(" INFO " in line for line in lines), err[-2000:]


def test_a_bad_fl_task_option_is_one_line_and_exit_2(tmp_path: Path) -> None:
    for command in (["fleet", "--devices", "1"], ["node", "--device-id", "pi-1"]):
        result = subprocess.run(
            [sys.executable, "-m", "edgefl", *command, "--fl-task", "digits-no-path",
             "--state-dir", str(tmp_path / "s")],
            cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stderr.strip().count("\n") == 0 and "NAME=package" in result.stderr


def test_a_task_that_does_not_load_is_one_line_exit_2_and_leaves_no_folder(
        tmp_path: Path) -> None:
    """A well-formed --fl-task naming nothing importable: refused before anything stays."""
    password = tmp_path / "pi-1.password"
    password.write_text("secret\n")
    result = subprocess.run(
        [sys.executable, "-m", "edgefl", "node", "--device-id", "pi-1", "--fl-task",
         "digits=nowhere.module:Task", "--password-file", str(password),
         "--state-dir", str(tmp_path / "new" / "pi-1")],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "nowhere" in lines[0], lines
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "new").exists()


def test_a_bad_heterogeneity_profile_is_refused(tmp_path: Path) -> None:
    profile = tmp_path / "profile.yaml"
    profile.write_text("seed: 1\nslow_fraction: 2.0\n")
    result = subprocess.run(
        [sys.executable, "-m", "edgefl", "fleet", "--devices", "2", "--profile", str(profile),
         "--state-dir", str(tmp_path / "s")],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "slow_fraction" in result.stderr


@pytest.mark.parametrize("refusal", ["unreachable", "bad_password"])
def test_a_refused_connection_is_one_line_at_the_default_level(
        tmp_path: Path, mosquitto: RunningBroker, new_device_id: Callable[[], str],
        refusal: str) -> None:
    """A node that cannot connect says why at the default log level, keeps retrying (a
    device outlives a broker outage), and stops cleanly on Ctrl-C."""
    from broker.launcher import free_port

    device_id = new_device_id()
    password = tmp_path / "password"
    if refusal == "unreachable":
        password.write_text(mosquitto.password(device_id))
        where = f"127.0.0.1:{free_port()}"
    else:
        password.write_text("not-the-password\n")
        where = f"{mosquitto.host}:{mosquitto.port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgefl", "node", "--device-id", device_id, "--broker", where,
         "--password-file", str(password), "--state-dir", str(tmp_path / "state")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()  # the first line at the default level says why
        assert "WARNING" in line and device_id in line, line
        assert ("cannot reach" in line) if refusal == "unreachable" else ("refused" in line)
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in out + err


def test_a_task_the_settings_file_names_keeps_its_options_in_the_fleet(tmp_path: Path) -> None:
    base = EdgeSettings.model_validate({"device_id": "fleet-template", "fl": {"tasks": {
        "big": {"path": "fl_tasks.digits:DigitsTask", "options": {"hidden": 1500},
                "scheme": "dirichlet", "alpha": 0.3}}}})
    settings = fleet_settings(3, prefix="opt-", state_root=tmp_path, mqtt=MqttSettings(),
                              base=base, fl_tasks={"big": "fl_tasks.digits:DigitsTask",
                                                   "plain": "fl_tasks.digits:DigitsTask"})
    for i, device in enumerate(settings):
        big, plain = device.fl.tasks["big"], device.fl.tasks["plain"]
        assert (big.options, big.scheme, big.alpha) == ({"hidden": 1500}, "dirichlet", 0.3)
        assert (big.partition, big.partitions, plain.partition) == (i, 3, i)
        assert plain.options == {}
