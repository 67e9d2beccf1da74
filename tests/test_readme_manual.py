"""The README's "Run it by hand" section, run as written: its files and its commands.

Only the ports change (free ones, through the documented environment variables),
so that the test never collides with a broker of the machine. Commands that end
with ``&`` run in the background, as in a shell; the others must exit 0.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
from pathlib import Path

import pytest

from broker.launcher import free_port, port_accepts
from schemas.topics import Topics
from tests.agent_fixtures import wait_until
from tests.mqtt_client import SyncClient

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".venv" / "bin"


def section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, re.MULTILINE | re.DOTALL)
    assert match, f"README has no section {title!r}"
    return match.group(1)


def test_the_manual_path_of_the_readme_runs_as_written(tmp_path: Path) -> None:
    text = section("Run it by hand")
    files = {}
    for block in re.findall(r"```yaml\n(.*?)```", text, re.DOTALL):
        opening = re.match(r"# (\S+):", block)
        assert opening, f"a settings block must open with '# FILE: ...': {block[:60]}"
        files[opening.group(1)] = block
    assert set(files) == {"cloud.yaml", "edge.yaml"}
    (commands,) = re.findall(r"```console\n(.*?)```", text, re.DOTALL)
    (model_ops,) = re.findall(r"```console\n(.*?)```", section("Model operations"), re.DOTALL)
    private = section("Differential privacy")
    (privacy_ops,) = re.findall(r"```console\n(.*?)```", private, re.DOTALL)
    task_files = re.findall(r"```yaml\n(# (\S+):.*?)```", private, re.DOTALL)
    assert [name for _text, name in task_files] == ["digits-dp.yaml", "digits-secure.yaml"]
    for task_file, task_file_name in task_files:
        files[task_file_name] = task_file
    learning = section("Federated learning")
    (async_file,) = re.findall(r"```yaml\n(# digits-async\.yaml:.*?)```", learning, re.DOTALL)
    files["digits-async.yaml"] = async_file
    (async_ops,) = [b for b in re.findall(r"```console\n(.*?)```", learning, re.DOTALL)
                    if "digits-async" in b]
    stated = re.search(r"`digits-secure` finishes its 3 rounds with epsilon ([0-9.]+) spent",
                       " ".join(private.split()))
    assert stated, "the README states the epsilon the secure task reaches"
    for file_name, body in files.items():
        (tmp_path / file_name).write_text(body)
    ports = {"device": free_port(), "service": free_port(), "observer": free_port()}
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
           "EDGEFL_BROKER_PORT": str(ports["device"]),
           "EDGEFL_BROKER_SERVICE_PORT": str(ports["service"]),
           "EDGEFL_BROKER_OBSERVER_PORT": str(ports["observer"]),
           "EDGEFL_CLOUD_MQTT__PORT": str(ports["service"]),
           "EDGEFL_EDGE_MQTT__PORT": str(ports["device"])}
    background: list[subprocess.Popen[str]] = []
    outputs: dict[str, str] = {}
    runs: dict[str, list[str]] = {}  # every run of a command, in order
    try:
        for line in [*commands.strip().splitlines(), *model_ops.strip().splitlines(),
                     *privacy_ops.strip().splitlines(), *async_ops.strip().splitlines()]:
            command = line.split("  #")[0].strip()
            words = shlex.split(command.removesuffix("&"))
            assert words[0] == "edgefl"
            if command.endswith("&"):
                log = (tmp_path / f"bg-{len(background)}.log").open("w")
                background.append(subprocess.Popen(words, cwd=tmp_path, env=env, stdout=log,
                                                   stderr=subprocess.STDOUT, text=True))
                ready(words, tmp_path, ports)
                continue
            result = subprocess.run(words, cwd=tmp_path, env=env, capture_output=True,
                                    text=True, timeout=300, check=False)
            assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
            key = " ".join(words[:3]) if words[1] == "model" else " ".join(words[:2])
            outputs[key] = result.stdout
            runs.setdefault(key, []).append(result.stdout)
        summary = " ".join(runs["edgefl fl"][0].split())
        assert "task digits: finished" in summary
        final = re.findall(r"round 3: \d+ update\(s\), accuracy ([0-9.]+)", summary)
        assert final and float(final[0]) >= 0.5, summary  # the hyperparameters shown do train
        assert "sim-000" in outputs["edgefl devices"]
        assert "telemetry messages" in outputs["edgefl report"]
        assert "messages by topic kind" in outputs["edgefl cloud"]
        # Model operations: the FL result optimized, measured, rolled out, rolled back.
        assert "0.3.0-onnx-int8-dynamic" in outputs["edgefl model optimize"]
        assert "A/B experiment" in outputs["edgefl model release"]
        compared = outputs["edgefl model compare"]
        assert "Mann-Whitney U" in compared, compared
        served = re.search(r"windows / inferences\D*?\d+ / (\d+)\D*?\d+ / (\d+)", compared)
        assert served and int(served[1]) > 0 and int(served[2]) > 0, compared
        assert "promoted" in outputs["edgefl model promote"]
        here, on_devices = runs["edgefl model benchmark"]
        assert "p99" in here and "peak RSS" in here, here
        assert "sim-001" in on_devices and "onnxruntime" in on_devices, on_devices
        assert "variants 0.3.0-" in runs["edgefl model release"][0]
        released = runs["edgefl model release"][1]
        assert "completed, stage 2 of 2 (20 device(s))" in released, released
        assert "rolled back to 0.3.0-onnx on" in outputs["edgefl model rollback"]
        assert "retired" in outputs["edgefl model retire"]
        assert (tmp_path / "digits.aar").stat().st_size > 0
        status = outputs["edgefl model status"]
        assert "0.3.0-torchscript completed" in " ".join(status.split()), status
        # The private task: finished within its budget, the epsilon it spent shown.
        private_run = " ".join(runs["edgefl fl"][1].split())
        assert "task digits-dp: finished" in private_run, private_run
        spent = re.findall(r"privacy: epsilon ([0-9.]+) spent", private_run)
        assert spent and 0 < float(spent[0]) <= 8, private_run
        assert "privacy: epsilon" in runs["edgefl fl"][2]
        # Secure aggregation with distributed DP: finished, the epsilon the README states.
        secure_run = " ".join(runs["edgefl fl"][3].split())
        assert "task digits-secure: finished" in secure_run, secure_run
        assert f"privacy: epsilon {stated[1]} spent" in secure_run, secure_run
        # FedBuff: thirty versions of three updates each, and it trains.
        async_run = " ".join(runs["edgefl fl"][4].split())
        assert "task digits-async: finished" in async_run, async_run
        last = re.findall(r"version 30: 3 update\(s\), staleness [0-9.]+, accuracy ([0-9.]+)",
                          async_run)
        assert last and float(last[0]) >= 0.5, async_run
    finally:
        for proc in reversed(background):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    for proc in background:
        assert proc.returncode == 0, f"{proc.args!r} exited {proc.returncode}"


def ready(words: list[str], folder: Path, ports: dict[str, int]) -> None:
    """Wait (bounded) until a background command serves."""
    if words[1] == "broker":
        wait_until(lambda: port_accepts("127.0.0.1", ports["service"]), timeout=30,
                   what="the broker listening")
    elif words[1] == "cloud":
        password = (folder / "var" / "broker" / "secrets" / "edgefl-cloud.password")
        watcher = SyncClient("127.0.0.1", ports["service"], client_id="readme-watch",
                             username="edgefl-cloud", password=password.read_text().strip())
        assert not watcher.connect().is_failure
        watcher.subscribe(Topics().cloud_state())
        watcher.wait_for(lambda m: bool(m.payload)
                         and json.loads(m.payload)["state"] == "online", timeout=60)
        watcher.close()
