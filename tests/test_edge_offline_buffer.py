"""Store and forward: the offline buffer on disk, and end to end across a broker outage."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_node.agent import EdgeAgent
from edge_node.offline_buffer import OfflineBuffer
from schemas.base import decode_message
from schemas.device import DeviceTelemetry
from schemas.topics import Topics
from tests.agent_fixtures import agent_settings, wait_until
from tests.conftest import RunningBroker
from tests.mqtt_client import SyncClient


def test_fifo_survives_reopen_and_evicts_oldest_first(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    buffer = OfflineBuffer(path, max_messages=5, max_bytes=10_000)
    for i in range(8):
        buffer.append("t", f"m{i}".encode())
    assert len(buffer) == 5 and buffer.evicted == 3
    buffer.close()
    reopened = OfflineBuffer(path, max_messages=5, max_bytes=10_000)  # as after a power cut
    items = reopened.peek(10)
    assert [m.payload for m in items] == [f"m{i}".encode() for i in range(3, 8)]
    reopened.remove([items[0].id, items[1].id])
    assert [m.payload for m in reopened.peek(10)] == [b"m5", b"m6", b"m7"]
    assert reopened.evicted == 3
    reopened.close()


def test_byte_cap_evicts_and_oversized_is_refused(tmp_path: Path) -> None:
    buffer = OfflineBuffer(tmp_path / "b.sqlite3", max_messages=100, max_bytes=100)
    for _ in range(5):
        buffer.append("t", b"x" * 30)
    assert len(buffer) == 3 and buffer.evicted == 2
    with pytest.raises(ValueError, match="exceeds"):
        buffer.append("t", b"y" * 101)
    buffer.close()


@pytest.mark.integration
def test_broker_outage_telemetry_arrives_in_order_marked_historical(
    restartable_mosquitto: RunningBroker, topics: Topics, tmp_path: Path,
) -> None:
    broker = restartable_mosquitto
    # The observer has a persistent session, so the broker queues for it across the outage.
    observer = SyncClient(broker.host, broker.service_port, client_id="observer",
                          username=broker.cloud_username,
                          password=broker.password(broker.cloud_username), session_expiry=600)
    assert not observer.connect().is_failure
    observer.subscribe(topics.telemetry("dev-a"))
    agent = EdgeAgent(agent_settings(broker, topics, "dev-a", tmp_path / "dev-a",
                                     interval_s=0.1))
    agent.start()
    try:
        assert agent.session.connected.wait(10)
        observer.wait_for(lambda m: True)
        observer.close()

        broker.process.stop()

        def outbox() -> list[DeviceTelemetry]:
            return [decode_message(DeviceTelemetry, m.payload) for m in agent.buffer.peek(100)]

        wait_until(lambda: sum(t.historical for t in outbox()) >= 8,
                   what="8 telemetry messages produced offline")
        buffered = outbox()
        # What was produced offline is marked historical; the outbox may also hold the
        # few live messages that were in flight (not yet acknowledged) when it went down.
        live = [t.seq for t in buffered if not t.historical]
        offline = [t.seq for t in buffered if t.historical]
        assert not live or max(live) < min(offline)

        broker.process.start()
        wait_until(lambda: len(agent.buffer) == 0, timeout=20, what="buffer drained")
        observer = SyncClient(broker.host, broker.service_port, client_id="observer",
                              username=broker.cloud_username,
                              password=broker.password(broker.cloud_username),
                              session_expiry=600)
        assert not observer.connect().is_failure
        last = buffered[-1].seq
        observer.wait_for(lambda m: decode_message(DeviceTelemetry, m.payload).seq >= last,
                          timeout=20)
    finally:
        agent.stop()
    received = [decode_message(DeviceTelemetry, m.payload) for m in observer.messages]
    observer.close()
    seqs = [t.seq for t in received]
    assert seqs == sorted(seqs), "out of order"
    assert len(seqs) == len(set(seqs)), "duplicated"
    by_seq = {t.seq: t for t in received}
    for t in buffered:
        assert t.seq in by_seq, f"buffered telemetry seq {t.seq} lost"
        assert by_seq[t.seq].historical == t.historical
    assert seqs == list(range(seqs[0], seqs[-1] + 1)), "gap in the sequence"
