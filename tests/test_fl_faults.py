"""Bad updates, disconnects and a killed cloud during federated rounds (real broker)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from schemas.base import decode_message, now
from schemas.codec import decode, encode
from schemas.device import DeviceState, HardwareInfo
from schemas.fl import EvalResult, GlobalModelEnvelope, RoundPlan, TaskState, UpdateEnvelope
from schemas.topics import Topics
from tests.agent_fixtures import AgentFactory, wait_until
from tests.cloud_fixtures import CloudFactory
from tests.conftest import RunningBroker
from tests.test_fl_rounds import TASK, device_fl, fl_config

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]
HW = HardwareInfo(platform="Linux", machine="x86_64", cpu_count=2, memory_total_mb=2048.0)


class HandDevice:
    """A device driven by the test: it can send any update it likes."""

    def __init__(self, broker: RunningBroker, topics: Topics, device_id: str, *,
                 born: bool = True, member: bool = True) -> None:
        self.id = device_id
        self.topics = topics
        self.client = broker.connected(device_id)
        self.client.subscribe(topics.round_plan(TASK))
        self.client.subscribe(f"{topics.root}/fl/{TASK}/global/+")
        if born:
            state = DeviceState.model_validate({
                "device_id": device_id, "state": "online", "bd_seq": 0, "ts": now(),
                "agent_version": "t", "hardware": HW, "memory_available_mb": 1024.0,
                "runtimes": {"torchscript": "2.13"}, "model_formats": ["torchscript"],
                "fl_tasks": [TASK] if member else []})
            assert self.client.publish(topics.device_state(device_id), state.to_json(),
                                       retain=True) in (0, 0x10)

    def plan(self, round_: int = 1) -> RoundPlan:
        msg = self.client.wait_for(lambda m: m.topic == self.topics.round_plan(TASK)
                                   and bool(m.payload)
                                   and json.loads(m.payload)["round"] == round_, timeout=30)
        return decode_message(RoundPlan, msg.payload)

    def global_weights(self, version: str) -> dict[str, np.ndarray]:
        msg = self.client.wait_topic(self.topics.global_model(TASK, version))
        return dict(decode(msg.payload, GlobalModelEnvelope).tensors)

    def send(self, plan: RoundPlan, delta: dict[str, np.ndarray], *, round_: int | None = None,
             base: str | None = None, examples: int = 10) -> None:
        envelope = UpdateEnvelope(task=TASK, round=round_ or plan.round, device_id=self.id,
                                  base_version=base or plan.global_version, nonce=plan.nonce,
                                  num_examples=examples, train_loss=1.0, sent_at=now())
        topic = self.topics.update(TASK, round_ or plan.round, self.id)
        assert self.client.publish(topic, encode(delta, envelope)) in (0, 0x10)


def zeros(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.zeros_like(v, dtype=np.float32) for k, v in weights.items()}


def test_bad_updates_are_rejected_with_reasons_and_the_round_completes(
    make_cloud: CloudFactory, mosquitto: RunningBroker, topics: Topics,
    new_device_id: Callable[[], str],
) -> None:
    cloud = make_cloud(fl={TASK: fl_config(rounds=1, min_fit_clients=2,
                                           min_available_clients=2, max_update_norm=5.0)})
    a = HandDevice(mosquitto, topics, new_device_id())
    b = HandDevice(mosquitto, topics, new_device_id())
    outsider = HandDevice(mosquitto, topics, new_device_id(), born=False)
    plan = a.plan()
    assert sorted(plan.selected) == sorted([a.id, b.id])
    weights = a.global_weights(plan.global_version)
    good = zeros(weights)
    name = next(iter(good))
    nan = {**good, name: np.full_like(good[name], np.nan)}
    wrong_shape = {**good, name: np.zeros((3, 3), np.float32)}
    huge = {**good, name: np.full_like(good[name], 100.0)}
    a.send(plan, nan)
    a.send(plan, wrong_shape)
    a.send(plan, huge)
    a.send(plan, good, round_=99)
    a.send(plan, good, base="7")
    outsider.send(plan, good)
    a.send(plan, {**good, name: good[name] + 0.01})
    a.send(plan, {**good, name: good[name] + 0.01})  # duplicate: counted once
    coordinator = cloud.service.coordinators[TASK]
    wait_until(lambda: a.id in coordinator.accepted, what="a's good update")
    b.send(plan, good)
    wait_until(lambda: coordinator.state.state is TaskState.FINISHED, timeout=30,
               what="round closed")
    record = coordinator.history()[-1]
    reasons = sorted(r.reason for r in record.rejected)
    assert reasons == sorted(["non_finite", "shape_mismatch", "norm_bound", "stale_base",
                              "not_selected"])
    assert record.rejected_counts == dict.fromkeys(reasons, 1)
    # A refusal is filed under the round it names, never the open one.
    assert coordinator.fl_store.rejections(99).counts == {"stale_round": 1}

    assert sorted(record.participants) == sorted([a.id, b.id])
    assert cloud.service.counters["fl_duplicate_update"] == 1
    for device in (a, b, outsider):
        device.client.close()


def test_an_update_replayed_into_a_later_round_is_refused(
    make_cloud: CloudFactory, mosquitto: RunningBroker, topics: Topics,
    new_device_id: Callable[[], str],
) -> None:
    cloud = make_cloud(fl={TASK: fl_config(rounds=2, min_fit_clients=2,
                                           min_available_clients=2)})
    a = HandDevice(mosquitto, topics, new_device_id())
    b = HandDevice(mosquitto, topics, new_device_id())
    first = a.plan(1)
    good = zeros(a.global_weights(first.global_version))
    envelope = UpdateEnvelope(task=TASK, round=1, device_id=a.id,
                              base_version=first.global_version, nonce=first.nonce,
                              num_examples=10,
                              train_loss=1.0, sent_at=now())
    sent = encode(good, envelope)  # what crossed the broker in round 1
    assert a.client.publish(topics.update(TASK, 1, a.id), sent) in (0, 0x10)
    b.send(first, good)
    second = a.plan(2)
    # The same bytes again, now on round 2's topic; and a copy relabelled round 2 that
    # still trained from round 1's weights.
    assert a.client.publish(topics.update(TASK, 2, a.id), sent) in (0, 0x10)
    relabelled = envelope.model_copy(update={"round": 2})
    assert a.client.publish(topics.update(TASK, 2, a.id), encode(good, relabelled)) in (0, 0x10)
    coordinator = cloud.service.coordinators[TASK]
    wait_until(lambda: sum(coordinator.round.counts.values()) >= 2, timeout=30,
               what="both replays refused")
    a.send(second, good)
    b.send(second, good)
    wait_until(lambda: coordinator.state.state is TaskState.FINISHED, timeout=30,
               what="round 2 closed")
    record = coordinator.history()[-1]
    assert record.round == 2
    assert record.rejected_counts == {"envelope_mismatch": 1, "stale_base": 1}
    assert sorted(record.participants) == sorted([a.id, b.id])
    for device in (a, b):
        device.client.close()


def test_an_update_made_for_another_opening_of_the_round_is_refused(
    make_cloud: CloudFactory, mosquitto: RunningBroker, topics: Topics,
    new_device_id: Callable[[], str],
) -> None:
    """A task started again from scratch opens round 1, attempt 0, on version "0" again.

    Only the plan's nonce tells an update made for the old opening (held back by a device,
    or queued by the broker) from one made for this one.
    """
    config = fl_config(rounds=1, min_fit_clients=1, min_available_clients=1)
    device = HandDevice(mosquitto, topics, new_device_id())
    old_cloud = make_cloud(fl={TASK: config})
    old = device.plan(1)
    delta = zeros(device.global_weights(old.global_version))
    old_cloud.stop()
    cloud = make_cloud(fl={TASK: config})  # a new data folder: the task starts over
    msg = device.client.wait_for(
        lambda m: m.topic == topics.round_plan(TASK) and bool(m.payload)
        and json.loads(m.payload)["nonce"] != old.nonce, timeout=30)
    plan = decode_message(RoundPlan, msg.payload)
    assert (plan.round, plan.attempt, plan.global_version) == (
        old.round, old.attempt, old.global_version)
    assert plan.nonce is not None and old.nonce is not None
    coordinator = cloud.service.coordinators[TASK]
    device.send(old, delta)
    stripped = UpdateEnvelope(task=TASK, round=1, device_id=device.id,
                              base_version=plan.global_version, num_examples=10,
                              sent_at=now())  # no nonce at all
    assert device.client.publish(topics.update(TASK, 1, device.id),
                                 encode(delta, stripped)) in (0, 0x10)
    wait_until(lambda: coordinator.round.counts.get("stale_nonce") == 2, timeout=30,
               what="both refused")
    assert coordinator.round.accepted == {}
    device.send(plan, delta)
    wait_until(lambda: coordinator.state.state is TaskState.FINISHED, timeout=30,
               what="the round closed on the new update")
    assert coordinator.history()[-1].rejected_counts == {"stale_nonce": 2}
    device.client.close()


def test_an_evaluation_made_for_another_opening_of_the_round_is_refused(
    make_cloud: CloudFactory, mosquitto: RunningBroker, topics: Topics,
    new_device_id: Callable[[], str],
) -> None:
    cloud = make_cloud(fl={TASK: fl_config(rounds=1, min_fit_clients=1, min_available_clients=1,
                                           fraction_evaluate=1.0)})
    device = HandDevice(mosquitto, topics, new_device_id())
    plan = device.plan(1)
    assert device.id in plan.evaluate and plan.nonce is not None
    coordinator = cloud.service.coordinators[TASK]
    for nonce in ("f" * 32, None, plan.nonce):  # another opening's, none, this one's
        result = EvalResult(task=TASK, round=1, device_id=device.id,
                            global_version=plan.global_version, nonce=nonce, num_examples=10,
                            loss=1.0, accuracy=0.5, ts=now())
        assert device.client.publish(topics.eval_result(TASK, 1, device.id),
                                     result.to_json()) in (0, 0x10)
    wait_until(lambda: device.id in coordinator.round.evals, what="the good evaluation taken")
    assert cloud.service.health.refused["eval"]["stale_nonce"] == 2
    device.send(plan, zeros(device.global_weights(plan.global_version)))
    wait_until(lambda: coordinator.state.state is TaskState.FINISHED, what="round closed")
    device.client.close()


def test_a_device_that_disconnects_mid_round_closes_at_the_deadline(
    make_cloud: CloudFactory, make_agent: AgentFactory, mosquitto: RunningBroker,
    topics: Topics, new_device_id: Callable[[], str],
) -> None:
    cloud = make_cloud(fl={TASK: fl_config(rounds=1, min_fit_clients=1, min_available_clients=2,
                                           round_timeout_s=3)})
    agent = make_agent(fl=device_fl(0, 2))
    silent = HandDevice(mosquitto, topics, new_device_id())
    plan = silent.plan()
    assert silent.id in plan.selected
    silent.client.drop()  # never reports
    coordinator = cloud.service.coordinators[TASK]
    wait_until(lambda: coordinator.state.state is TaskState.FINISHED, timeout=20,
               what="round closed at the deadline")
    record = coordinator.history()[-1]
    assert record.participants == [agent.device_id]
    assert now() >= plan.deadline


def test_publishers_say_what_their_payload_is(
    make_cloud: CloudFactory, make_agent: AgentFactory, mosquitto: RunningBroker,
    topics: Topics, new_device_id: Callable[[], str],
) -> None:
    make_cloud(fl={TASK: fl_config(rounds=1, min_fit_clients=1, min_available_clients=1)})
    device = HandDevice(mosquitto, topics, new_device_id())
    plan = device.plan()
    weights = device.client.wait_topic(topics.global_model(TASK, plan.global_version))
    assert (weights.content_type, weights.payload_format) == ("application/vnd.safetensors", 0)
    round_plan = device.client.wait_topic(topics.round_plan(TASK))
    assert (round_plan.content_type, round_plan.payload_format) == ("application/json", 1)
    agent = make_agent()
    watcher = mosquitto.connected(mosquitto.cloud_username)
    watcher.subscribe(topics.telemetry(agent.device_id))
    telemetry = watcher.wait_topic(topics.telemetry(agent.device_id))
    assert (telemetry.content_type, telemetry.payload_format) == ("application/json", 1)
    watcher.close()
    device.client.close()
