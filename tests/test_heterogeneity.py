"""The heterogeneous simulated fleet: profiles are a function of their seed; devices go
offline and come back on their schedule; a failing device drops its rounds."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_node.fleet import Fleet, fleet_settings
from edge_node.heterogeneity import HeterogeneityProfile, device_profiles
from edge_node.settings import MqttSettings
from schemas.base import decode_message
from schemas.device import DeviceState
from schemas.fl import TaskState
from schemas.topics import Topics
from tests.agent_fixtures import AgentFactory, wait_until
from tests.cloud_fixtures import CloudFactory
from tests.conftest import RunningBroker
from tests.mqtt_client import SyncClient
from tests.test_fl_rounds import device_fl, fl_config

IDS = [f"sim-{i:03d}" for i in range(20)]
PROFILE = HeterogeneityProfile(seed=7, slow_fraction=0.3, slow_factor=10,
                               intermittent_fraction=0.2, online_s=30, offline_s=30,
                               failure_rate=0.05, horizon_s=600)


def test_a_profile_is_a_function_of_its_seed() -> None:
    first = device_profiles(PROFILE, IDS)
    assert first == device_profiles(PROFILE, list(reversed(IDS)))  # order does not matter
    assert first != device_profiles(PROFILE.model_copy(update={"seed": 8}), IDS)
    assert sum(p.speed_factor == 10 for p in first.values()) == 6  # 30 % of 20
    assert sum(p.speed_factor == 1 for p in first.values()) == 14
    slower = device_profiles(PROFILE.model_copy(update={"base_factor": 30.0}), IDS)
    assert {d: p.speed_factor for d, p in slower.items()} == {  # a slower processor class
        d: 30 * p.speed_factor for d, p in first.items()}
    with pytest.raises(ValueError, match="at most 1000"):
        HeterogeneityProfile(base_factor=200, slow_factor=10)
    intermittent = [p for p in first.values() if p.offline]
    assert len(intermittent) == 4  # 20 % of 20
    for p in intermittent:
        assert p.online_at(0.0) and p.offline[0][0] > 0  # everyone starts online
        for (start, end), (next_start, _) in zip(p.offline, p.offline[1:], strict=False):
            assert start < end < next_start
        assert p.offline[-1][0] < 600
        start, end = p.offline[0]
        assert not p.online_at((start + end) / 2) and p.online_at(end)
    assert all(p.failure_rate == 0.05 for p in first.values())
    assert len({p.seed for p in first.values()}) == 20


@pytest.mark.integration
def test_an_intermittent_device_goes_offline_and_comes_back_on_its_state(
    mosquitto: RunningBroker, topics: Topics, cloud: SyncClient, tmp_path: Path,
) -> None:
    profile = HeterogeneityProfile(seed=3, intermittent_fraction=0.5, online_s=1.0,
                                   offline_s=1.0, horizon_s=60)
    ids = ["sim-000", "sim-001"]
    profiles = device_profiles(profile, ids)
    (cycling,) = [d for d, p in profiles.items() if p.offline]
    settings = fleet_settings(
        2, prefix="sim-", state_root=tmp_path, topic_root=topics.root,
        mqtt=MqttSettings(host=mosquitto.host, port=mosquitto.port, reconnect_min_s=0.1),
        secrets_dir=mosquitto.settings.layout.secrets, interval_s=0.3, profiles=profiles)
    fleet = Fleet(settings, tmp_path, profiles=profiles)
    fleet.start()
    try:
        def states() -> list[DeviceState]:
            return [decode_message(DeviceState, m.payload)
                    for m in cloud.received_on(topics.device_state(cycling)) if m.payload]

        # Born, shut down by its schedule, born again on the same state folder, and down.
        wait_until(lambda: [s.state for s in states()].count("online") >= 2
                   and [s.state for s in states()].count("offline") >= 2, timeout=60,
                   what=f"{cycling} cycled twice")
        seen = states()
        births = [s for s in seen if s.state == "online"]
        assert births[1].bd_seq > births[0].bd_seq  # the same device, a new connection
        assert all(s.reason == "shutdown" for s in seen if s.state == "offline")
        assert fleet.power_cycles >= 1
        steady = next(d for d in ids if d != cycling)
        assert [m for m in cloud.received_on(topics.device_state(steady))
                if b'"offline"' in m.payload] == []
    finally:
        fleet.stop()


@pytest.mark.integration
def test_a_failing_device_drops_its_rounds_and_counts_them(
    make_cloud: CloudFactory, make_agent: AgentFactory,
) -> None:
    cloud = make_cloud(fl={"digits": fl_config(rounds=2, min_fit_clients=1,
                                               min_available_clients=2,
                                               round_timeout_s=8)})
    steady = make_agent(fl=device_fl(0, 2))
    failing = make_agent(fl={**device_fl(1, 2),
                             "simulation": {"failure_rate": 1.0, "speed_factor": 3.0}})
    coordinator = cloud.service.coordinators["digits"]
    wait_until(lambda: coordinator.state.state is TaskState.FINISHED, timeout=120,
               what="2 rounds")
    for status in coordinator.history():
        assert status.participants == [steady.device_id]
    assert failing.counters["fl_simulated_failure"] >= 2  # a round retried draws again
    assert failing.fl is not None and failing.fl.updates_sent == 0
