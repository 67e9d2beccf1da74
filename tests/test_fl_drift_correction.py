"""Drift correction over the real broker: SCAFFOLD and FedNova each equal an in-process
replay of the updates that crossed the broker; SCAFFOLD's device control variates persist
in their state folders."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import torch

from cloud.fl.errors import StrategyConfigError
from cloud.fl.fednova import normalizer
from cloud.fl.privacy import DPMean
from cloud.fl.registry import make_strategy
from edge_node.counters import Counters
from edge_node.fl_client import FLClient
from edge_node.settings import FLSettings
from schemas.codec import decode
from schemas.compression import decompress
from schemas.fl import (
    GlobalModelEnvelope,
    HyperParams,
    RoundPlan,
    TaskState,
    UpdateEnvelope,
    split_control,
)
from schemas.topics import Topics
from tests.agent_fixtures import AgentFactory, wait_until
from tests.cloud_fixtures import CloudFactory
from tests.test_fl_rounds import device_fl, fl_config

pytestmark = pytest.mark.integration
TASK = "digits"


def _global(folder: Path, version: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    decoded = decode((folder / f"global-{version}.safetensors").read_bytes(),
                     GlobalModelEnvelope)
    weights, control = split_control(decoded.tensors)
    return ({k: np.asarray(v, np.float64) for k, v in weights.items()},
            {k: np.asarray(v, np.float64) for k, v in control.items()})


def test_scaffold_over_the_broker_equals_its_replay_and_keeps_the_device_variates(
    make_cloud: CloudFactory, make_agent: AgentFactory,
) -> None:
    cloud = make_cloud(fl={TASK: fl_config(strategy="scaffold")})
    agents = [make_agent(fl=device_fl(i, 3)) for i in range(3)]
    coordinator = cloud.service.coordinators[TASK]
    wait_until(lambda: coordinator.state.state is TaskState.FINISHED, timeout=120,
               what="3 SCAFFOLD rounds")
    folder = cloud.settings.data_dir / "fl" / TASK
    x, c = _global(folder, "0")
    assert c and all(not v.any() for v in c.values())  # c starts at zero, and is sent
    sent: dict[str, dict[str, np.ndarray]] = {}
    for round_ in (1, 2, 3):
        updates = sorted((folder / f"round-{round_}").glob("*.safetensors"))
        assert len(updates) == 3
        dy = {k: np.zeros_like(v) for k, v in x.items()}
        dc = {k: np.zeros_like(v) for k, v in x.items()}
        for path in updates:
            decoded = decode(path.read_bytes(), UpdateEnvelope)
            delta, control = split_control(decompress(decoded.tensors,
                                                      decoded.envelope.compression))
            own = sent.setdefault(decoded.envelope.device_id,
                                  {k: np.zeros_like(v) for k, v in x.items()})
            for k in x:
                dy[k] += delta[k].astype(np.float64) / 3
                dc[k] += control[k].astype(np.float64) / 3
                own[k] += control[k]
        x = {k: x[k] + dy[k] for k in x}  # server_lr 1
        c = {k: c[k] + 3 / 3 * dc[k] for k in c}  # |S| / N = 3 / 3
        got_x, got_c = _global(folder, str(round_))
        for k in x:
            np.testing.assert_allclose(got_x[k], x[k], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got_c[k], c[k], rtol=1e-5, atol=1e-6)
        assert any(np.abs(v).max() > 0 for v in got_c.values())
    # Each device's c_i is the sum of the changes it sent, on disk, and read back after a
    # restart of its FL client.
    for agent in agents:
        path = agent.state_dir / "fl" / TASK / "control.safetensors"
        stored = safetensors.numpy.load(path.read_bytes())
        for k, total in sent[agent.device_id].items():
            np.testing.assert_allclose(stored[k], total, rtol=1e-5, atol=1e-6)
        restarted = FLClient(agent.device_id, Topics(), FLSettings.model_validate(
            device_fl(0, 3)), publish=lambda *a: None, subscribe=lambda *a: None,
            counters=Counters(), state_dir=agent.state_dir / "fl")
        reloaded = restarted._load_control(TASK)
        assert reloaded.keys() == stored.keys()
        for k, value in stored.items():
            np.testing.assert_array_equal(reloaded[k], value)


def test_scaffold_refuses_differential_privacy() -> None:
    with pytest.raises(StrategyConfigError, match="scaffold"):
        DPMean(make_strategy("scaffold"), "central")


def test_fednova_over_the_broker_equals_normalized_averaging(
    make_cloud: CloudFactory, make_agent: AgentFactory,
) -> None:
    cloud = make_cloud(fl={TASK: fl_config(strategy="fednova", rounds=2)})
    for i in range(3):
        make_agent(fl=device_fl(i, 3))  # Dirichlet shares: different data, different steps
    coordinator = cloud.service.coordinators[TASK]
    wait_until(lambda: coordinator.state.state is TaskState.FINISHED, timeout=120,
               what="2 FedNova rounds")
    folder = cloud.settings.data_dir / "fl" / TASK
    x, _ = _global(folder, "0")
    steps_seen: set[int] = set()
    for round_ in (1, 2):
        total = tau = 0.0
        acc = {k: np.zeros_like(v) for k, v in x.items()}
        for path in sorted((folder / f"round-{round_}").glob("*.safetensors")):
            decoded = decode(path.read_bytes(), UpdateEnvelope)
            delta = decompress(decoded.tensors, decoded.envelope.compression)
            n, steps = decoded.envelope.num_examples, decoded.envelope.local_steps
            assert steps is not None
            steps_seen.add(steps)
            total += n
            tau += n * steps
            for k in acc:
                acc[k] += n / steps * delta[k].astype(np.float64)
        x = {k: x[k] + (tau / total) * acc[k] / total for k in x}
        got, _ = _global(folder, str(round_))
        for k in x:
            np.testing.assert_allclose(got[k], x[k], rtol=1e-5, atol=1e-6)
    assert len(steps_seen) > 1, steps_seen  # the devices did different amounts of work


def test_fednova_normalizer_is_the_sum_of_the_momentum_weights() -> None:
    assert normalizer(7, 0.0) == 7
    for steps, rho in ((1, 0.9), (5, 0.5), (40, 0.9)):
        direct = sum((1 - rho ** k) / (1 - rho) for k in range(1, steps + 1))
        assert normalizer(steps, rho) == pytest.approx(direct)


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_a_scaffold_control_variate_is_the_mean_gradient_whatever_the_momentum(
    momentum: float,
) -> None:
    """Under a constant gradient g, c_i+ (c = c_i = 0) is g: torch's SGD with momentum
    moves further than the plain steps, and c_i must not grow by 1 / (1 - momentum)."""
    g = torch.linspace(-1.0, 1.0, 12).reshape(3, 4)
    w = torch.zeros(3, 4, requires_grad=True)
    hp = HyperParams(local_epochs=2, batch_size=16, learning_rate=0.05, momentum=momentum)
    examples = 40  # 3 batches a local epoch: K = 6 steps
    optimizer = torch.optim.SGD([w], lr=hp.learning_rate, momentum=hp.momentum)
    for _ in range(hp.local_epochs * math.ceil(examples / hp.batch_size)):
        optimizer.zero_grad()
        (w * g).sum().backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    delta = {"w": w.detach().numpy().astype(np.float32)}
    client = FLClient("dev-m", Topics(), FLSettings.model_validate(device_fl(0, 3)),
                      publish=lambda *a: None, subscribe=lambda *a: None, counters=Counters())
    state = client.tasks[TASK]
    plan = RoundPlan(task=TASK, round=1, global_version="0", selected=["dev-m"],
                     issued_at=2e9, deadline=2e9 + 60, strategy="scaffold", hyperparams=hp)
    zero = {"w": np.zeros((3, 4), np.float32)}
    new, change = client._next_control(state, plan, delta, zero, examples)
    np.testing.assert_allclose(new["w"], g.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(change["w"], new["w"])
