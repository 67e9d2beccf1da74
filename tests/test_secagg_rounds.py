"""Secure aggregation through the real broker: agents with identity keys from provisioning,
the cloud relaying keys, shares and masked inputs it cannot read, a device that drops out
after sharing its keys, and what the cloud refuses."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from scipy import stats

from broker.device_identity import load_identity_key
from cloud.fl.config import FLTaskConfig
from schemas.base import decode_message
from schemas.codec import decode
from schemas.fl import GlobalModelEnvelope, RoundPlan, TaskState
from schemas.secagg import (
    ADVERTISE,
    MASKED,
    MASKED_TENSOR,
    ROSTER,
    SHARES,
    DeviceIdentity,
    SecAggDevice,
    SecAggMaskedEnvelope,
    SecAggRoster,
    SecAggShares,
    neighbour_graph,
)
from schemas.topics import TopicKind, Topics
from tests.agent_fixtures import AgentFactory, wait_until
from tests.cloud_fixtures import CloudFactory, RunningCloud
from tests.conftest import RunningBroker
from tests.test_fl_faults import HandDevice
from tests.test_fl_rounds import TASK, device_fl, fl_config

pytestmark = pytest.mark.integration
CLIP = 0.5
STEP = 2 * CLIP / 65535  # one quantization level at 16 bits


def secagg_fl(mosquitto: RunningBroker, device_id: str, index: int, count: int,
              ) -> dict[str, Any]:
    """A device's FL settings with the identity ``broker add-device`` gave it."""
    secrets = mosquitto.settings.layout.secrets
    settings = device_fl(index, count)
    settings["secagg"] = {
        "identity_key": str(secrets / "identities" / f"{device_id}.key"),
        "certificate": str(secrets / "identities" / f"{device_id}.json"),
        "authority_key": (secrets / "identity-authority.pub").read_text().strip()}
    return settings


def secagg_task(**overrides: Any) -> dict[str, Any]:
    return fl_config(**{"rounds": 1, "min_fit_clients": 3, "min_available_clients": 3,
                        "round_timeout_s": 60,
                        "secagg": {"threshold": 0.6, "clip_range": CLIP,
                                   "stage_timeout_s": 20}} | overrides)


def global_delta(cloud: RunningCloud, version: str) -> dict[str, np.ndarray]:
    folder = cloud.settings.data_dir / "fl" / TASK
    def load(v: str) -> dict[str, np.ndarray]:
        tensors = decode((folder / f"global-{v}.safetensors").read_bytes(),
                         GlobalModelEnvelope).tensors
        return {k: np.asarray(t, np.float64) for k, t in tensors.items()}
    before, after = load(str(int(version) - 1)), load(version)
    return {k: after[k] - before[k] for k in after}


def assert_step_is_the_clipped_mean(cloud: RunningCloud, agents: list[Any]) -> None:
    """Round 1's step is the plain mean of the agents' updates (their local weights minus
    the round's base), clipped per coordinate, up to one quantization level."""
    folder = cloud.settings.data_dir / "fl" / TASK
    before = {k: np.asarray(t, np.float64) for k, t in decode(
        (folder / "global-0.safetensors").read_bytes(), GlobalModelEnvelope).tensors.items()}
    expected = {k: np.mean([np.clip(a.fl.tasks[TASK].local_weights[k] - before[k], -CLIP, CLIP)
                            for a in agents], axis=0) for k in before}
    got = global_delta(cloud, "1")
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, atol=1.01 * STEP)


def test_a_round_aggregates_securely_to_the_mean_of_the_devices_updates(
    make_cloud: CloudFactory, make_agent: AgentFactory, mosquitto: RunningBroker,
    topics: Topics, new_device_id: Callable[[], str],
) -> None:
    cloud = make_cloud(fl={TASK: secagg_task()})
    # Everything the devices send for the protocol, as the cloud receives it.
    spy = mosquitto.connected(mosquitto.cloud_username)
    spy.subscribe(topics.filter(TopicKind.SECAGG_DEVICE, task=TASK))
    ids = [new_device_id() for _ in range(3)]
    agents = [make_agent(d, fl=secagg_fl(mosquitto, d, i, 3)) for i, d in enumerate(ids)]
    coordinator = cloud.service.coordinators[TASK]
    wait_until(lambda: coordinator.state.state is TaskState.FINISHED, timeout=120,
               what="the secure round finished")
    history = coordinator.history()
    assert [h.round for h in history] == [1] and sorted(history[0].participants) == sorted(ids)
    folder = cloud.settings.data_dir / "fl" / TASK
    assert not list(folder.glob("round-1/*.safetensors")), "no update reached the cloud's disk"
    assert_step_is_the_clipped_mean(cloud, agents)
    assert max(float(np.abs(v).max()) for v in global_delta(cloud, "1").values()) \
        > 100 * STEP  # it moved
    before = {k: np.asarray(t, np.float64) for k, t in decode(
        (folder / "global-0.safetensors").read_bytes(), GlobalModelEnvelope).tensors.items()}
    health = cloud.service.health
    assert health.accepted["secagg_device"] == 3 * 4  # advertise, shares, masked, unmask
    assert dict(health.refused.get("secagg_device", {})) == {}
    for agent in agents:
        assert agent.counters["secagg_masked_sent"] == 1
    # What the cloud got from each device is indistinguishable from uniform noise: its
    # update (small values around the middle of the quantized range) does not show.
    for device_id in ids:
        [message] = spy.received_on(topics.secagg_device(TASK, 1, MASKED, device_id))
        masked = np.asarray(decode(message.payload, SecAggMaskedEnvelope).tensors[MASKED_TENSOR])
        counts = np.bincount((masked >> np.uint32(28)).astype(np.int64), minlength=16)
        assert stats.chisquare(counts).pvalue > 1e-6, (device_id, counts)
        plain = np.concatenate([np.clip(agents[ids.index(device_id)].fl.tasks[TASK]
                                        .local_weights[k] - before[k], -CLIP, CLIP).ravel()
                                for k in sorted(before)])
        assert abs(np.corrcoef(masked.astype(np.float64), plain)[0, 1]) < 0.1
        assert [m.payload for m in spy.received_on(topics.update(TASK, 1, device_id))] == []
    spy.close()


def test_with_neighbours_each_device_masks_with_two_peers_and_the_mean_is_exact(
    make_cloud: CloudFactory, make_agent: AgentFactory, mosquitto: RunningBroker,
    topics: Topics, new_device_id: Callable[[], str],
) -> None:
    """SecAgg+ through the broker: 5 devices, each sharing with and masking against the 2
    neighbours the roster's keys give it; the step is still the mean of all 5."""
    cloud = make_cloud(fl={TASK: secagg_task(
        min_fit_clients=5, min_available_clients=5,
        secagg={"threshold": 0.8, "clip_range": CLIP, "stage_timeout_s": 20,
                "neighbours": "auto"})})
    spy = mosquitto.connected(mosquitto.cloud_username)
    spy.subscribe(topics.filter(TopicKind.SECAGG_DEVICE, task=TASK))
    spy.subscribe(topics.secagg_broadcast(TASK, 1, ROSTER))
    ids = [new_device_id() for _ in range(5)]
    agents = [make_agent(d, fl=secagg_fl(mosquitto, d, i, 5)) for i, d in enumerate(ids)]
    coordinator = cloud.service.coordinators[TASK]
    wait_until(lambda: coordinator.state.state is TaskState.FINISHED, timeout=120,
               what="the secure round finished")
    assert sorted(coordinator.history()[0].participants) == sorted(ids)
    [message] = spy.received_on(topics.secagg_broadcast(TASK, 1, ROSTER))
    roster = decode_message(SecAggRoster, message.payload)
    # 4 of 5 needed, so 1 may drop out: a ring (k = 2), a secret needs 2 of its 3 holders.
    assert (roster.threshold, roster.neighbours, roster.neighbour_threshold) == (4, 2, 2)
    graph = neighbour_graph(roster)
    for device_id in ids:
        [sent] = spy.received_on(topics.secagg_device(TASK, 1, SHARES, device_id))
        shares = decode_message(SecAggShares, sent.payload)
        assert set(shares.ciphertexts) == graph.neighbours[device_id]
        assert len(shares.ciphertexts) == 2
    assert_step_is_the_clipped_mean(cloud, agents)
    assert dict(cloud.service.health.refused.get("secagg_device", {})) == {}
    spy.close()


def test_a_device_that_drops_after_sharing_its_keys_leaves_the_others_sum(
    make_cloud: CloudFactory, make_agent: AgentFactory, mosquitto: RunningBroker,
    topics: Topics, new_device_id: Callable[[], str],
) -> None:
    """Four devices advertise and share keys; one then leaves. Its pairwise masks are in
    the three others' inputs: the cloud rebuilds its mask key from their shares, removes
    them, and the round's step is the mean of the three."""
    cloud = make_cloud(fl={TASK: secagg_task(min_fit_clients=3, min_available_clients=4,
                                             round_timeout_s=8)})
    leaver = HandDevice(mosquitto, topics, new_device_id())
    leaver.client.subscribe(topics.secagg_broadcast(TASK, 1, ROSTER))
    ids = [new_device_id() for _ in range(3)]
    agents = [make_agent(d, fl=secagg_fl(mosquitto, d, i, 3)) for i, d in enumerate(ids)]
    plan = leaver.plan()
    assert plan.secagg is not None and plan.secagg.threshold == 3
    secrets = mosquitto.settings.layout.secrets / "identities"
    device = SecAggDevice(TASK, 1, plan.attempt, leaver.id,
                          load_identity_key(secrets / f"{leaver.id}.key"),
                          decode_message(DeviceIdentity,
                                         (secrets / f"{leaver.id}.json").read_bytes()),
                          nonce=plan.nonce or "")
    leaver.client.publish(topics.secagg_device(TASK, 1, ADVERTISE, leaver.id),
                          device.advertise().to_json())
    roster = decode_message(SecAggRoster, leaver.client.wait_topic(
        topics.secagg_broadcast(TASK, 1, ROSTER), timeout=30).payload)
    assert len(roster.devices) == 4
    authority = (mosquitto.settings.layout.secrets / "identity-authority.pub").read_text()
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    shares = device.share_keys(roster, Ed25519PublicKey.from_public_bytes(
        base64.b64decode(authority.strip())))
    leaver.client.publish(topics.secagg_device(TASK, 1, SHARES, leaver.id), shares.to_json())
    leaver.client.close()  # gone before its masked input
    coordinator = cloud.service.coordinators[TASK]
    wait_until(lambda: coordinator.state.state is TaskState.FINISHED, timeout=120,
               what="the round finished without the leaver")
    assert sorted(coordinator.history()[0].participants) == sorted(ids)
    assert_step_is_the_clipped_mean(cloud, agents)


def test_secure_aggregation_with_distributed_differential_privacy(
    make_cloud: CloudFactory, make_agent: AgentFactory, mosquitto: RunningBroker,
    new_device_id: Callable[[], str],
) -> None:
    """Each device clips to C and adds its share of the noise; only the sum carries all of
    it, the cloud sees none of it apart, and the round is accounted."""
    cloud = make_cloud(fl={TASK: secagg_task(privacy={
        "mode": "distributed", "clip_norm": 0.3, "noise_multiplier": 0.5, "delta": 1e-5})})
    ids = [new_device_id() for _ in range(3)]
    for i, d in enumerate(ids):
        make_agent(d, fl=secagg_fl(mosquitto, d, i, 3))
    coordinator = cloud.service.coordinators[TASK]
    wait_until(lambda: coordinator.state.state is TaskState.FINISHED, timeout=120,
               what="the private secure round finished")
    [status] = coordinator.history()
    assert sorted(status.participants) == sorted(ids)
    assert status.epsilon_spent is not None and status.epsilon_spent > 0
    step = global_delta(cloud, "1")
    norm = float(np.sqrt(sum(np.sum(v ** 2) for v in step.values())))
    assert 0 < norm < 10  # clipped to 0.3 each, plus noise of 0.5 * 0.3 per coordinate


def test_a_plain_update_to_a_secure_task_is_refused(
    make_cloud: CloudFactory, mosquitto: RunningBroker, topics: Topics,
    new_device_id: Callable[[], str],
) -> None:
    cloud = make_cloud(fl={TASK: secagg_task(min_fit_clients=2, min_available_clients=2)})
    devices = [HandDevice(mosquitto, topics, new_device_id()) for _ in range(2)]
    plan: RoundPlan = devices[0].plan()
    weights = devices[0].global_weights(plan.global_version)
    devices[0].send(plan, {k: np.zeros_like(v) for k, v in weights.items()})
    coordinator = cloud.service.coordinators[TASK]
    wait_until(lambda: coordinator.round.counts.get("secagg_required", 0) == 1, timeout=20,
               what="the plain update refused")
    assert coordinator.accepted == {}
    for device in devices:
        device.client.close()


@pytest.mark.parametrize(("overrides", "says"), [
    ({"strategy": "krum"}, "krum needs every update as sent"),
    ({"strategy": "scaffold"}, "scaffold needs every update as sent"),
    ({"max_update_norm": 5.0}, "max_update_norm checks each update"),
    ({"min_fit_clients": 1}, "min_fit_clients >= 2"),
    ({"compression": {"kind": "int8"}}, "quantizes updates itself"),
    ({"privacy": {"mode": "central", "clip_norm": 1.0, "noise_multiplier": 1.0}},
     "use privacy mode distributed"),
])
def test_what_cannot_aggregate_securely_is_refused_at_task_start(
    overrides: dict[str, Any], says: str,
) -> None:
    with pytest.raises(ValueError, match=says):
        FLTaskConfig.model_validate(secagg_task(**overrides))
    assert json.dumps(secagg_task())  # the defaults are fine
    FLTaskConfig.model_validate(secagg_task(privacy={
        "mode": "distributed", "clip_norm": 1.0, "noise_multiplier": 1.0}))
