"""Federated rounds over the real broker: cloud coordinator + edge FL clients."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from schemas.base import decode_message
from schemas.codec import decode
from schemas.compression import decompress
from schemas.fl import GlobalModelEnvelope, TaskState, TaskStatus, UpdateEnvelope
from schemas.topics import Topics
from tests.agent_fixtures import AgentFactory, wait_until
from tests.cloud_fixtures import CloudFactory
from tests.conftest import RunningBroker

pytestmark = pytest.mark.integration
TASK = "digits"


def fl_config(**overrides: Any) -> dict[str, Any]:
    return {"task": "fl_tasks.digits:DigitsTask", "rounds": 3, "min_fit_clients": 3,
            "min_available_clients": 3, "fraction_fit": 1.0, "round_timeout_s": 60,
            "hyperparams": {"local_epochs": 1, "batch_size": 16, "learning_rate": 0.05},
            "keep_update_rounds": 100} | overrides


def device_fl(index: int, count: int) -> dict[str, Any]:
    return {"tasks": {TASK: {"path": "fl_tasks.digits:DigitsTask", "partition": index,
                             "partitions": count, "scheme": "dirichlet", "alpha": 0.5}}}


def weights_at(folder: Path, version: str) -> dict[str, np.ndarray]:
    decoded = decode((folder / f"global-{version}.safetensors").read_bytes(), GlobalModelEnvelope)
    return {k: np.asarray(v, np.float64) for k, v in decoded.tensors.items()}


def test_three_devices_three_rounds_match_in_process_fedavg(
    make_cloud: CloudFactory, make_agent: AgentFactory, mosquitto: RunningBroker,
    topics: Topics, new_device_id: Callable[[], str],
) -> None:
    cloud = make_cloud(fl={TASK: fl_config()})
    watcher = mosquitto.connected(mosquitto.cloud_username)
    watcher.subscribe(topics.task_status(TASK))
    agents = [make_agent(fl=device_fl(i, 3)) for i in range(3)]
    coordinator = cloud.service.coordinators[TASK]
    wait_until(lambda: coordinator.state.state is TaskState.FINISHED, timeout=120,
               what="3 rounds finished")
    history = coordinator.history()
    assert [h.round for h in history] == [1, 2, 3]
    for h in history:
        assert sorted(h.participants) == sorted(a.device_id for a in agents)
        assert h.rejected == [] and h.rejected_counts == {}

    folder = cloud.settings.data_dir / "fl" / TASK
    # Replay: FedAvg in float64 over the very updates that crossed the broker.
    previous = weights_at(folder, "0")
    for round_ in (1, 2, 3):
        total = 0.0
        acc = {k: np.zeros_like(v) for k, v in previous.items()}
        for path in sorted((folder / f"round-{round_}").glob("*.safetensors")):
            decoded = decode(path.read_bytes(), UpdateEnvelope)
            delta = decompress(decoded.tensors, decoded.envelope.compression)
            n = decoded.envelope.num_examples
            total += n
            for k in acc:
                acc[k] += n * delta[k].astype(np.float64)
        expected = {k: previous[k] + acc[k] / total for k in previous}
        got = weights_at(folder, str(round_))
        for k, value in expected.items():
            np.testing.assert_allclose(got[k], value, rtol=1e-6, atol=1e-7)
        previous = got
    final = decode_message(TaskStatus, watcher.wait_for(
        lambda m: json.loads(m.payload).get("state") == "finished").payload)
    assert final.round == 3 and final.central_accuracy is not None
    # The final weights are a registered version, with their lineage and figures.
    models = cloud.service.models
    final_version = next(v for v in models.versions(TASK) if v.fl_round == 3)
    assert final_version.version == "0.3.0" and final_version.format.value == "weights"
    assert final_version.fl_task == TASK and final_version.recipe["strategy"] == "fedavg"
    assert models.read(final_version) == (folder / "global-3.safetensors").read_bytes()
    figures = {m.name: m.value for m in models.metrics(TASK, "0.3.0")}
    assert figures["central_accuracy"] == pytest.approx(final.central_accuracy)
    assert final.message is not None and f"registered {TASK} 0.3.0" in final.message
    watcher.close()


def test_fedbn_keeps_batch_norm_on_the_devices(
    make_cloud: CloudFactory, make_agent: AgentFactory, topics: Topics,
) -> None:
    cloud = make_cloud(fl={TASK: fl_config(rounds=2, min_fit_clients=2, min_available_clients=2,
                                           strategy="fedbn", task_kwargs={"model": "cnn"})})
    settings = [device_fl(i, 2) for i in range(2)]
    for s in settings:
        s["tasks"][TASK]["options"] = {"model": "cnn"}
    agents = [make_agent(fl=s) for s in settings]
    coordinator = cloud.service.coordinators[TASK]
    wait_until(lambda: coordinator.state.state is TaskState.FINISHED, timeout=120,
               what="fedbn rounds")
    folder = cloud.settings.data_dir / "fl" / TASK
    sent = decode((folder / "global-2.safetensors").read_bytes(), GlobalModelEnvelope).tensors
    assert sent and not any("bn" in name for name in sent)
    local = [a.fl.tasks[TASK].local_weights for a in agents]
    bn = [name for name in local[0] if "bn" in name and "running_mean" in name]
    assert bn
    assert not np.allclose(local[0][bn[0]], local[1][bn[0]]), "BN statistics were shared"


def test_selection_policies(make_cloud: CloudFactory) -> None:
    from cloud.registry import DeviceRecord

    cloud = make_cloud(fl={TASK: fl_config(fraction_fit=0.5, min_fit_clients=1,
                                           selection={"policy": "fair"})})
    coordinator = cloud.service.coordinators[TASK]
    devices = [DeviceRecord(f"d{i}", online=True, runtimes={"torchscript": "2"})
               for i in range(4)]
    first, _ = coordinator.select(devices)
    for d in first:
        coordinator.state.last_selected[d] = 1.0
    second, _ = coordinator.select(devices)
    assert len(first) == 2 and not set(first) & set(second), "fair picks the least recent"


def test_federated_evaluation_fairness_and_early_stop(
    make_cloud: CloudFactory, make_agent: AgentFactory,
) -> None:
    cloud = make_cloud(fl={TASK: fl_config(rounds=20, min_fit_clients=3,
                                           fraction_evaluate=1.0, min_evaluate_clients=3,
                                           target_accuracy=0.5)})
    for i in range(3):
        make_agent(fl=device_fl(i, 3))
    coordinator = cloud.service.coordinators[TASK]
    wait_until(lambda: coordinator.state.state is TaskState.FINISHED, timeout=120,
               what="early stop")
    assert coordinator.state.round < 20
    assert "target accuracy" in (coordinator.state.message or "")
    last = coordinator.history()[-1]
    assert last.eval_accuracy is not None and last.fairness is not None
    assert 0 <= last.fairness.disparity <= 1



def test_too_few_updates_fails_the_task_and_says_so(
    make_cloud: CloudFactory, make_agent: AgentFactory, mosquitto: RunningBroker,
    topics: Topics, new_device_id: Callable[[], str],
) -> None:
    from tests.test_fl_faults import HandDevice

    cloud = make_cloud(fl={TASK: fl_config(rounds=2, min_fit_clients=2, min_available_clients=2,
                                           round_timeout_s=2, accept_failures=False)})
    make_agent(fl=device_fl(0, 2))
    HandDevice(mosquitto, topics, new_device_id())  # online and selectable, never trains
    coordinator = cloud.service.coordinators[TASK]
    wait_until(lambda: coordinator.state.state is TaskState.FAILED, timeout=30,
               what="round failed")
    assert "fewer than min_fit_clients" in (coordinator.state.message or "")


def test_a_late_device_drops_its_update_and_says_so_in_telemetry(
    make_cloud: CloudFactory, make_agent: AgentFactory, mosquitto: RunningBroker,
    topics: Topics,
) -> None:
    from schemas.device import DeviceTelemetry

    make_cloud(fl={TASK: fl_config(rounds=1, min_fit_clients=1, min_available_clients=1,
                                   round_timeout_s=0.5, accept_failures=False,
                                   hyperparams={"local_epochs": 60, "batch_size": 8,
                                                "learning_rate": 0.01})})
    watcher = mosquitto.connected(mosquitto.cloud_username)
    agent = make_agent(fl=device_fl(0, 1), interval_s=0.2)
    watcher.subscribe(topics.telemetry(agent.device_id))
    wait_until(lambda: agent.counters["fl_late_update_dropped"] == 1, timeout=90,
               what="late update dropped")
    assert agent.fl.updates_sent == 0
    watcher.wait_for(lambda m: decode_message(DeviceTelemetry, m.payload).counters.get(
        "fl_late_update_dropped") == 1, timeout=10)
    watcher.close()


def test_mnist1d_trains_over_the_broker(
    make_cloud: CloudFactory, make_agent: AgentFactory, tmp_path: Path,
) -> None:
    """The second task: same coordinator, same devices, a 1-D CNN on MNIST-1D."""
    options = {"num_samples": 1000, "cache_dir": str(tmp_path / "cache")}
    cloud = make_cloud(fl={TASK: fl_config(
        task="fl_tasks.mnist1d:Mnist1dTask", task_kwargs=options, rounds=3,
        min_fit_clients=2, min_available_clients=2,
        hyperparams={"local_epochs": 6, "batch_size": 32, "learning_rate": 0.05,
                     "momentum": 0.9})})
    settings = [device_fl(i, 2) for i in range(2)]
    for s in settings:
        s["tasks"][TASK] |= {"path": "fl_tasks.mnist1d:Mnist1dTask", "options": options}
    agents = [make_agent(fl=s) for s in settings]
    coordinator = cloud.service.coordinators[TASK]
    wait_until(lambda: coordinator.state.state in (TaskState.FINISHED, TaskState.FAILED),
               timeout=120, what="three mnist1d rounds")
    assert coordinator.state.state is TaskState.FINISHED, coordinator.state.message
    history = coordinator.history()
    assert [h.round for h in history] == [1, 2, 3]
    assert sorted(history[-1].participants) == sorted(a.device_id for a in agents)
    first, last = history[0].central_accuracy, history[-1].central_accuracy
    assert first is not None and last is not None
    assert last > max(first, 0.3), f"learning, well above chance (0.1): {first} -> {last}"
