"""The `edgefl` command line: version, broker lifecycle, provisioning, demo."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from broker.launcher import free_port, port_accepts
from broker.passwords import PasswordFile
from tests.mqtt_client import SyncClient

EDGEFL = [sys.executable, "-m", "edgefl"]
REPO = Path(__file__).resolve().parents[1]


def _run(
    *args: str, stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EDGEFL, *args], capture_output=True, text=True, input=stdin,
                          timeout=timeout, cwd=REPO, check=False)


def test_version_reports_installed_parts() -> None:
    result = _run("version", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["schema_version"] == 1
    assert info["mosquitto"] is not None
    assert info["paho-mqtt"].startswith("2.")


def test_schema_export_check_passes() -> None:
    result = subprocess.run([sys.executable, "-m", "schemas.export", "--check"],
                            capture_output=True, text=True, cwd=REPO, check=False)
    assert result.returncode == 0, result.stderr


def _wait_port(host: str, port: int, proc: subprocess.Popen[str], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_accepts(host, port):
            return
        try:
            proc.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            continue
        pytest.fail(f"edgefl broker exited early: {proc.stdout.read() if proc.stdout else ''}")
    pytest.fail("edgefl broker did not listen in time")


def _connect_when_ready(port: int, username: str, password: str, timeout: float = 10) -> SyncClient:
    """Connect, retrying while the broker re-reads its password file after SIGHUP."""
    deadline = time.monotonic() + timeout
    while True:
        client = SyncClient("127.0.0.1", port, client_id=f"{username}-cli", username=username,
                            password=password)
        if not client.connect().is_failure:
            return client
        client.close()
        if time.monotonic() > deadline:
            pytest.fail(f"{username} still refused after {timeout} s")


@pytest.mark.integration
def test_broker_runs_in_foreground_reloads_devices_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    port, service_port, observer_port = free_port(), free_port(), free_port()
    data = tmp_path / "broker"

    def ignore_sigint() -> None:  # as a background job inherits it: Ctrl-C must still work
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    proc = subprocess.Popen([*EDGEFL, "broker", "--port", str(port), "--service-port",
                             str(service_port), "--observer-port", str(observer_port),
                             "--data-dir", str(data)], preexec_fn=ignore_sigint,  # noqa: PLW1509
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        _wait_port("127.0.0.1", port, proc)
        cloud_password = (data / "secrets" / "edgefl-cloud.password").read_text().strip()
        cloud = _connect_when_ready(service_port, "edgefl-cloud", cloud_password)
        cloud.close()

        added = _run("broker", "add-device", "pi-new", "--data-dir", str(data))
        assert added.returncode == 0, added.stderr
        assert "running broker reloaded" in added.stdout
        password = (data / "secrets" / "pi-new.password").read_text().strip()
        assert password not in added.stdout + added.stderr
        device = _connect_when_ready(port, "pi-new", password)
        assert device.publish("edgefl/v1/devices/pi-new/telemetry", b"{}") in (0, 0x10)
        assert device.publish("edgefl/v1/devices/other/telemetry", b"{}") == 0x87
        device.close()

        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:  # stopped as the launcher stops, so Mosquitto goes with it
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, out
    assert "mosquitto stopped" in out
    assert not port_accepts("127.0.0.1", port)
    assert password not in out
    for path in data.rglob("*"):
        if path.is_file() and path.parent.name != "secrets":
            assert password.encode() not in path.read_bytes(), path


def test_add_device_with_chosen_password_and_tls(tmp_path: Path) -> None:
    data = tmp_path / "b"
    assert _run("broker", "init", "--tls", "--data-dir", str(data)).returncode == 0
    result = _run("broker", "add-device", "pi-9", "--tls", "--password-stdin",
                  "--data-dir", str(data), stdin="chosen-secret\n")
    assert result.returncode == 0, result.stderr
    assert "chosen-secret" not in result.stdout
    assert PasswordFile(data / "passwd").check("pi-9", "chosen-secret")
    assert (data / "pki" / "clients" / "pi-9.crt").exists()
    bad = _run("broker", "add-device", "bad/id", "--data-dir", str(data))
    assert bad.returncode == 2
    assert "invalid" in bad.stderr
    removed = _run("broker", "remove-device", "pi-9", "--data-dir", str(data))
    assert removed.returncode == 0 and "removed" in removed.stdout, removed.stderr
    assert not PasswordFile(data / "passwd").check("pi-9", "chosen-secret")
    assert not (data / "pki" / "clients" / "pi-9.crt").exists()
    assert not (data / "pki" / "clients" / "pi-9.key").exists()


@pytest.mark.integration
def test_demo_over_mtls_connects_every_client_with_its_certificate(tmp_path: Path) -> None:
    """`edgefl demo --tls`: devices, the cloud and the observer on the mTLS listeners only.

    No client has a password in this mode, so a client on a plain listener would be
    refused; the broker's log also shows on which port each client connected.
    """
    data = tmp_path / "demo"
    summary_path = tmp_path / "demo.json"
    result = subprocess.run([*EDGEFL, "demo", "--tls", "--devices", "4", "--rounds", "3",
                             "--reports", "3", "--data-dir", str(data),
                             "--json", str(summary_path)],
                            capture_output=True, text=True, timeout=180, cwd=REPO,
                            env={**os.environ, "COLUMNS": "100"}, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(summary_path.read_text())
    assert summary["ok"] is True and summary["tls"] is True
    assert summary["acl_denied_reason"] == 0x87  # the ACL holds for certificate identities
    assert summary["rollout"]["state"] == "completed"
    config = (data / "broker" / "mosquitto.conf").read_text().splitlines()
    listeners = [int(line.split()[1]) for line in config if line.startswith("listener ")]
    plain_device, tls_device, plain_service, tls_service, observer = listeners
    log = (data / "broker" / "mosquitto.log").read_text()
    port_of = dict(re.findall(r"New connection from (\S+) on port (\d+)\.", log))
    clients = re.findall(r"New client connected from (\S+) as (\S+) \(.*u'([^']+)'\)", log)
    by_port = {(int(port_of[peer]), username) for peer, _id, username in clients}
    devices = {f"demo-{i:02d}" for i in range(4)}
    assert {u for p, u in by_port if p == tls_device} == devices
    assert {u for p, u in by_port if p == tls_service} == {"edgefl-cloud"}
    assert not {p for p, _u in by_port} & {plain_device, plain_service, observer}, by_port


def test_demo_over_tls_needs_mosquitto() -> None:
    result = _run("demo", "--tls", "--broker", "amqtt")
    assert result.returncode == 2
    assert "TLS needs Mosquitto" in result.stderr


@pytest.mark.integration
@pytest.mark.parametrize("broker", ["mosquitto", "amqtt"])
def test_demo_finishes_and_reports(tmp_path: Path, broker: str) -> None:
    summary_path = tmp_path / "demo.json"
    env = {**os.environ, "COLUMNS": "100"}
    charts = tmp_path / "charts"
    result = subprocess.run([*EDGEFL, "demo", "--broker", broker, "--json", str(summary_path),
                             "--plot", str(charts)],
                            capture_output=True, text=True, timeout=180, cwd=REPO, env=env,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(summary_path.read_text())
    assert summary["ok"] is True
    assert summary["received"]["telemetry"] >= summary["telemetry_expected"]
    assert summary["refused"] == {"validation": 1}
    assert summary["lwt_offline_retained"] is True
    assert "deliberate fault" in result.stdout  # the bad message is labelled as such
    if broker == "mosquitto":
        assert summary["acl_denied_reason"] == 0x87
    assert summary["model_test_accuracy"] > 0.9
    # The release went through the service's rollout manager: canary first, then all.
    rollout = summary["rollout"]
    assert rollout["state"] == "completed", rollout
    assert len(rollout["canary"]) == 2 and rollout["stages"] == [2, 10]
    alert = summary["alert"]
    assert alert["opened"] is True and alert["resolved"] is True
    assert alert["opened_at"] < alert["cleared_at"]
    during = [p["error_rate_percent"] for p in alert["telemetry"]
              if alert["opened_at"] - 1.0 <= p["ts"] <= alert["opened_at"]]
    assert during and max(during) > alert["threshold"], alert["telemetry"]
    assert alert["telemetry"][-1]["error_rate_percent"] <= alert["threshold"]
    fl = summary["fl"]
    assert len(fl["rounds"]) == 15 and fl["epsilon_spent"] is None  # no DP in the demo
    assert fl["bytes_on_wire"] == sum(r["bytes_received"] for r in fl["rounds"]) > 0
    import matplotlib.image

    for name in ("fl_accuracy", "fl_bytes", "fleet_accuracy", "alert_telemetry"):
        png = charts / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        pixels = matplotlib.image.imread(png)
        assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 400, name
        assert pixels.std() > 0.01, f"{name} is blank"
    assert summary["cloud_stored_telemetry"] >= summary["telemetry_expected"]
    # The optimizer ran on the federated weights; its ONNX build is what was released.
    outputs = {o["recipe"]: o for o in summary["optimized"]}
    assert set(outputs) == {"onnx", "onnx-int8-dynamic", "torchscript"}
    assert outputs["onnx"]["state"] == "registered"
    assert summary["released_version"] == outputs["onnx"]["version"]
    assert outputs["onnx-int8-dynamic"]["size_bytes"] < outputs["onnx"]["size_bytes"]
    assert all(o["latency_ms_p50"] > 0 for o in outputs.values() if o["state"] != "failed")
    for device in summary["fleet"]:
        assert device["installed_version"] == summary["released_version"]
        assert device["accuracy"] > 0.8
        assert 0 < device["latency_ms_p50"] <= device["latency_ms_p95"]


@pytest.mark.parametrize(("task", "strategy", "named"), [
    ("nowhere.module:Task", "fedavg", "nowhere"),
    ("fl_tasks.digits:DigitsTask", "no-such-strategy", "no-such-strategy"),
])
def test_cloud_with_a_bad_task_or_strategy_is_one_line_and_leaves_nothing(
        tmp_path: Path, task: str, strategy: str, named: str) -> None:
    """Issue 10: a bad --task or strategy is one line on stderr, exit 2, no folder left."""
    config = tmp_path / "cloud.yaml"
    config.write_text(f"fl:\n  digits:\n    task: {task}\n    strategy: {strategy}\n")
    data_dir = tmp_path / "new" / "cloud"
    result = _run("cloud", "--config", str(config), "--data-dir", str(data_dir),
                  "--broker", f"127.0.0.1:{free_port()}")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], lines
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "new").exists()


def test_a_missing_cloud_password_file_is_one_line(tmp_path: Path) -> None:
    result = _run("cloud", "--data-dir", str(tmp_path / "cloud"), "--password-file",
                  str(tmp_path / "nothing.password"), "--broker", f"127.0.0.1:{free_port()}")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no password file" in lines[0], lines
    assert not (tmp_path / "cloud").exists()


def test_a_failed_start_removes_its_own_folders_and_no_one_elses(tmp_path: Path) -> None:
    from schemas.settings_files import first_missing, remove_made

    mine = tmp_path / "var" / "edge" / "dev-1"
    assert first_missing(mine) == tmp_path / "var"
    mine.mkdir(parents=True)
    (mine / "outbox.sqlite3").write_bytes(b"x")
    other = tmp_path / "var" / "edge" / "dev-2"  # a second agent started meanwhile
    other.mkdir()
    remove_made(mine, tmp_path / "var")
    assert not mine.exists() and other.is_dir()
    remove_made(other, tmp_path / "var")
    assert not (tmp_path / "var").exists() and tmp_path.is_dir()
    assert first_missing(tmp_path) is None
