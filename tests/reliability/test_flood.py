"""One hostile device floods every topic the cloud subscribes to while a healthy fleet
reports and trains: the cloud stays up, stores everything valid, counts every refusal, and
its memory stays flat; with one cloud instance, and with two sharing the load.

The hostile device sends 10,000 malformed messages on every topic the cloud subscribes to
(random bytes, truncated JSON, wrong types, NaN/Infinity, integers beyond int64, deeply
nested JSON, payloads naming another device, far-future timestamps, 1-8 MiB payloads,
invalid safetensors), interleaved with 1,000 valid telemetry messages. Its budget is opened
wide: here every message must reach validation (the budget is tested on its own). The
cloud's own ``cloud/state`` is among the topics: the broker's ACL keeps a device off it
(a forged ``online`` there would pass for a twin of the cloud), so those never arrive.

With two instances, telemetry and model metrics are split through a shared subscription
(``$share``) and each message is refused or stored by exactly one of them; every other
topic reaches both, so both see the same stream there. The second instance runs no task:
it refuses every federated message as ``unknown_task``.
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
SESSION = "flood"
WIDE_OPEN = {"rate_limit": {"messages_per_s": 1e9, "message_burst": 1e9,
                            "bytes_per_s": 1e15, "byte_burst": 1e15}}


SHARED = ("telemetry", "model_metrics")
"""Split between instances by the shared subscription; the other kinds reach every instance."""
FL_KINDS = ("update", "eval", "secagg_device")


def malformed(rng: random.Random, topics: Topics, me: str, other: str, session: str,
              instance: str) -> tuple[str, bytes]:
    """One malformed message on one of the topics the cloud subscribes to."""
    good: dict[str, Any] = {"device_id": me, "session_id": SESSION, "seq": rng.randrange(10**6),
                            "ts": now(), "cpu_percent": 1.0, "memory_percent": 1.0,
                            "disk_percent": 1.0}
    topic = rng.choice([
        topics.telemetry(me), topics.model_metrics(me, "m"), topics.device_state(me),
        topics.deployment_status(me, "m"), topics.command_reply(me, "ping"),
        topics.update(TASK, rng.randrange(1, 9), me), topics.eval_result(TASK, 1, me),
        topics.secagg_device(TASK, 1, rng.choice(["keys", "shares", "masked"]), me),
        topics.cloud_state(),
    ])
    if topic == topics.cloud_state():  # a forged announcement of the cloud's instance
        return topic, json.dumps({"instance": instance, "state": "online", "ts": now(),
                                  "run": f"forged{rng.randrange(10**6)}"}).encode()
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


def _health(cloud: CloudProcess) -> dict[str, Any]:
    rows = cloud.rows("SELECT value FROM kv WHERE key='cloud_health'")
    return dict(json.loads(rows[0][0])) if rows else {"refused": {}}


def _refused(health: dict[str, Any], kind: str) -> int:
    return sum(health["refused"].get(kind, {}).values())


def _seen(health: dict[str, Any], kind: str) -> int:
    """Every message of ``kind`` the instance counted: accepted, duplicate or refused."""
    return (int(health.get("accepted", {}).get(kind, 0))
            + int(health.get("duplicates", {}).get(kind, 0)) + _refused(health, kind))


def _report(health: dict[str, Any], rss_start: int, rss_end: int) -> dict[str, Any]:
    by_reason: Counter[str] = Counter()
    for kind, reasons in health["refused"].items():
        for reason, count in reasons.items():
            by_reason[f"{kind}/{reason}"] += count
    return {"refused": sum(by_reason.values()),
            "refused_by_kind_and_reason": dict(sorted(by_reason.items())),
            "stored_telemetry": health.get("stored", {}).get("telemetry", 0),
            "rate_limited": health["rate_limited"], "errors": health.get("errors", {}),
            "rss_mib_start": round(rss_start / 2**20, 1),
            "rss_mib_end": round(rss_end / 2**20, 1)}


def _all_counted(clouds: list[CloudProcess], sent: Counter[str]) -> bool:
    """Every malformed message refused where it went, and the counts settled.

    A shared kind is refused by one instance or the other; any other kind by the first
    (the one with the task) and seen alike by every instance.
    """
    healths = [_health(each) for each in clouds]
    for kind, count in sent.items():
        if kind in SHARED:
            if sum(_refused(h, kind) for h in healths) != count:
                return False
        elif _refused(healths[0], kind) != count:
            return False
    return all(_seen(h, kind) == _seen(healths[0], kind)
               for h in healths[1:] for kind in sent if kind not in SHARED)


def _flood_plan(rng: random.Random, topics: Topics, hostile_id: str, other_id: str,
                instance: str) -> tuple[list[tuple[str, bytes]], Counter[str], int]:
    """The flood in sending order, the malformed messages the clouds receive by topic kind,
    and how many the ACL keeps out."""
    plan = [malformed(rng, topics, hostile_id, other_id, SESSION, instance)
            for _ in range(MALFORMED)]
    for i in range(20):  # 1-8 MiB payloads, spread over the flood
        size = rng.randrange(1 << 20, 8 << 20)
        plan[rng.randrange(len(plan))] = (rng.choice([topics.telemetry(hostile_id),
                                                      topics.update(TASK, 1, hostile_id)]),
                                          os.urandom(size) if i % 2 else b"{" * size)
    sent = Counter(topics.parse(topic).kind.value for topic, _ in plan)
    denied = sent.pop("cloud_state", 0)  # the ACL keeps them from every cloud
    assert denied and set(sent) == {
        "telemetry", "model_metrics", "device_state", "deployment_status",
        "command_reply", "update", "eval", "secagg_device"}, sent
    valid = [(topics.telemetry(hostile_id), json.dumps({
        "device_id": hostile_id, "session_id": SESSION, "seq": seq, "ts": now(),
        "cpu_percent": 5.0, "memory_percent": 5.0, "disk_percent": 5.0}).encode())
        for seq in range(VALID)]
    # Interleaved at random places, in their own order (as a device sends them).
    places = sorted(rng.randrange(len(plan) + 1) for _ in valid)
    for offset, (place, item) in enumerate(zip(places, valid, strict=True)):
        plan.insert(place + offset, item)
    return plan, sent, denied


def _check(healths: list[dict[str, Any]], sent: Counter[str], malformed: int,
           rss_start: list[int], rss_end: list[int]) -> None:
    """What each instance counted, and its memory."""
    for index, (health, start, end) in enumerate(zip(healths, rss_start, rss_end, strict=True)):
        assert health["rate_limited"] == {}
        assert "cloud_state" not in health["refused"]
        assert "twin_instance" not in health.get("errors", {}), "a forged state got in"
        assert end <= start * 1.2, (index, start, end)
    first = healths[0]
    assert sum(_refused(first, kind) for kind in sent if kind not in SHARED) + sum(
        _refused(h, kind) for h in healths for kind in SHARED) == malformed
    for health in healths[1:]:  # no task here: every federated message is unknown_task
        for kind in FL_KINDS:
            assert set(health["refused"].get(kind, {})) <= {"unknown_task"}, health
    if len(healths) > 1:
        assert all(h.get("stored", {}).get("telemetry", 0) > 0 for h in healths), \
            "both instances took a share of the telemetry"


@pytest.mark.parametrize("instances", [1, 2], ids=["one_cloud", "two_clouds_shared"])
def test_a_flooding_device_hurts_nobody(
    mosquitto: RunningBroker, topics: Topics, tmp_path: Path, make_agent: AgentFactory,
    new_device_id: Callable[[], str], instances: int,
) -> None:
    seed = int(os.environ.get("EDGEFL_FAULT_SEED") or random.randrange(1 << 30))
    print(f"flood seed {seed}")
    rng = random.Random(seed)
    shared = {"mqtt": {"shared_group": "ingest"}} if instances > 1 else {}
    clouds = [CloudProcess(mosquitto, topics, tmp_path / "cloud", instance=f"flood{instances}",
                           ingest=WIDE_OPEN, health_interval_s=1.0, **shared,
                           fl={TASK: fl_config(rounds=8, min_fit_clients=2,
                                               min_available_clients=2)})]
    if instances > 1:
        clouds.append(CloudProcess(mosquitto, topics, tmp_path / "cloud2", instance="flood2b",
                                   ingest=WIDE_OPEN, health_interval_s=1.0, **shared))
    cloud = clouds[0]  # the one that runs the task
    agents: list[EdgeAgent] = []
    try:
        for each in clouds:
            each.start()
        agents = [make_agent(fl=device_fl(i, 2), interval_s=0.1) for i in range(2)]
        healthy = agents[0]
        hostile_id = new_device_id()
        hostile = mosquitto.connected(hostile_id)
        processes = [psutil.Process(each.proc.pid)  # type: ignore[union-attr]
                     for each in clouds]
        # The baseline: after two released rounds (evaluation and aggregation warmed up).
        wait_until(lambda: len(cloud.rows("SELECT 1 FROM fl_rounds")) >= 2, timeout=60,
                   what="training under way")
        rss_start = [p.memory_info().rss for p in processes]
        plan, sent, denied = _flood_plan(rng, topics, hostile_id, healthy.device_id,
                                         cloud.instance)
        started = time.monotonic()
        for topic, payload in plan:
            flood(hostile, topic, [payload])
        flood_s = time.monotonic() - started

        def stored_valid() -> list[int]:
            return sorted(seq for each in clouds
                          for seqs in each.telemetry_seqs(hostile_id).values() for seq in seqs)

        wait_until(lambda: len(stored_valid()) >= VALID, timeout=120,
                   what="every valid message of the hostile device stored")
        assert stored_valid() == list(range(VALID)), "each valid message stored once, in all"

        wait_until(lambda: _all_counted(clouds, sent), timeout=120,
                   what="every malformed message refused and counted")

        def task_state() -> str | None:
            rows = cloud.rows("SELECT value FROM kv WHERE key=?", (f"fl:{TASK}",))
            return str(json.loads(rows[0][0])["state"]) if rows else None

        wait_until(lambda: task_state() in ("finished", "failed"), timeout=120,
                   what="the task ended")
        assert task_state() == "finished"
        rss_end = [p.memory_info().rss for p in processes]
        assert all(each.running() for each in clouds), "a cloud died"
        for agent in agents:
            agent.stop()

        def healthy_seqs(agent: EdgeAgent) -> list[int]:
            return sorted(seq for each in clouds for seq in each.telemetry_seqs(
                agent.device_id).get(agent.session_id, []))

        for agent in agents:  # each healthy reading stored once, by one of the instances
            wait_until(lambda a=agent: healthy_seqs(a) == list(range(a.telemetry_seq)),  # type: ignore[misc]
                       timeout=60, what=f"{agent.device_id}'s telemetry stored once")
        healths = [_health(each) for each in clouds]
        print(json.dumps({"seed": seed, "instances": instances, "malformed": MALFORMED,
                          "valid": VALID, "denied_by_acl": denied,
                          "sent_by_topic_kind": dict(sorted(sent.items())),
                          "flood_seconds": round(flood_s, 1),
                          "clouds": [_report(h, start, end) for h, start, end in zip(
                              healths, rss_start, rss_end, strict=True)]}, indent=1))
        _check(healths, sent, MALFORMED - denied, rss_start, rss_end)
        hostile.close()
    finally:
        for agent in agents:
            if agent._thread is not None and agent._thread.is_alive():
                agent.stop()
        for each in clouds:
            each.close()
