"""Staged rollouts run by the cloud service: real Mosquitto, real agents, real ONNX models.

The cloud signs with the test key the agents trust; models are registered in the
service's registry and handed over as ``edgefl model release`` does (a request
row), so these tests drive the same path as the command line.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sklearn.datasets import load_digits
from typer.testing import CliRunner

from cloud.models.experiments import ab_assign, ab_bucket
from cloud.models.fleet_benchmark import Options as BenchOptions
from cloud.models.fleet_benchmark import fleet_benchmark
from cloud.models.formats import ArtifactFormat
from cloud.models.registry import VersionState
from cloud.models.rollout import RolloutSpec, device_state, plan_rollout, stable_order
from cloud.models.rollout_store import Action, ModelRequest, RolloutStore
from cloud.registry import DeviceRecord
from cloud.releases import save_signing_key
from edge_node.agent import EdgeAgent
from edge_node.system_metrics import sample
from edgefl.cli import build_app
from schemas.base import ModelFormat, decode_message, now
from schemas.device import DeploymentState, DeploymentStatus
from schemas.release import ReleaseManifest, Requirements
from schemas.topics import Topics
from tests.agent_fixtures import AgentFactory, wait_until
from tests.cloud_fixtures import CloudFactory, RunningCloud
from tests.conftest import RunningBroker
from tests.releases import KEY_ID, SIGNING_KEY, export_onnx, export_torchscript, mlp

MODEL = "digits"
pytestmark = pytest.mark.filterwarnings(
    "ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning")


class _Broken(torch.nn.Module):
    """Loads everywhere, but its output on the smoke test's zeros is -inf."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x[:, :10] * 0.0)


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("models")
    return {"1.0.0": export_onnx(mlp(1), folder / "a.onnx"),
            "1.1.0": export_onnx(mlp(2), folder / "b.onnx"),
            "broken": export_onnx(_Broken().eval(), folder / "broken.onnx")}


def _cloud(make_cloud: CloudFactory, tmp_path: Path) -> RunningCloud:
    data = tmp_path / "cloud"
    save_signing_key(SIGNING_KEY, data / "keys" / "release.pem")
    return make_cloud(data_dir=data, models={"key_id": KEY_ID, "chunk_bytes": 4096})


def _register(cloud: RunningCloud, files: dict[str, bytes], *versions: tuple[str, str]) -> None:
    for version, source in versions:
        cloud.service.models.register(MODEL, version, files[source], ArtifactFormat.ONNX,
                                      input_shape=[-1, 64])


def _release(cloud: RunningCloud, **spec: Any) -> str:
    """Hand a rollout to the service as the command line does; its answer.

    Alerts abort only where a test asks for it: the agents sample this (shared, busy)
    host, whose CPU may well raise a real `cpu_high` during a run.
    """
    requests = RolloutStore(cloud.service.store)
    body = RolloutSpec.model_validate({"model": MODEL, "abort_alert_severity": None, **spec},
                                      strict=False)
    request_id = requests.request("release", body.model_dump(mode="json"))
    wait_until(lambda: requests.get_request(request_id).state != "pending",  # type: ignore[union-attr]
               timeout=15, what="the request answered")
    request = requests.get_request(request_id)
    assert request is not None
    assert request.state == "done", request.detail
    return request.detail or ""


def _rollout(cloud: RunningCloud) -> dict[str, Any]:
    status = cloud.service.rollouts.status(MODEL)
    assert status is not None
    return status


def _wait_rollout(cloud: RunningCloud, state: str, timeout: float = 60) -> dict[str, Any]:
    wait_until(lambda: _rollout(cloud)["state"] == state, timeout=timeout,
               what=f"rollout {state}")
    return _rollout(cloud)


def _active(agent: EdgeAgent) -> str | None:
    installed = agent.ota.store.active(MODEL)
    return installed.version if installed else None


def _fleet(make_agent: AgentFactory, cloud: RunningCloud, count: int,
           **kwargs: Any) -> list[EdgeAgent]:
    agents = [make_agent(**kwargs) for _ in range(count)]
    wait_until(lambda: all(cloud.service.registry.get(a.device_id) is not None
                           and cloud.service.registry.get(a.device_id).online  # type: ignore[union-attr]
                           for a in agents), timeout=20, what="devices known")
    return agents


def _baseline(cloud: RunningCloud, agents: list[EdgeAgent]) -> None:
    """1.0.0 rolled out to every device (the version a failed rollout returns to)."""
    _release(cloud, version="1.0.0", canary_devices=[agents[0].device_id], probation_s=0.2)
    _wait_rollout(cloud, "completed")
    wait_until(lambda: all(_active(a) == "1.0.0" for a in agents), timeout=30,
               what="baseline installed")


def _retained(broker: RunningBroker, topics: Topics, topic_filter: str,
              wait: float = 1.0) -> dict[str, bytes]:
    """What a late subscriber receives (retained messages only)."""
    client = broker.connected(broker.cloud_username)
    try:
        client.subscribe(topic_filter)
        threading.Event().wait(wait)
        return {m.topic: m.payload for m in client.messages if m.payload}
    finally:
        client.close()


# -- planning (no broker) ------------------------------------------------------------------


def _record(device_id: str, **values: Any) -> DeviceRecord:
    defaults: dict[str, Any] = {"online": True, "model_formats": ["onnx", "tflite"],
                                "runtimes": {"onnxruntime": "1.20"},
                                "memory_available_mb": 1024.0}
    return DeviceRecord(device_id=device_id, **(defaults | values))


def test_the_plan_skips_unfit_devices_and_grows_stage_by_stage() -> None:
    devices = [_record(f"d{i:02d}") for i in range(20)]
    devices += [_record("no-onnx", model_formats=["tflite"]),
                _record("small", memory_available_mb=100.0),
                _record("no-runtime", runtimes={"litert": "2.0"})]
    spec = RolloutSpec(model=MODEL, version="1.0.0", canary_percent=10.0,
                       steps=[50.0, 100.0])
    plan = plan_rollout(spec, ModelFormat.ONNX, need_mb=90.0, requirements=Requirements(),
                        devices=devices)
    assert set(plan.skipped) == {"no-onnx", "small", "no-runtime"}
    assert "more than 80% of the 100 MiB available" in plan.skipped["small"]
    assert len(plan.canary) == 2 and plan.order[:2] == plan.canary
    assert plan.stage_sizes == [2, 10, 20]
    again = plan_rollout(spec, ModelFormat.ONNX, 90.0, Requirements(), list(reversed(devices)))
    assert again == plan, "the order is a function of the version and the ids, not of input order"
    # Offline devices are not picked as canaries when online ones exist.
    mixed = [_record(f"d{i}", online=i >= 15) for i in range(20)]
    canary = plan_rollout(spec, ModelFormat.ONNX, 1.0, Requirements(), mixed).canary
    assert all(int(d[1:]) >= 15 for d in canary)
    assert stable_order("x", ["a", "b", "c"]) == stable_order("x", ["c", "b", "a"])


def test_a_spec_that_makes_no_sense_is_refused() -> None:
    for bad in ({"steps": [50.0, 20.0, 100.0]}, {"steps": [50.0]},
                {"canary_percent": 10.0, "canary_devices": ["a"]},
                {"probation_s": -1.0}, {"abort_failed_percent": 120.0}, {"unknown": 1}):
        with pytest.raises(ValueError, match=r"."):
            RolloutSpec.model_validate({"model": MODEL, "version": "1.0.0", **bad})


def test_device_states_follow_the_deployment_statuses() -> None:
    def status(state: DeploymentState, **values: Any) -> DeploymentStatus:
        return DeploymentStatus(device_id="d1", model=MODEL, ts=now(), state=state, **values)

    assert device_state(status(DeploymentState.DOWNLOADING, target_version="2.0.0"), "2.0.0",
                        "pending") == ("downloading", None)
    assert device_state(status(DeploymentState.INSTALLED, active_version="2.0.0"), "2.0.0",
                        "downloading") == ("installed", None)
    assert device_state(status(DeploymentState.FAILED, target_version="2.0.0",
                               error="smoke_test_failed: output is not finite"), "2.0.0",
                        "downloading") == ("failed", "smoke_test_failed: output is not finite")
    assert device_state(status(DeploymentState.ROLLED_BACK, active_version="1.0.0",
                               error="error rate"), "2.0.0", "installed") == \
        ("rolled_back", "error rate")
    # An old version's status says nothing about this rollout.
    assert device_state(status(DeploymentState.INSTALLED, active_version="1.0.0"), "2.0.0",
                        "pending") is None


# -- rollouts against real devices --------------------------------------------------------


def test_a_canary_rollout_widens_step_by_step_to_the_whole_fleet(
    make_cloud: CloudFactory, make_agent: AgentFactory, onnx_files: dict[str, bytes],
    mosquitto: RunningBroker, topics: Topics, tmp_path: Path,
) -> None:
    cloud = _cloud(make_cloud, tmp_path)
    _register(cloud, onnx_files, ("1.0.0", "1.0.0"))
    agents = _fleet(make_agent, cloud, 6)
    canary = [agents[0].device_id, agents[1].device_id]
    detail = _release(cloud, version="1.0.0", canary_devices=canary, steps=[50.0, 100.0],
                      probation_s=1.0)
    assert detail.startswith("rollout ") and "stages 2/3/6 of 6" in detail, detail
    # Only the canaries install first.
    wait_until(lambda: all(_active(a) == "1.0.0" for a in agents[:2]), timeout=30,
               what="canaries installed")
    assert _rollout(cloud)["stage"] == 0
    assert all(_active(a) is None for a in agents[2:])
    done = _wait_rollout(cloud, "completed")
    wait_until(lambda: all(_active(a) == "1.0.0" for a in agents), timeout=30,
               what="every device installed")
    assert done["stage"] == 2
    assert {d["state"] for d in done["devices"].values()} <= {"active", "installed"}
    assert sum(d["state"] == "active" for d in done["devices"].values()) >= 2
    assert cloud.service.models.get(MODEL, "1.0.0").state is VersionState.ACTIVE
    events = [e.event for e in cloud.service.models.events(MODEL, "1.0.0")]
    assert events == ["registered", "canary", "active"]
    # Every step went to the sinks (here SQLite; InfluxDB for Grafana the same way). The
    # state is saved before the step's event is written: wait for the last one.
    query = ("SELECT event, stage, targets, installed FROM rollout_events WHERE rollout=? "
             "ORDER BY ts", (done["rollout"],))
    wait_until(lambda: any(r["event"] == "completed" for r in cloud.rows(*query)),
               timeout=15, what="the completed event stored")
    steps = cloud.rows(*query)
    assert [(r["event"], r["stage"], r["targets"]) for r in steps] == [
        ("started", 0, 2), ("stage", 0, 2), ("stage", 1, 3), ("stage", 2, 6),
        ("completed", 2, 6)]
    assert steps[-1]["installed"] == 6
    # What stays on the broker: the manifest of 1.0.0 for everyone, and its chunks.
    retained = _retained(mosquitto, topics, topics.release(MODEL))
    manifest = ReleaseManifest.model_validate_json(retained[topics.release(MODEL)])
    assert manifest.version == "1.0.0" and manifest.targeting.devices is None
    assert manifest.metadata["rollout"] == done["rollout"]


def test_a_canary_that_fails_its_smoke_test_aborts_and_leaves_the_fleet_as_it_was(
    make_cloud: CloudFactory, make_agent: AgentFactory, onnx_files: dict[str, bytes],
    mosquitto: RunningBroker, topics: Topics, tmp_path: Path,
) -> None:
    cloud = _cloud(make_cloud, tmp_path)
    _register(cloud, onnx_files, ("1.0.0", "1.0.0"), ("1.1.0", "broken"))
    agents = _fleet(make_agent, cloud, 4)
    _baseline(cloud, agents)
    _release(cloud, version="1.1.0", canary_devices=[a.device_id for a in agents[:2]],
             probation_s=60.0, abort_failed_percent=20.0)
    aborted = _wait_rollout(cloud, "aborted", timeout=30)
    assert "failed (more than 20%)" in aborted["reason"], aborted["reason"]
    failed = [d for d, row in aborted["devices"].items() if row["state"] == "failed"]
    assert failed and "smoke_test_failed" in aborted["devices"][failed[0]]["detail"]
    assert all(_active(a) == "1.0.0" for a in agents)
    models = cloud.service.models
    assert models.get(MODEL, "1.1.0").state is VersionState.ROLLED_BACK
    assert models.get(MODEL, "1.0.0").state is VersionState.ACTIVE
    # The broker holds 1.0.0 again, and nothing of 1.1.0.
    retained = _retained(mosquitto, topics, topics.root + "/models/#")
    manifest = ReleaseManifest.model_validate_json(retained[topics.release(MODEL)])
    assert manifest.version == "1.0.0"
    assert not [t for t in retained if "/versions/1.1.0/" in t]


def test_an_alert_on_a_canary_during_probation_rolls_it_back_within_seconds(
    make_cloud: CloudFactory, make_agent: AgentFactory, onnx_files: dict[str, bytes],
    tmp_path: Path,
) -> None:
    cloud = _cloud(make_cloud, tmp_path)
    _register(cloud, onnx_files, ("1.0.0", "1.0.0"), ("1.1.0", "1.1.0"))
    hot = threading.Event()

    def sampler_for(state_dir: Path) -> Any:
        def read() -> Any:
            reading = sample(state_dir)
            return dataclasses.replace(reading, cpu_percent=99.0) if hot.is_set() else reading
        return read

    canary = make_agent(sampler=sampler_for(tmp_path / "hot"), state_dir=tmp_path / "hot")
    agents = [canary, *_fleet(make_agent, cloud, 2)]
    wait_until(lambda: cloud.service.registry.get(canary.device_id) is not None,
               timeout=20, what="canary known")
    _baseline(cloud, agents)
    _release(cloud, version="1.1.0", canary_devices=[canary.device_id], probation_s=120.0,
             abort_alert_severity="major")
    wait_until(lambda: _active(canary) == "1.1.0", timeout=30, what="canary installed")
    hot.set()  # the canary now reports 99 % CPU: cpu_high (major) opens after 2 samples
    wait_until(lambda: bool(cloud.rows(
        "SELECT 1 FROM alerts WHERE device_id=? AND rule='cpu_high'", (canary.device_id,))),
        timeout=20, what="the alert opened")
    opened = cloud.rows("SELECT MIN(opened_at) AS ts FROM alerts WHERE device_id=? AND "
                        "rule='cpu_high'", (canary.device_id,))[0]["ts"]
    aborted = _wait_rollout(cloud, "aborted", timeout=20)
    assert f"alert cpu_high (major) on {canary.device_id}" in aborted["reason"]
    latency = aborted["finished_at"] - opened
    print(f"abort latency: {latency:.3f} s from the alert opening to the rollback published")
    assert latency <= 2.0, latency
    wait_until(lambda: _active(canary) == "1.0.0", timeout=20, what="canary rolled back")
    assert all(_active(a) == "1.0.0" for a in agents)
    assert canary.device_id in aborted["rollback_sent"]


def test_retired_versions_leave_nothing_on_the_broker(
    make_cloud: CloudFactory, make_agent: AgentFactory, onnx_files: dict[str, bytes],
    mosquitto: RunningBroker, topics: Topics, tmp_path: Path,
) -> None:
    cloud = _cloud(make_cloud, tmp_path)
    _register(cloud, onnx_files, ("1.0.0", "1.0.0"), ("1.1.0", "1.1.0"))
    agents = _fleet(make_agent, cloud, 2)
    _baseline(cloud, agents)
    _release(cloud, version="1.1.0", canary_devices=[agents[0].device_id], probation_s=0.2)
    _wait_rollout(cloud, "completed")
    # Finishing the rollout cleared the chunks of the version it replaced.
    retained = _retained(mosquitto, topics, topics.root + "/models/#")
    assert not [t for t in retained if "/versions/1.0.0/" in t]
    assert [t for t in retained if "/versions/1.1.0/" in t]
    requests = RolloutStore(cloud.service.store)
    request_id = requests.request("retire", {"model": MODEL, "version": "1.1.0"})
    wait_until(lambda: requests.get_request(request_id).state != "pending",  # type: ignore[union-attr]
               timeout=15, what="retired")
    assert requests.get_request(request_id).state == "done"  # type: ignore[union-attr]
    assert _retained(mosquitto, topics, topics.root + "/models/#") == {}
    assert cloud.service.models.get(MODEL, "1.1.0").state is VersionState.RETIRED
    # The devices keep what they run.
    assert all(_active(a) == "1.1.0" for a in agents)


def test_release_refusals_come_back_in_one_line(
    make_cloud: CloudFactory, make_agent: AgentFactory, onnx_files: dict[str, bytes],
    tmp_path: Path,
) -> None:
    cloud = _cloud(make_cloud, tmp_path)
    _register(cloud, onnx_files, ("1.0.0", "1.0.0"))
    models = cloud.service.models
    models.register(MODEL, "0.9.0", b"weights" * 10, ArtifactFormat.WEIGHTS)
    models.register(MODEL, "1.0.1", onnx_files["1.1.0"], ArtifactFormat.ONNX,
                    state=VersionState.REJECTED, note="lost 3.2 points")
    _fleet(make_agent, cloud, 1)
    folder = ["--data-dir", str(cloud.settings.data_dir)]

    def model(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(build_app("model"), ["model", *args, *folder],
                                    env={"COLUMNS": "200"})
        return result.exit_code, result.output

    code, out = model("release", MODEL, "0.9.0")
    assert code == 2 and "optimize it into a deployable format first" in out, out
    code, out = model("release", MODEL, "1.0.1")
    assert code == 2 and "rejected: pass --force" in out, out
    code, out = model("release", MODEL, "7.0.0")
    assert code == 2 and "has no version '7.0.0'" in out, out
    code, out = model("release", MODEL, "1.0.0", "--steps", "100,50")
    assert code == 2 and "steps must increase" in out, out
    code, out = model("release", MODEL, "1.0.0", "--canary-devices", "nobody")
    assert code == 1 and "canary device nobody is not known" in out, out
    code, out = model("release", MODEL, "1.0.0", "--probation", "1s")
    assert code == 0 and out.startswith("rollout "), out
    code, out = model("release", MODEL, "1.0.0")
    assert code == 1 and "is running" in out, out
    code, out = model("status", MODEL, "--json")
    assert code == 0, out
    assert json.loads(out)["version"] == "1.0.0"
    code, out = model("status", MODEL)
    assert code == 0 and "rollout" in out and "devices" in out, out


# -- A/B experiments -----------------------------------------------------------------------


def _even_split(agents: list[EdgeAgent]) -> float:
    """A split that puts exactly half of the devices on B (whatever ids the pool gave)."""
    buckets = sorted(ab_bucket(MODEL, "1.0.0", "1.1.0", a.device_id) for a in agents)
    half = len(buckets) // 2
    return (buckets[half - 1] + buckets[half]) / 2


def _serve(agents: list[EdgeAgent], count: int) -> dict[str, np.ndarray]:
    """Each device answers ``count`` requests with labelled feedback, then reports."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    outputs = {}
    for agent in agents:
        for i in range(count):
            logits = agent.infer(MODEL, x[i:i + 1])
            agent.inference.record_feedback(MODEL, int(logits.argmax() == y[i]), 1)
        outputs[agent.device_id] = agent.infer(MODEL, x[:1])
        agent.request_report()
    return outputs


def _metrics_stored(cloud: RunningCloud, agents: list[EdgeAgent], count: int) -> bool:
    rows = cloud.service.store.query(
        "SELECT device_id, SUM(interval_count) AS n FROM model_metrics WHERE model=? "
        "GROUP BY device_id", (MODEL,))
    done = {r["device_id"] for r in rows if (r["n"] or 0) >= count}
    return all(a.device_id in done for a in agents)


def _ab_experiment(make_cloud: CloudFactory, make_agent: AgentFactory,
                   onnx_files: dict[str, bytes], tmp_path: Path,
                   ) -> tuple[RunningCloud, list[EdgeAgent], list[str], list[str]]:
    """Six devices on 1.0.0, then an A/B experiment with 1.1.0 on half of them."""
    cloud = _cloud(make_cloud, tmp_path)
    _register(cloud, onnx_files, ("1.0.0", "1.0.0"), ("1.1.0", "1.1.0"))
    agents = _fleet(make_agent, cloud, 6)
    _baseline(cloud, agents)
    split = _even_split(agents)
    detail = _release(cloud, version="1.0.0", ab_version="1.1.0", split_percent=split,
                      probation_s=0.2)
    assert "A/B experiment" in detail, detail
    _wait_rollout(cloud, "experiment")
    ids = [a.device_id for a in agents]
    group_a, group_b = ab_assign(MODEL, "1.0.0", "1.1.0", ids, split)
    # Deterministic: the same split whatever the order, and what the service did.
    assert (group_a, group_b) == ab_assign(MODEL, "1.0.0", "1.1.0", ids[::-1], split)
    assert len(group_a) == len(group_b) == 3
    assert sorted(_rollout(cloud)["canary"]) == group_b
    wait_until(lambda: all(_active(a) == ("1.1.0" if a.device_id in group_b else "1.0.0")
                           for a in agents), timeout=30, what="both versions installed")
    return cloud, agents, group_a, group_b


def test_an_ab_experiment_serves_both_versions_and_promoting_b_widens_it(
    make_cloud: CloudFactory, make_agent: AgentFactory, onnx_files: dict[str, bytes],
    tmp_path: Path,
) -> None:
    cloud, agents, group_a, group_b = _ab_experiment(make_cloud, make_agent, onnx_files,
                                                    tmp_path)
    outputs = _serve(agents, 40)
    # Both versions serve: B's answers differ from A's, and agree within a group.
    a_out = [outputs[d] for d in group_a]
    b_out = [outputs[d] for d in group_b]
    assert all(np.allclose(o, a_out[0], atol=1e-5) for o in a_out)
    assert all(np.allclose(o, b_out[0], atol=1e-5) for o in b_out)
    assert not np.allclose(a_out[0], b_out[0], atol=1e-3)
    wait_until(lambda: _metrics_stored(cloud, agents, 40), timeout=20,
               what="model metrics of every device stored")
    folder = ["--data-dir", str(cloud.settings.data_dir)]
    result = CliRunner().invoke(build_app("model"), ["model", "compare", MODEL, "--json",
                                                     *folder])
    assert result.exit_code == 0, result.output
    compared = json.loads(result.output)
    assert compared["a"]["version"] == "1.0.0" and compared["b"]["version"] == "1.1.0"
    assert compared["a"]["devices"] == compared["b"]["devices"] == 3
    assert compared["a"]["inferences"] >= 3 * 40 and compared["b"]["inferences"] >= 3 * 40
    assert compared["a"]["accuracy"] is not None and compared["b"]["accuracy"] is not None
    assert compared["latency_p_value"] is not None
    assert compared["error_rate_p_value"] == 1.0  # no errors on either side
    result = CliRunner().invoke(build_app("model"), ["model", "compare", MODEL, *folder],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "Mann-Whitney U" in result.output, result.output
    # --min-windows waits for enough figures; bounded by --wait, then exit 1 and say so.
    result = CliRunner().invoke(build_app("model"), [
        "model", "compare", MODEL, "--min-windows", "1", "--wait", "5s", *folder])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(build_app("model"), [
        "model", "compare", MODEL, "--min-windows", "100000", "--wait", "1s", *folder])
    assert result.exit_code == 1 and "fewer than 100000 metrics windows" in result.output, \
        result.output

    requests = RolloutStore(cloud.service.store)
    request_id = requests.request("promote", {"model": MODEL})
    wait_until(lambda: requests.get_request(request_id).state != "pending",  # type: ignore[union-attr]
               timeout=15, what="promoted")
    answer = requests.get_request(request_id)
    assert answer is not None and answer.state == "done", answer
    _wait_rollout(cloud, "completed")
    wait_until(lambda: all(_active(a) == "1.1.0" for a in agents), timeout=30,
               what="B on every device")
    models = cloud.service.models
    assert models.get(MODEL, "1.1.0").state is VersionState.ACTIVE
    assert models.get(MODEL, "1.0.0").state is VersionState.RELEASED
    fleet = {(m.name, m.source) for m in models.metrics(MODEL, "1.0.0")}
    assert ("fleet_inferences", "fleet") in fleet and ("latency_ms_p50", "fleet") in fleet


def test_keeping_a_ends_the_experiment_with_b_rolled_back(
    make_cloud: CloudFactory, make_agent: AgentFactory, onnx_files: dict[str, bytes],
    tmp_path: Path,
) -> None:
    cloud, agents, _, _ = _ab_experiment(make_cloud, make_agent, onnx_files,
                                         tmp_path)
    requests = RolloutStore(cloud.service.store)
    refused = requests.request("promote", {"model": MODEL, "version": "9.9.9"})
    wait_until(lambda: requests.get_request(refused).state != "pending",  # type: ignore[union-attr]
               timeout=15, what="answered")
    assert requests.get_request(refused).state == "refused"  # type: ignore[union-attr]
    request_id = requests.request("promote", {"model": MODEL, "version": "1.0.0"})
    wait_until(lambda: requests.get_request(request_id).state != "pending",  # type: ignore[union-attr]
               timeout=15, what="kept A")
    assert requests.get_request(request_id).state == "done"  # type: ignore[union-attr]
    status = _wait_rollout(cloud, "aborted")
    assert "1.0.0 kept" in status["reason"]
    wait_until(lambda: all(_active(a) == "1.0.0" for a in agents), timeout=30,
               what="A on every device")
    models = cloud.service.models
    assert models.get(MODEL, "1.0.0").state is VersionState.ACTIVE
    assert models.get(MODEL, "1.1.0").state is VersionState.ROLLED_BACK
    assert cloud.service.health.snapshot().get("errors", {}).get("rollout_aborted") is None


def test_an_ab_experiment_survives_a_restart_of_the_service(
    make_cloud: CloudFactory, make_agent: AgentFactory, onnx_files: dict[str, bytes],
    tmp_path: Path,
) -> None:
    cloud, agents, _, _ = _ab_experiment(make_cloud, make_agent, onnx_files, tmp_path)
    cloud.stop()
    again = make_cloud(instance=cloud.settings.instance, data_dir=cloud.settings.data_dir,
                       models={"key_id": KEY_ID, "chunk_bytes": 4096})
    wait_until(again.service.rollouts.ready.is_set, timeout=15, what="resumed")
    assert [r.state for r in again.service.rollouts.active.values()] == ["experiment"]
    requests = RolloutStore(again.service.store)
    request_id = requests.request("promote", {"model": MODEL})
    wait_until(lambda: requests.get_request(request_id).state != "pending",  # type: ignore[union-attr]
               timeout=15, what="promoted")
    assert requests.get_request(request_id).state == "done"  # type: ignore[union-attr]
    _wait_rollout(again, "completed")
    wait_until(lambda: all(_active(a) == "1.1.0" for a in agents), timeout=30,
               what="B on every device")


def test_an_ab_release_needs_the_fleet_on_a(
    make_cloud: CloudFactory, make_agent: AgentFactory, onnx_files: dict[str, bytes],
    tmp_path: Path,
) -> None:
    cloud = _cloud(make_cloud, tmp_path)
    _register(cloud, onnx_files, ("1.0.0", "1.0.0"), ("1.1.0", "1.1.0"))
    _fleet(make_agent, cloud, 2)
    requests = RolloutStore(cloud.service.store)
    body = RolloutSpec.model_validate({"model": MODEL, "version": "1.0.0",
                                       "ab_version": "1.1.0"}, strict=False)
    request_id = requests.request("release", body.model_dump(mode="json"))
    wait_until(lambda: requests.get_request(request_id).state != "pending",  # type: ignore[union-attr]
               timeout=15, what="answered")
    answer = requests.get_request(request_id)
    assert answer is not None and answer.state == "refused"
    assert "release 1.0.0 first" in (answer.detail or "")
    with pytest.raises(ValueError, match="no canary or steps"):
        RolloutSpec.model_validate({"model": MODEL, "version": "1.0.0", "ab_version": "1.1.0",
                                    "steps": [50, 100]}, strict=False)


# -- the benchmark on the devices ----------------------------------------------------------


def test_devices_benchmark_a_version_in_their_runtimes_without_installing_it(
    make_cloud: CloudFactory, make_agent: AgentFactory, onnx_files: dict[str, bytes],
    mosquitto: RunningBroker, topics: Topics, tmp_path: Path,
) -> None:
    cloud = _cloud(make_cloud, tmp_path)
    _register(cloud, onnx_files, ("1.0.0", "1.0.0"))
    agents = _fleet(make_agent, cloud, 2)
    ids = [a.device_id for a in agents]
    models = cloud.service.models
    version = models.get(MODEL, "1.0.0")
    answers = fleet_benchmark(cloud.settings, models, version, ids,
                              BenchOptions(runs=200, warmup=10, timeout_s=30),
                              keep_chunks=False)
    assert [a.device_id for a in answers] == ids
    for answer in answers:
        assert answer.error is None, answer.error
        assert answer.figures is not None
        assert answer.figures["runtime"] == "onnxruntime" and answer.figures["runs"] == 200
        assert answer.figures["version"] == "1.0.0"
        assert 0 < float(answer.figures["latency_ms_p50"]) <= float(  # type: ignore[arg-type]
            answer.figures["latency_ms_p99"])  # type: ignore[arg-type]
    recorded = [m for m in models.metrics(MODEL, "1.0.0") if m.source == "fleet-benchmark"]
    assert {m.name for m in recorded} >= {"latency_ms_p50", "latency_ms_p99", "peak_memory_mb"}
    assert all(m.device_class for m in recorded)
    # Timed, never installed; and nothing left on the broker.
    assert all(_active(a) is None for a in agents)
    assert _retained(mosquitto, topics, topics.root + "/models/#") == {}

    # A manifest the devices' keys do not verify gets no figures.
    save_signing_key(Ed25519PrivateKey.generate(), cloud.settings.release_key_path)
    refused = fleet_benchmark(cloud.settings, models, version, ids[:1],
                              BenchOptions(runs=10, timeout_s=30), keep_chunks=False)
    assert refused[0].figures is None and "signature" in (refused[0].error or ""), refused
    assert _retained(mosquitto, topics, topics.root + "/models/#") == {}


def test_a_device_offline_during_a_rollout_is_left_pending_and_installs_when_it_returns(
    make_cloud: CloudFactory, make_agent: AgentFactory, onnx_files: dict[str, bytes],
    tmp_path: Path,
) -> None:
    cloud = _cloud(make_cloud, tmp_path)
    _register(cloud, onnx_files, ("1.0.0", "1.0.0"))
    agents = _fleet(make_agent, cloud, 3)
    away = agents[2]
    away.stop()
    wait_until(lambda: not cloud.service.registry.get(away.device_id).online,  # type: ignore[union-attr]
               timeout=20, what="the device known offline")
    _release(cloud, version="1.0.0", canary_devices=[agents[0].device_id], probation_s=0.2)
    done = _wait_rollout(cloud, "completed")
    assert done["devices"][away.device_id]["state"] == "pending"
    assert all(_active(a) == "1.0.0" for a in agents[:2])
    # It comes back: the retained release reaches it, and it installs.
    back = make_agent(away.device_id, state_dir=tmp_path / away.device_id)
    wait_until(lambda: _active(back) == "1.0.0", timeout=30, what="the returning device installed")


def _ask(cloud: RunningCloud, action: Action, body: dict[str, Any]) -> ModelRequest:
    """A request to the service's rollout manager, answered (done or refused)."""
    requests = RolloutStore(cloud.service.store)
    request_id = requests.request(action, body)
    wait_until(lambda: requests.get_request(request_id).state != "pending",  # type: ignore[union-attr]
               timeout=15, what=f"{action} answered")
    answer = requests.get_request(request_id)
    assert answer is not None
    return answer


def test_a_release_with_variants_gives_each_device_the_build_it_runs_fastest(
    make_cloud: CloudFactory, make_agent: AgentFactory, onnx_files: dict[str, bytes],
    mosquitto: RunningBroker, topics: Topics, tmp_path: Path,
) -> None:
    cloud = _cloud(make_cloud, tmp_path)
    models = cloud.service.models
    scripted = export_torchscript(mlp(1), tmp_path / "a.pt")
    # What the optimizer leaves: a parent and its deployable children.
    models.register(MODEL, "1.0.0", onnx_files["1.0.0"], ArtifactFormat.ONNX, input_shape=[-1, 64])
    for version, data, fmt in (("1.0.0-onnx", onnx_files["1.0.0"], ArtifactFormat.ONNX),
                               ("1.0.0-torchscript", scripted, ArtifactFormat.TORCHSCRIPT)):
        models.register(MODEL, version, data, fmt, parent_version="1.0.0", input_shape=[-1, 64])
    agents = _fleet(make_agent, cloud, 3)
    device_class = agents[0].hardware.device_class()
    # The fleet benchmark measured TorchScript faster on this class of device.
    for version, p50 in (("1.0.0-torchscript", 0.01), ("1.0.0-onnx", 0.02)):
        models.add_metrics(MODEL, version, "fleet-benchmark", {"latency_ms_p50": p50},
                           device_class=device_class)
    # One device cannot load TorchScript: it takes the ONNX build of the same release.
    agents[2].ota.caps = dataclasses.replace(agents[2].ota.caps,
                                             formats=frozenset({ModelFormat.ONNX}))
    detail = _release(cloud, version="1.0.0-onnx", auto_variants=True,
                      canary_devices=[agents[0].device_id], probation_s=0.2)
    assert "variants 1.0.0-torchscript" in detail, detail
    _wait_rollout(cloud, "completed")
    builds = ["1.0.0-torchscript", "1.0.0-torchscript", "1.0.0-onnx"]
    wait_until(lambda: [_active(a) for a in agents] == builds, timeout=30,
               what="each device on its build")
    retained = _retained(mosquitto, topics, topics.root + "/models/#")
    manifest = decode_message(ReleaseManifest, retained[topics.release(MODEL)])
    assert [v.version for v in manifest.variants] == ["1.0.0-torchscript"]
    assert manifest.prefer == {device_class: ["1.0.0-torchscript", "1.0.0-onnx"]}
    assert {topics.chunk(MODEL, v, 0) for v in ("1.0.0-onnx", "1.0.0-torchscript")} <= set(
        retained)
    devices = _rollout(cloud)["devices"]
    assert [devices[a.device_id]["detail"] for a in agents] == [f"build {b}" for b in builds]
    assert models.get(MODEL, "1.0.0-onnx").state is VersionState.ACTIVE
    assert models.get(MODEL, "1.0.0-torchscript").state is VersionState.ACTIVE
    refused = _ask(cloud, "retire", {"model": MODEL, "version": "1.0.0-torchscript"})
    assert refused.state == "refused" and "variant of the retained release" in (
        refused.detail or ""), refused

    # The next release clears every build of the one it replaces.
    _register(cloud, onnx_files, ("1.1.0", "1.1.0"))
    _release(cloud, version="1.1.0", canary_devices=[agents[0].device_id], probation_s=0.2)
    _wait_rollout(cloud, "completed")
    wait_until(lambda: all(_active(a) == "1.1.0" for a in agents), timeout=30,
               what="1.1.0 everywhere")
    retained = _retained(mosquitto, topics, topics.root + "/models/#")
    assert not [t for t in retained if "/1.0.0-" in t], sorted(retained)
    assert models.get(MODEL, "1.0.0-torchscript").state is VersionState.RELEASED

    # Rolled back: each device returns to its own build, and the release with its variant
    # is retained again for the devices that come later.
    answer = _ask(cloud, "rollback", {"model": MODEL, "reason": "test"})
    assert answer.state == "done", answer
    wait_until(lambda: [_active(a) for a in agents] == builds, timeout=30,
               what="each device back on its build")
    retained = _retained(mosquitto, topics, topics.root + "/models/#")
    manifest = decode_message(ReleaseManifest, retained[topics.release(MODEL)])
    assert (manifest.version, [v.version for v in manifest.variants]) == (
        "1.0.0-onnx", ["1.0.0-torchscript"])
    assert topics.chunk(MODEL, "1.0.0-torchscript", 0) in retained
    assert not [t for t in retained if "/1.1.0/" in t]
