"""The federated coordinator under faults (real Mosquitto): retried rounds, broker outages,
replayed updates, concurrent messages, stale plans, membership, and `fl start`'s exit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

from cloud.service import ServiceThread
from schemas.base import decode_message, now
from schemas.fl import RoundPlan, TaskState, TaskStatus
from schemas.topics import Topics
from tests.agent_fixtures import AgentFactory, wait_until
from tests.cloud_fixtures import CloudFactory
from tests.cloud_process import CloudProcess
from tests.conftest import RunningBroker
from tests.test_cloud_faults import cloud_settings
from tests.test_fl_faults import HandDevice, zeros
from tests.test_fl_rounds import TASK, device_fl, fl_config

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]
STATE_ORDER = {"waiting": 0, "round_open": 1, "collecting": 2, "aggregating": 3,
               "evaluating": 4, "released": 5, "finished": 6, "failed": 6}


def statuses(watcher: object) -> list[TaskStatus]:
    from tests.mqtt_client import SyncClient

    assert isinstance(watcher, SyncClient)
    return [decode_message(TaskStatus, m.payload) for m in watcher.messages if m.payload
            and m.topic.endswith(f"/fl/{TASK}/status")]


def test_a_retried_round_keeps_earlier_updates_and_retrains_on_a_new_attempt(
    make_cloud: CloudFactory, make_agent: AgentFactory, mosquitto: RunningBroker,
    topics: Topics, new_device_id: Callable[[], str],
) -> None:
    cloud = make_cloud(fl={TASK: fl_config(rounds=1, min_fit_clients=2, min_available_clients=2,
                                           round_timeout_s=3, max_round_retries=3,
                                           accept_failures=True)})
    silent = HandDevice(mosquitto, topics, new_device_id())
    a = make_agent(fl=device_fl(0, 2))
    plan = silent.plan()
    assert sorted(plan.selected) == sorted([a.device_id, silent.id])
    wait_until(lambda: a.fl.updates_sent == 1, timeout=20, what="a trained attempt 0")
    b = make_agent(fl=device_fl(1, 2))  # online before the retry
    coordinator = cloud.service.coordinators[TASK]
    wait_until(lambda: coordinator.state.state in (TaskState.FINISHED, TaskState.FAILED),
               timeout=30, what="the round closed")
    assert coordinator.state.state is TaskState.FINISHED, coordinator.state.message
    record = coordinator.history()[-1]
    assert record.participants == sorted([a.device_id, b.device_id])
    assert a.fl.updates_sent == 1, "a's attempt-0 update was kept, not asked again"
    silent.client.close()


@pytest.mark.parametrize("outage", ["hang", "restart"])
def test_a_broker_outage_while_the_round_closes_does_not_leave_it_aggregating(
    restartable_mosquitto: RunningBroker, topics: Topics, tmp_path: Path, outage: str,
) -> None:
    broker = restartable_mosquitto
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules: []\n")
    service = ServiceThread(cloud_settings(
        broker, topics, tmp_path / "c", rules,
        fl={TASK: fl_config(rounds=1, min_fit_clients=1, min_available_clients=2,
                            round_timeout_s=3)})).start()
    try:
        a = HandDevice(broker, topics, "dev-a")
        b = HandDevice(broker, topics, "dev-b")  # selected, never answers
        plan = a.plan()
        delta = zeros(a.global_weights(plan.global_version))
        a.send(plan, delta)
        coordinator = service.service.coordinators[TASK]
        wait_until(lambda: a.id in coordinator.accepted, what="a's update stored")
        connections = service.service.connections
        if outage == "hang":
            pid = broker.process.pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)  # the broker hangs as the deadline passes
            try:
                wait_until(lambda: now() > plan.deadline + 12, timeout=30,
                           what="the deadline passed while the broker hung")
            finally:
                os.kill(pid, signal.SIGCONT)
        else:  # the broker goes away as the deadline passes, and comes back
            broker.process.stop()
            wait_until(lambda: now() > plan.deadline + 2, timeout=30,
                       what="the deadline passed while the broker was away")
            broker.process.start()
            wait_until(lambda: service.service.connections > connections, timeout=30,
                       what="the cloud reconnected")
        wait_until(lambda: coordinator.state.state is TaskState.FINISHED, timeout=60,
                   what="the round completed after the outage")
        for device in (a, b):
            device.client.close()
    finally:
        service.stop()


def test_replayed_updates_of_an_earlier_round_do_not_close_the_open_one(
    make_cloud: CloudFactory, mosquitto: RunningBroker, topics: Topics,
    new_device_id: Callable[[], str],
) -> None:
    cloud = make_cloud(fl={TASK: fl_config(rounds=2, min_fit_clients=2, min_available_clients=2,
                                           accept_failures=False)})
    a = HandDevice(mosquitto, topics, new_device_id())
    b = HandDevice(mosquitto, topics, new_device_id())
    first = a.plan(1)
    delta = zeros(a.global_weights(first.global_version))
    for device in (a, b):
        device.send(first, delta)
    second = a.plan(2)
    for _ in range(4):  # old round-1 updates, replayed
        for device in (a, b):
            device.send(first, delta)
    coordinator = cloud.service.coordinators[TASK]
    wait_until(lambda: coordinator.fl_store.rejections(1).counts.get("stale_round", 0) == 8,
               what="8 replays refused")
    assert coordinator.state.state.value == "collecting"
    assert coordinator.state.current is not None and coordinator.state.current.round == 2
    for device in (a, b):
        device.send(second, delta)
    wait_until(lambda: coordinator.state.state in (TaskState.FINISHED, TaskState.FAILED),
               timeout=30, what="task ended")
    assert coordinator.state.state is TaskState.FINISHED, coordinator.state.message
    assert coordinator.history()[-1].participants == sorted([a.id, b.id])
    assert coordinator.history()[-1].rejected_counts == {}
    for device in (a, b):
        device.client.close()


def test_many_concurrent_updates_and_ticks_keep_the_status_in_order(
    make_cloud: CloudFactory, mosquitto: RunningBroker, topics: Topics,
    new_device_id: Callable[[], str],
) -> None:
    cloud = make_cloud(fl={TASK: fl_config(rounds=6, min_fit_clients=3, min_available_clients=3,
                                           accept_failures=False)})
    watcher = mosquitto.connected(mosquitto.cloud_username)
    watcher.subscribe(topics.task_status(TASK))
    devices = [HandDevice(mosquitto, topics, new_device_id()) for _ in range(3)]
    delta: dict[str, np.ndarray] | None = None
    for round_ in range(1, 7):
        plans = [d.plan(round_) for d in devices]
        if delta is None:
            delta = zeros(devices[0].global_weights(plans[0].global_version))
        for _ in range(5):  # every update five times: redeliveries, each one a tick
            for device, plan in zip(devices, plans, strict=True):
                device.send(plan, delta)
    coordinator = cloud.service.coordinators[TASK]
    wait_until(lambda: coordinator.state.state is TaskState.FINISHED, timeout=60,
               what="6 rounds")
    watcher.wait_for(lambda m: json.loads(m.payload)["state"] == "finished")
    seen = [(s.round, STATE_ORDER[s.state.value]) for s in statuses(watcher)]
    assert seen == sorted(seen), f"status went backwards: {seen}"
    assert [h.round for h in coordinator.history()] == [1, 2, 3, 4, 5, 6]
    # Each extra copy is a duplicate while its round is open, and refused as stale after.
    def extra_copies() -> int:
        return int(cloud.service.counters["fl_duplicate_update"]) + sum(
            coordinator.fl_store.rejections(r).counts.get(reason, 0)
            for r in range(1, 7) for reason in ("stale_round", "task_ended"))

    wait_until(lambda: extra_copies() >= 6 * 3 * 4, what="every copy handled")
    assert extra_copies() == 6 * 3 * 4
    watcher.close()
    for device in devices:
        device.client.close()


def test_a_device_does_not_train_on_an_expired_retained_plan(
    make_agent: AgentFactory, mosquitto: RunningBroker, topics: Topics, tmp_path: Path,
    new_device_id: Callable[[], str],
) -> None:
    device_id = new_device_id()
    cloud = mosquitto.connected(mosquitto.cloud_username)
    cloud.subscribe(f"{topics.root}/fl/{TASK}/rounds/+/updates/+")
    issued = now() - 120
    plan = RoundPlan(task=TASK, round=7, global_version="6", selected=[device_id],
                     issued_at=issued, deadline=issued + 60, strategy="fedavg")
    assert cloud.publish(topics.round_plan(TASK), plan.to_json(), retain=True) in (0, 0x10)
    agent = make_agent(device_id, fl=device_fl(0, 2))
    wait_until(lambda: agent.counters["fl_plan_expired"] == 1, what="expired plan seen")
    assert agent.fl.updates_sent == 0
    assert agent.counters["fl_late_update_dropped"] == 0, "it trained for nothing"
    assert cloud.publish(topics.round_plan(TASK), b"", retain=True) in (0, 0x10)
    cloud.close()


@pytest.mark.parametrize("ending", [TaskState.FAILED, TaskState.FINISHED])
def test_an_ended_task_clears_its_retained_plan(
    make_cloud: CloudFactory, mosquitto: RunningBroker, topics: Topics,
    new_device_id: Callable[[], str], ending: TaskState,
) -> None:
    cloud = make_cloud(fl={TASK: fl_config(
        rounds=1, min_fit_clients=2, min_available_clients=2,
        round_timeout_s=1.5 if ending is TaskState.FAILED else 30, accept_failures=False)})
    devices = [HandDevice(mosquitto, topics, new_device_id()) for _ in range(2)]
    plan = devices[0].plan()
    if ending is TaskState.FINISHED:
        weights = devices[0].global_weights(plan.global_version)
        for device in devices:
            device.send(plan, zeros(weights))
    coordinator = cloud.service.coordinators[TASK]
    wait_until(lambda: coordinator.state.state is ending, timeout=20,
               what=f"the task {ending.value}")
    status = mosquitto.connected(mosquitto.cloud_username)
    status.subscribe(topics.task_status(TASK))
    # The clear is published before the final status: once that is retained, so is the clear.
    status.wait_for(lambda m: decode_message(TaskStatus, m.payload).state is ending, timeout=20)
    status.close()
    late = mosquitto.connected(mosquitto.cloud_username)
    late.subscribe(topics.round_plan(TASK))
    marker = f"{topics.root}/devices/{devices[0].id}/cmd/marker"
    late.subscribe(marker)
    assert late.publish(marker, b"{}") in (0, 0x10)
    late.wait_topic(marker)  # retained messages of earlier subscriptions came before it
    assert [m for m in late.received_on(topics.round_plan(TASK)) if m.payload] == []
    late.close()
    for device in devices:
        device.client.close()


def test_only_members_of_the_task_are_selected(
    make_cloud: CloudFactory, mosquitto: RunningBroker, topics: Topics,
    new_device_id: Callable[[], str],
) -> None:
    outsider = HandDevice(mosquitto, topics, new_device_id(), member=False)
    members = [HandDevice(mosquitto, topics, new_device_id()) for _ in range(2)]
    cloud = make_cloud(fl={TASK: fl_config(rounds=1, min_fit_clients=2,
                                           min_available_clients=2)})
    plan = members[0].plan()
    assert sorted(plan.selected) == sorted(d.id for d in members)
    assert outsider.id not in plan.evaluate
    del cloud
    for device in (outsider, *members):
        device.client.close()


def test_fl_start_exits_non_zero_when_the_task_fails_and_prints_a_summary(
    mosquitto: RunningBroker, topics: Topics, tmp_path: Path,
    new_device_id: Callable[[], str],
) -> None:
    cloud = CloudProcess(mosquitto, topics, tmp_path / "cloud", instance="flstart")
    task = tmp_path / "task.yaml"  # the task's settings in a file of its own
    task.write_text(yaml.safe_dump({
        "data_dir": str(tmp_path / "cloud" / "data"),
        "fl": {TASK: fl_config(rounds=1, min_fit_clients=2, min_available_clients=2,
                               round_timeout_s=1.5, accept_failures=False)}}))
    devices = [HandDevice(mosquitto, topics, new_device_id()) for _ in range(2)]
    try:
        cloud.start()
        started = time.monotonic()
        result = _fl(["start", "--name", TASK, "--config", str(task)])
        assert result.returncode == 1, result.stdout + result.stderr
        summary = " ".join(result.stdout.split())  # rich wraps long lines
        assert f"task {TASK} started by the cloud service" in summary
        assert f"task {TASK}: failed" in summary
        assert "fewer than min_fit_clients" in summary
        assert time.monotonic() - started < 60
        again = _fl(["start", "--name", TASK, "--config", str(task)])
        assert again.returncode == 1 and f"a task named '{TASK}' exists" in again.stderr
        assert cloud.running(), "one service: fl start ran none of its own"
        assert len(cloud.rows("SELECT state FROM fl_task_requests")) == 2
    finally:
        cloud.close()
        for device in devices:
            device.client.close()


def test_fl_start_refuses_bad_input_in_one_line_and_needs_a_running_service(
    tmp_path: Path,
) -> None:
    from cloud.storage.sqlite_store import SqliteStore

    data = tmp_path / "cloud"
    SqliteStore(data / "edgefl.sqlite3").close()
    robust_dp = tmp_path / "robust-dp.yaml"
    robust_dp.write_text("strategy: median\nprivacy: {clip_norm: 1.0, noise_multiplier: 1.0}\n")
    typo = tmp_path / "typo.yaml"
    typo.write_text("privacy: {clip_norm: 1.0, noise_multiplier: 1.0, epsilon: 3}\n")
    for options, expected in ((["--task", "nowhere.module:Task"], "nowhere"),
                              (["--strategy", "fedmagic"], "fedmagic"),
                              (["--name", "bad name"], "task name"),
                              (["--task-file", str(robust_dp)], "needs every update"),
                              (["--task-file", str(typo)], "epsilon"),
                              (["--task-file", str(tmp_path / "none.yaml")], "none.yaml")):
        result = _fl(["start", "--data-dir", str(data), *options])
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stderr.count("\n") == 1 and expected in result.stderr, result.stderr
    lonely = _fl(["start", "--data-dir", str(data), "--wait", "1"])
    assert lonely.returncode == 1
    assert "no cloud service picked the task up" in lonely.stderr


def _fl(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgefl", "fl", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)


def test_a_device_trains_again_on_a_new_attempt_of_the_same_round(tmp_path: Path) -> None:
    """Item 4, the device's side: a round retried as attempt 1 is trained again (the
    update of attempt 0 never arrived), while a repeated plan of one attempt is not."""
    from edge_node.counters import Counters
    from edge_node.fl_client import FLClient
    from edge_node.settings import FLSettings
    from fl_tasks.base import get_weights, load_task
    from schemas.codec import decode, encode
    from schemas.fl import GlobalModelEnvelope, UpdateEnvelope

    topics = Topics()
    sent: list[tuple[str, bytes]] = []
    client = FLClient("dev-a", topics, FLSettings.model_validate(device_fl(0, 3)),
                      publish=lambda topic, payload: sent.append((topic, payload)),
                      subscribe=lambda *a: None, counters=Counters(),
                      state_dir=tmp_path / "fl")
    task = load_task("fl_tasks.digits:DigitsTask")
    weights = {k: np.asarray(v, np.float32) for k, v in get_weights(task.build_model()).items()}
    client._weights(TASK, "v0", encode(weights, GlobalModelEnvelope(
        task=TASK, version="v0", round=0, created_at=now())))

    def plan(attempt: int) -> bytes:
        return RoundPlan(task=TASK, round=1, attempt=attempt, global_version="v0",
                         selected=["dev-a"], issued_at=now(), deadline=now() + 60,
                         strategy="fedavg").to_json()

    client._plan(TASK, plan(0))
    client._plan(TASK, plan(0))  # the same retained plan again (a reconnect)
    client._plan(TASK, plan(1))
    updates = [decode(payload, UpdateEnvelope).envelope for topic, payload in sent
               if topic == topics.update(TASK, 1, "dev-a")]
    assert [u.attempt for u in updates] == [0, 1]


def test_a_device_whose_training_diverges_trains_again_in_the_next_round(
        tmp_path: Path) -> None:
    """A non-finite loss (TrainingError) is counted and the device's training thread
    goes on: before, it ended the thread and the device never trained again."""
    from edge_node.counters import Counters
    from edge_node.fl_client import FLClient
    from edge_node.settings import FLSettings
    from fl_tasks.base import get_weights, load_task
    from schemas.codec import decode, encode
    from schemas.fl import GlobalModelEnvelope, HyperParams, UpdateEnvelope

    topics = Topics()
    sent: list[tuple[str, bytes]] = []
    counters = Counters()
    client = FLClient("dev-a", topics, FLSettings.model_validate(device_fl(0, 3)),
                      publish=lambda topic, payload: sent.append((topic, payload)),
                      subscribe=lambda *a: None, counters=counters,
                      state_dir=tmp_path / "fl")
    task = load_task("fl_tasks.digits:DigitsTask")
    weights = {k: np.asarray(v, np.float32) for k, v in get_weights(task.build_model()).items()}
    # Finite weights whose logits overflow float32: the first batch's loss is not finite.
    blown = {k: v * np.float32(1e20) for k, v in weights.items()}

    def version(name: str, tensors: dict[str, np.ndarray], round_: int) -> bytes:
        return encode(tensors, GlobalModelEnvelope(task=TASK, version=name, round=round_,
                                                   created_at=now()))

    def plan(round_: int, global_version: str) -> bytes:
        return RoundPlan(task=TASK, round=round_, global_version=global_version,
                         selected=["dev-a"], issued_at=now(), deadline=now() + 60,
                         strategy="fedavg",
                         hyperparams=HyperParams(local_epochs=1, batch_size=16)).to_json()

    def rounds_sent() -> list[int]:
        return [decode(payload, UpdateEnvelope).envelope.round for _, payload in sent]

    client.start()
    try:
        client.on_global_weights(TASK, "v1", version("v1", blown, 1))
        client.on_round_plan(TASK, plan(1, "v1"))  # diverges
        client.on_global_weights(TASK, "v2", version("v2", weights, 2))
        client.on_round_plan(TASK, plan(2, "v2"))
        wait_until(lambda: rounds_sent() == [2], timeout=60, what="round 2's update alone")
        assert counters["fl_diverged"] == 1
    finally:
        client.stop()
