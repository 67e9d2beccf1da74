"""One hostile device floods every topic it may publish while a healthy fleet reports and
trains: the cloud stays up, stores everything valid, counts every refusal, and its memory
stays flat.

The hostile device sends 10,000 malformed messages of every kind it may publish (random
bytes, truncated JSON, wrong types, NaN/Infinity, integers beyond int64, deeply nested
JSON, payloads naming another device, far-future timestamps, 1-8 MiB payloads, invalid
safetensors), interleaved with 1,000 valid telemetry messages. Its budget is opened wide:
here every message must reach validation (the budget is tested on its own).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from edge_node.agent import EdgeAgent
from schemas.base import now
from schemas.topics import Topics
from tests.agent_fixtures import AgentFactory, wait_until
from tests.cloud_process import CloudProcess
from tests.conftest import RunningBroker
from tests.test_fl_rounds import TASK, device_fl, fl_config
from tests.test_hostile_input import flood

pytestmark = pytest.mark.integration
MALFORMED = 10_000
VALID = 1_000
WIDE_OPEN = {"rate_limit": {"messages_per_s": 1e9, "message_burst": 1e9,
                            "bytes_per_s": 1e15, "byte_burst": 1e15}}


def malformed(rng: random.Random, topics: Topics, me: str, other: str, session: str,
              ) -> tuple[str, bytes]:
    """One malformed message on one of the topics ``me`` may publish."""
    good: dict[str, Any] = {"device_id": me, "session_id": session, "seq": rng.randrange(10**6),
                            "ts": now(), "cpu_percent": 1.0, "memory_percent": 1.0,
                            "disk_percent": 1.0}
    topic = rng.choice([
        topics.telemetry(me), topics.model_metrics(me, "m"), topics.device_state(me),
        topics.deployment_status(me, "m"), topics.command_reply(me, "ping"),
        topics.update(TASK, rng.randrange(1, 9), me), topics.eval_result(TASK, 1, me),
    ])
    kind = rng.randrange(10)
    if kind == 0:
        payload = os.urandom(rng.randrange(1, 512))
    elif kind == 1:
        text = json.dumps(good)
        payload = text[: rng.randrange(1, len(text) - 1)].encode()
    elif kind == 2:
        payload = json.dumps({**good, "cpu_percent": "high", "seq": True}).encode()
    elif kind == 3:
        payload = json.dumps({**good, "cpu_percent": rng.choice([math.nan, math.inf])},
                             allow_nan=True).encode()
    elif kind == 4:
        payload = json.dumps({**good, "seq": 2**64 + rng.randrange(10)}).encode()
    elif kind == 5:
        depth = rng.randrange(1_000, 20_000)
        payload = b'{"a":' * depth + b"1" + b"}" * depth
    elif kind == 6:
        payload = json.dumps({**good, "device_id": other}).encode()
    elif kind == 7:
        payload = json.dumps({**good, "ts": now() + 10 * 365 * 86_400}).encode()
    elif kind == 8:
        payload = b"\x08\x00\x00\x00\x00\x00\x00\x00{\"x\":1}" + os.urandom(16)  # safetensors
    else:
        payload = b"{}"
    return topic, payload


def test_a_flooding_device_hurts_nobody(
    mosquitto: RunningBroker, topics: Topics, tmp_path: Path, make_agent: AgentFactory,
    new_device_id: Callable[[], str],
) -> None:
    seed = int(os.environ.get("EDGEFL_FAULT_SEED") or random.randrange(1 << 30))
    print(f"flood seed {seed}")
    rng = random.Random(seed)
    cloud = CloudProcess(mosquitto, topics, tmp_path / "cloud", instance="flood",
                         ingest=WIDE_OPEN, health_interval_s=1.0,
                         fl={TASK: fl_config(rounds=8, min_fit_clients=2,
                                             min_available_clients=2)})
    agents: list[EdgeAgent] = []
    try:
        cloud.start()
        agents = [make_agent(fl=device_fl(i, 2), interval_s=0.1) for i in range(2)]
        healthy = agents[0]
        hostile_id = new_device_id()
        hostile = mosquitto.connected(hostile_id)
        assert cloud.proc is not None
        process = psutil.Process(cloud.proc.pid)
        # The baseline: after two released rounds (evaluation and aggregation warmed up).
        wait_until(lambda: len(cloud.rows("SELECT 1 FROM fl_rounds")) >= 2, timeout=60,
                   what="training under way")
        rss_start = process.memory_info().rss
        session = "flood"
        plan: list[tuple[str, bytes]] = []
        for _ in range(MALFORMED):
            plan.append(malformed(rng, topics, hostile_id, healthy.device_id, session))
        for i in range(20):  # 1-8 MiB payloads, spread over the flood
            size = rng.randrange(1 << 20, 8 << 20)
            plan[rng.randrange(len(plan))] = (rng.choice([topics.telemetry(hostile_id),
                                                          topics.update(TASK, 1, hostile_id)]),
                                              os.urandom(size) if i % 2 else b"{" * size)
        valid = [(topics.telemetry(hostile_id), json.dumps({
            "device_id": hostile_id, "session_id": session, "seq": seq, "ts": now(),
            "cpu_percent": 5.0, "memory_percent": 5.0, "disk_percent": 5.0}).encode())
            for seq in range(VALID)]
        # Interleaved at random places, in their own order (as a device sends them).
        places = sorted(rng.randrange(len(plan) + 1) for _ in valid)
        for offset, (place, item) in enumerate(zip(places, valid, strict=True)):
            plan.insert(place + offset, item)
        started = time.monotonic()
        sent = Counter(topics.parse(topic).kind.value for topic, _ in plan)
        for topic, payload in plan:
            flood(hostile, topic, [payload])
        flood_s = time.monotonic() - started

        def refused_total() -> int:
            rows = cloud.rows("SELECT value FROM kv WHERE key='cloud_health'")
            health = json.loads(rows[0][0]) if rows else {"refused": {}}
            return sum(sum(r.values()) for r in health["refused"].values())

        stored_valid = ("SELECT COUNT(*) FROM telemetry WHERE device_id=? AND session_id=?",
                        (hostile_id, session))
        wait_until(lambda: cloud.rows(*stored_valid)[0][0] == VALID, timeout=120,
                   what="every valid message of the hostile device stored")
        wait_until(lambda: refused_total() >= MALFORMED, timeout=120,
                   what="every malformed message refused and counted")
        def task_state() -> str | None:
            rows = cloud.rows("SELECT value FROM kv WHERE key=?", (f"fl:{TASK}",))
            return str(json.loads(rows[0][0])["state"]) if rows else None

        wait_until(lambda: task_state() in ("finished", "failed"), timeout=120,
                   what="the task ended")
        assert task_state() == "finished"
        rss_end = process.memory_info().rss
        assert cloud.running(), "the cloud died"
        for agent in agents:
            agent.stop()
        expected = {a.device_id: {a.session_id: a.telemetry_seq} for a in agents}
        cloud.wait_stored(expected, timeout=60)
        health = json.loads(cloud.rows("SELECT value FROM kv WHERE key='cloud_health'")[0][0])
        by_reason: Counter[str] = Counter()
        for kind, reasons in health["refused"].items():
            for reason, count in reasons.items():
                by_reason[f"{kind}/{reason}"] += count
        print(json.dumps({
            "seed": seed, "malformed": MALFORMED, "valid": VALID,
            "sent_by_topic_kind": dict(sorted(sent.items())),
            "flood_seconds": round(flood_s, 1), "refused": sum(by_reason.values()),
            "refused_by_kind_and_reason": dict(sorted(by_reason.items())),
            "rate_limited": health["rate_limited"],
            "rss_mib_start": round(rss_start / 2**20, 1),
            "rss_mib_end": round(rss_end / 2**20, 1)}, indent=1))
        assert sum(by_reason.values()) == MALFORMED, "every malformed message counted once"
        assert health["rate_limited"] == {}
        assert rss_end <= rss_start * 1.2, (rss_start, rss_end)
        hostile.close()
    finally:
        for agent in agents:
            if agent._thread is not None and agent._thread.is_alive():
                agent.stop()
        cloud.close()
