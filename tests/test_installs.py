"""Each role runs from an install of its own extra only (venvs built by `make test`).

A device installs ``edgefl[edge]``: ``edgefl node`` runs a real agent without the
cloud's dependencies (no aiomqtt, no InfluxDB client, no torch). A cloud host
installs ``edgefl[cloud]``: ``edgefl cloud`` serves from it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from schemas.topics import Topics
from tests.agent_fixtures import is_state
from tests.conftest import RunningBroker
from tests.mqtt_client import SyncClient

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]
EDGE = REPO / ".cache" / "venv-edge" / "bin"
CLOUD = REPO / ".cache" / "venv-cloud" / "bin"


def venv(bin_dir: Path) -> Path:
    if not (bin_dir / "edgefl").exists():
        pytest.fail(f"{bin_dir.parent} is missing: `make test` builds it (make role-venvs)")
    return bin_dir


def run(bin_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(venv(bin_dir) / "edgefl"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)


def importable(bin_dir: Path, module: str) -> bool:
    result = subprocess.run([str(venv(bin_dir) / "python"), "-c", f"import {module}"],
                            capture_output=True, timeout=120, check=False)
    return result.returncode == 0


def test_a_device_install_has_no_cloud_dependencies_and_says_so() -> None:
    for module in ("aiomqtt", "influxdb_client", "torch", "sklearn"):
        assert not importable(EDGE, module), f"{module} is installed on a device"
    assert run(EDGE, "node", "--help").returncode == 0
    refused = run(EDGE, "cloud", "--help")
    assert refused.returncode == 2
    assert "needs the cloud extra" in refused.stderr and refused.stderr.count("\n") == 1


def test_a_device_install_runs_a_real_agent(
    mosquitto: RunningBroker, topics: Topics, cloud: SyncClient, tmp_path: Path,
    new_device_id: Callable[[], str],
) -> None:
    device_id = new_device_id()
    missing = run(EDGE, "node", "--device-id", device_id, "--password-file",
                  str(tmp_path / "none"), "--state-dir", str(tmp_path / "never"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert not (tmp_path / "never").exists(), "nothing left behind"
    password = tmp_path / "pw"
    password.write_text(mosquitto.password(device_id))
    proc = subprocess.Popen(
        [str(venv(EDGE) / "edgefl"), "--log-level", "INFO", "node", "--device-id", device_id,
         "--broker", f"{mosquitto.host}:{mosquitto.port}", "--password-file", str(password),
         "--state-dir", str(tmp_path / "state"), "--interval", "0.2"],
        cwd=REPO, env={**os.environ, "EDGEFL_EDGE_TOPIC_ROOT": topics.root},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        cloud.wait_for(is_state(topics, device_id, "online"), timeout=30)
        cloud.wait_for(lambda m: m.topic == topics.telemetry(device_id), timeout=10)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "connected" in out


def test_a_cloud_install_serves(
    mosquitto: RunningBroker, topics: Topics, tmp_path: Path,
) -> None:
    assert importable(CLOUD, "aiomqtt") and run(CLOUD, "cloud", "--help").returncode == 0
    password = tmp_path / "pw"
    password.write_text(mosquitto.password(mosquitto.cloud_username))
    watcher = mosquitto.connected(mosquitto.cloud_username)
    watcher.subscribe(topics.cloud_state())
    proc = subprocess.Popen(
        [str(venv(CLOUD) / "edgefl"), "cloud", "--broker",
         f"{mosquitto.host}:{mosquitto.service_port}", "--password-file", str(password),
         "--data-dir", str(tmp_path / "cloud"), "--topic-root", topics.root,
         "--instance", "cloud-only"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        watcher.wait_for(lambda m: bool(m.payload)
                         and json.loads(m.payload)["instance"] == "cloud-only"
                         and json.loads(m.payload)["state"] == "online", timeout=60)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        watcher.close()
    assert proc.returncode == 0, out
