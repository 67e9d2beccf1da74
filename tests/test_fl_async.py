"""Asynchronous buffered aggregation (FedBuff, ``mode: async``) over the real broker."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from cloud.fl.async_coordinator import AsyncCoordinator
from cloud.fl.config import FLTaskConfig
from schemas.base import decode_message
from schemas.codec import decode
from schemas.fl import GlobalModelEnvelope, RoundPlan, TaskState, TaskStatus
from schemas.topics import Topics
from tests.agent_fixtures import AgentFactory, wait_until
from tests.cloud_fixtures import CloudFactory
from tests.cloud_process import CloudProcess
from tests.conftest import RunningBroker
from tests.test_fl_faults import HandDevice, zeros
from tests.test_fl_rounds import TASK, device_fl, fl_config

pytestmark = pytest.mark.integration


def async_config(rounds: int = 10, **fedbuff: Any) -> dict[str, Any]:
    return fl_config(mode="async", rounds=rounds, min_available_clients=3,
                     fedbuff={"concurrency": 3, "buffer_size": 1, "max_staleness": 5} | fedbuff)


def assignment(device: HandDevice, after: int = 0) -> RoundPlan:
    """The first retained plan that gives ``device`` a ticket above ``after``."""
    topic = device.topics.round_plan(TASK)
    msg = device.client.wait_for(
        lambda m: m.topic == topic and bool(m.payload)
        and json.loads(m.payload).get("tickets", {}).get(device.id, 0) > after, timeout=30)
    plan = decode_message(RoundPlan, msg.payload)
    assert plan.mode == "async"
    return plan


def send(device: HandDevice, plan: RoundPlan, delta: dict[str, np.ndarray],
         examples: int = 10) -> None:
    device.send(plan, delta, round_=plan.tickets[device.id], examples=examples)


def small(weights: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in weights.items()}


def global_at(folder: Path, version: str) -> dict[str, np.ndarray]:
    decoded = decode((folder / f"global-{version}.safetensors").read_bytes(), GlobalModelEnvelope)
    return {k: np.asarray(v, np.float64) for k, v in decoded.tensors.items()}


def test_updates_are_scaled_by_staleness_and_refused_past_max_staleness(
    make_cloud: CloudFactory, mosquitto: RunningBroker, topics: Topics,
    new_device_id: Callable[[], str],
) -> None:
    cloud = make_cloud(fl={TASK: async_config(max_staleness=1)})
    coordinator = cloud.service.coordinators[TASK]
    assert isinstance(coordinator, AsyncCoordinator)
    a, b, c = (HandDevice(mosquitto, topics, new_device_id()) for _ in range(3))
    pa, pb, pc = assignment(a), assignment(b), assignment(c)
    assert pa.global_version == pb.global_version == pc.global_version == "0"
    assert len({pa.tickets[a.id], pb.tickets[b.id], pc.tickets[c.id]}) == 3
    rng = np.random.default_rng(7)
    w0 = a.global_weights("0")
    d_a, d_b = small(w0, rng), small(w0, rng)

    send(a, pa, d_a)  # buffer_size 1: a version of its own, nobody else waited for
    wait_until(lambda: coordinator.state.round == 1, what="version 1")
    send(a, pa, d_a)  # a redelivery of an answered ticket counts once
    send(b, pb, d_b)  # trained from 0, one version behind: scaled by 1/sqrt(2)
    wait_until(lambda: coordinator.state.round == 2, what="version 2")
    send(c, pc, zeros(w0))  # trained from 0, two versions behind: refused
    wait_until(lambda: cloud.service.counters["fl_rejected_too_stale"] == 1,
               what="too_stale refusal")
    send(c, pc, zeros(w0), examples=11)  # its assignment is answered: a duplicate
    a.send(pa, zeros(w0), round_=999)  # a ticket never given
    wait_until(lambda: cloud.service.counters["fl_rejected_not_assigned"] == 1,
               what="not_assigned refusal")
    assert cloud.service.counters["fl_duplicate_update"] == 2

    folder = cloud.settings.data_dir / "fl" / TASK
    got = global_at(folder, "2")
    for k, value in w0.items():
        expected = value.astype(np.float64) + d_a[k] + d_b[k] / math.sqrt(2)
        np.testing.assert_allclose(got[k], expected, rtol=1e-6, atol=1e-6)
    history = coordinator.history()
    assert [(h.round, h.participants, h.staleness_max) for h in history] == [
        (1, [a.id], 0), (2, [b.id], 1)]
    status = coordinator.status()
    assert status.mode == "async" and status.rejected_counts == {"too_stale": 1,
                                                                 "not_assigned": 1}
    # An answered device gets a new ticket at once, on the version its update made.
    again = assignment(a, after=pa.tickets[a.id])
    assert again.global_version == "1"
    for device in (a, b, c):
        device.client.close()


def test_a_fast_device_is_aggregated_without_waiting_for_slow_ones(
    make_cloud: CloudFactory, make_agent: AgentFactory,
) -> None:
    cloud = make_cloud(fl={TASK: async_config(rounds=4, max_staleness=10)
                           | {"keep_update_rounds": 0}})
    fast = make_agent(fl=device_fl(0, 3))
    slow = [make_agent(fl=device_fl(i, 3) | {"simulation": {"speed_factor": 1000}})
            for i in (1, 2)]
    coordinator = cloud.service.coordinators[TASK]
    wait_until(lambda: coordinator.state.state is TaskState.FINISHED, timeout=90,
               what="4 versions from the fast device")
    history = coordinator.history()
    assert [h.round for h in history] == [1, 2, 3, 4]
    assert all(h.participants == [fast.device_id] and h.staleness_max == 0 for h in history)
    assert [a.fl.updates_sent for a in slow] == [0, 0]  # still training, not waited for
    assert history[-1].central_accuracy is not None
    # Only the weights still needed stay on disk: the final and the most accurate.
    folder = cloud.settings.data_dir / "fl" / TASK
    kept = {p.name for p in folder.glob("global-*.safetensors")}
    best = f"global-{coordinator.state.best_round}.safetensors"
    assert kept == {"global-4.safetensors", best}, kept


def test_a_killed_cloud_resumes_a_half_full_buffer_without_loss_or_double_counting(
    mosquitto: RunningBroker, topics: Topics, tmp_path: Path,
    new_device_id: Callable[[], str],
) -> None:
    cloud = CloudProcess(mosquitto, topics, tmp_path / "cloud", instance="fedbuff-kill",
                         fl={TASK: async_config(rounds=1, buffer_size=3)})
    try:
        cloud.start()
        devices = [HandDevice(mosquitto, topics, new_device_id()) for _ in range(3)]
        plans = [assignment(d) for d in devices]
        w0 = devices[0].global_weights("0")
        rng = np.random.default_rng(11)
        deltas = [small(w0, rng) for _ in devices]
        examples = [10, 30, 60]
        for i in (0, 1):
            send(devices[i], plans[i], deltas[i], examples[i])
        wait_until(lambda: len(cloud.rows("SELECT device_id FROM fl_updates WHERE round=1"))
                   == 2, what="two updates in the buffer")
        cloud.kill()
        cloud.start()
        send(devices[0], plans[0], deltas[0], examples[0])  # a retry after the restart
        send(devices[2], plans[2], deltas[2], examples[2])
        watcher = mosquitto.connected(mosquitto.cloud_username)
        watcher.subscribe(topics.task_status(TASK))
        final = decode_message(TaskStatus, watcher.wait_for(
            lambda m: bool(m.payload) and json.loads(m.payload)["state"] == "finished",
            timeout=30).payload)
        watcher.close()
        assert final.round == 1 and sorted(final.participants) == sorted(d.id for d in devices)
        got = global_at(tmp_path / "cloud" / "data" / "fl" / TASK, "1")
        total = sum(examples)
        for k, value in w0.items():
            expected = value.astype(np.float64) + sum(
                n * d[k].astype(np.float64) for n, d in zip(examples, deltas, strict=True)) / total
            np.testing.assert_allclose(got[k], expected, rtol=1e-5, atol=1e-6)
        for device in devices:
            device.client.close()
    finally:
        cloud.close()


@pytest.mark.parametrize(("extra", "why"), [
    ({"secagg": {}}, "secure aggregation needs a cohort"),
    ({"privacy": {"mode": "client", "clip_norm": 1.0, "noise_multiplier": 1.0}},
     "differential privacy is accounted per round"),
    ({"strategy": "scaffold"}, "staleness-weighted mean"),
    ({"strategy": "krum"}, "staleness-weighted mean"),
])
def test_async_mode_refuses_what_needs_a_cohort(extra: dict[str, Any], why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        FLTaskConfig.model_validate(async_config() | extra)
    FLTaskConfig.model_validate(fl_config() | extra)  # a synchronous task takes it
