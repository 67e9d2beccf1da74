"""Issue 14: a device off the network for a minute while it keeps producing telemetry.

Its link to the broker runs through a TCP relay that the test cuts (connection refused,
as when the device's network is down) while the broker, the cloud and another device
stay up. After the minute every reading reaches the cloud's store exactly once, the
backlog arrives in the order it was produced and is marked historical, and the other
device was stored throughout.
"""

from __future__ import annotations

import pytest

from schemas.base import decode_message
from schemas.device import DeviceTelemetry
from schemas.topics import Topics
from tests.agent_fixtures import AgentFactory, wait_until
from tests.cloud_fixtures import CloudFactory
from tests.conftest import RunningBroker
from tests.mqtt_client import SyncClient
from tests.tcp_relay import TcpRelay

pytestmark = pytest.mark.integration
OFFLINE_S = 60.0
INTERVAL_S = 0.5


def test_a_device_offline_for_a_minute_loses_and_doubles_nothing(
    mosquitto: RunningBroker, topics: Topics, make_cloud: CloudFactory,
    make_agent: AgentFactory, cloud: SyncClient,
) -> None:
    service = make_cloud()
    relay = TcpRelay(mosquitto.port)
    away = make_agent(mqtt={"port": relay.port}, interval_s=INTERVAL_S)
    steady = make_agent(interval_s=INTERVAL_S)
    sessions = {away.device_id: away.session_id, steady.device_id: steady.session_id}

    def stored(device: str) -> list[int]:
        return [r["seq"] for r in service.rows(
            "SELECT seq FROM telemetry WHERE device_id=? AND session_id=? ORDER BY seq",
            (device, sessions[device]))]

    try:
        wait_until(lambda: len(stored(away.device_id)) >= 3, what="the device stored online")
        relay.cut()
        wait_until(lambda: not away.session.connected.is_set(), what="the device offline")
        first_offline = away.telemetry_seq
        steady_before = len(stored(steady.device_id))
        wait_until(lambda: away.telemetry_seq >= first_offline + OFFLINE_S / INTERVAL_S,
                   timeout=OFFLINE_S * 2, what="a minute of readings produced offline")
        last_offline = away.telemetry_seq - 1
        assert len(stored(steady.device_id)) >= steady_before + OFFLINE_S / INTERVAL_S * 0.8, \
            "the other device was stored meanwhile"
        assert max(stored(away.device_id)) < first_offline
        relay.restore()
        assert away.session.connected.wait(30), "the device reconnected"
        wait_until(lambda: set(range(last_offline + 1)) <= set(stored(away.device_id)),
                   timeout=60, what="the whole backlog stored")
    finally:
        relay.close()
    seqs = stored(away.device_id)
    assert seqs == list(range(len(seqs))), "every reading once, none missing"
    historical = {r["seq"] for r in service.rows(
        "SELECT seq FROM telemetry WHERE device_id=? AND historical=1", (away.device_id,))}
    assert set(range(first_offline, last_offline + 1)) <= historical
    arrived = [decode_message(DeviceTelemetry, m.payload).seq
               for m in cloud.received_on(topics.telemetry(away.device_id))]
    firsts = list(dict.fromkeys(s for s in arrived if s >= first_offline))
    backlog = [s for s in firsts if s <= last_offline]
    assert backlog == sorted(backlog) == list(range(first_offline, last_offline + 1)), \
        "the backlog arrives in the order it was produced"
    refused: dict[str, int] = dict(service.service.health.refused.get("telemetry", {}))
    assert not refused, f"nothing refused: {refused}"
