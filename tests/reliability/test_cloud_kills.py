"""The cloud SIGKILLed in each phase that owns state: a round collecting updates, a round
being aggregated, a rollout on probation. Each resumes from what was committed and completes:
nothing acknowledged is lost, nothing is counted twice (real broker, real cloud processes).
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from broker.device_identity import load_identity_key
from cloud.models.formats import ArtifactFormat
from cloud.models.registry import ModelRegistry
from cloud.models.rollout import RolloutSpec
from cloud.models.rollout_store import RolloutStore
from cloud.releases import save_signing_key
from cloud.storage.sqlite_store import SqliteStore
from schemas.base import decode_message
from schemas.codec import decode
from schemas.fl import GlobalModelEnvelope
from schemas.secagg import (
    ADVERTISE,
    MASKED,
    ROSTER,
    SHARES,
    DeviceIdentity,
    SecAggDevice,
    SecAggRoster,
)
from schemas.topics import TopicKind, Topics
from tests.agent_fixtures import AgentFactory, wait_until
from tests.cloud_process import CloudProcess
from tests.conftest import RunningBroker
from tests.mqtt_client import SyncClient
from tests.releases import KEY_ID, SIGNING_KEY, export_onnx, mlp
from tests.test_fl_faults import HandDevice, zeros
from tests.test_fl_rounds import TASK, fl_config
from tests.test_rollouts import MODEL, _active
from tests.test_secagg_rounds import CLIP, STEP, secagg_fl, secagg_task

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return export_onnx(mlp(1), tmp_path_factory.mktemp("models") / "model.onnx")


def test_cloud_killed_while_collecting_resumes_without_losing_or_doubling_updates(
    mosquitto: RunningBroker, topics: Topics, tmp_path: Path,
    new_device_id: Callable[[], str],
) -> None:
    password = tmp_path / "pw"
    password.write_text(mosquitto.password(mosquitto.cloud_username))
    config = tmp_path / "cloud.yaml"
    config.write_text(yaml.safe_dump({
        "instance": "fl-kill", "topic_root": topics.root, "data_dir": str(tmp_path / "cloud"),
        "mqtt": {"host": mosquitto.host, "port": mosquitto.service_port,
                 "password_file": str(password)},
        "fl": {TASK: fl_config(rounds=1, min_fit_clients=2, min_available_clients=2,
                               round_timeout_s=120)},
    }))
    command = [sys.executable, "-m", "edgefl", "cloud", "--config", str(config)]
    a = HandDevice(mosquitto, topics, new_device_id())
    b = HandDevice(mosquitto, topics, new_device_id())
    first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    second = None
    try:
        plan = a.plan()
        good = zeros(a.global_weights(plan.global_version))
        name = next(iter(good))
        a.send(plan, {**good, name: good[name] + 0.5})
        store = tmp_path / "cloud" / "edgefl.sqlite3"
        wait_until(lambda: _accepted(store, a.id), timeout=20, what="a's update persisted")
        first.send_signal(signal.SIGKILL)
        first.wait()
        second = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        watcher = SyncClient(mosquitto.host, mosquitto.service_port, client_id="fl-kill-watch",
                             username=mosquitto.cloud_username,
                             password=mosquitto.password(mosquitto.cloud_username))
        assert not watcher.connect().is_failure
        watcher.subscribe(topics.task_status(TASK))
        watcher.wait_for(lambda m: json.loads(m.payload)["state"] == "collecting"
                         and json.loads(m.payload)["round"] >= 1, timeout=30)
        a.send(plan, {**good, name: good[name] + 0.5})  # redelivered: must count once
        b.send(plan, good)
        done = watcher.wait_for(lambda m: json.loads(m.payload)["state"] == "finished",
                                timeout=60)
        status = json.loads(done.payload)
        assert sorted(status["participants"]) == sorted([a.id, b.id])
        weights = decode((tmp_path / "cloud" / "fl" / TASK / "global-1.safetensors")
                         .read_bytes(), GlobalModelEnvelope).tensors
        before = decode((tmp_path / "cloud" / "fl" / TASK / "global-0.safetensors")
                        .read_bytes(), GlobalModelEnvelope).tensors
        # FedAvg of +0.5 (a, 10 examples) and 0 (b, 10 examples): +0.25, once.
        np.testing.assert_allclose(weights[name] - before[name], 0.25, atol=1e-6)
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=30)
        watcher.close()
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
    for device in (a, b):
        device.client.close()


def _accepted(store: Path, device_id: str) -> bool:
    import sqlite3

    if not store.exists():
        return False
    db = sqlite3.connect(store)
    try:
        row = db.execute("SELECT 1 FROM fl_updates WHERE task=? AND device_id=?",
                         (TASK, device_id)).fetchone()
    except sqlite3.OperationalError:
        return False
    finally:
        db.close()
    return row is not None




def test_cloud_killed_while_aggregating_resumes_and_counts_each_update_once(
    mosquitto: RunningBroker, topics: Topics, tmp_path: Path,
    new_device_id: Callable[[], str],
) -> None:
    """Killed inside the aggregation of round 1: every update folded in, the new global
    weights written, the round's record and state not yet saved. The next process
    aggregates the stored updates again from the old state; the devices send nothing
    more (their updates were acknowledged), and round 1 is released once."""
    gate = tmp_path / "gate"
    gate.mkdir()
    cloud = CloudProcess(mosquitto, topics, tmp_path / "cloud", instance="fl-kill-agg", fl={
        TASK: fl_config(task="tests.gated_task:GatedDigitsTask",
                        task_kwargs={"gate": str(gate)}, rounds=2, min_fit_clients=2,
                        min_available_clients=2, round_timeout_s=120)})
    a = HandDevice(mosquitto, topics, new_device_id())
    b = HandDevice(mosquitto, topics, new_device_id())
    watcher = SyncClient(mosquitto.host, mosquitto.service_port, client_id="fl-kill-agg-watch",
                         username=mosquitto.cloud_username,
                         password=mosquitto.password(mosquitto.cloud_username))
    assert not watcher.connect().is_failure
    watcher.subscribe(topics.task_status(TASK))
    folder = tmp_path / "cloud" / "data" / "fl" / TASK

    def task_state() -> dict[str, object]:
        rows = cloud.rows("SELECT value FROM kv WHERE key=?", (f"fl:{TASK}",))
        return dict(json.loads(rows[0][0])) if rows else {}

    try:
        cloud.start()
        plan = a.plan()
        good = zeros(a.global_weights(plan.global_version))
        name = next(iter(good))
        a.send(plan, {**good, name: good[name] + 0.5})
        b.send(plan, good)
        watcher.wait_for(lambda m: json.loads(m.payload)["state"] == "aggregating", timeout=30)
        wait_until((gate / "reached").exists, timeout=30,
                   what="the cloud inside round 1's aggregation")
        assert (folder / "global-1.safetensors").exists(), "held after writing the weights"
        saved = task_state()
        assert saved["state"] == "collecting" and saved["global_version"] == "0", saved
        assert cloud.rows("SELECT COUNT(*) FROM fl_updates WHERE task=? AND round=1",
                          (TASK,))[0][0] == 2
        assert cloud.rows("SELECT COUNT(*) FROM fl_rounds WHERE task=?", (TASK,))[0][0] == 0
        cloud.kill()

        (gate / "open").write_text("")
        cloud.start()
        released = watcher.wait_for(lambda m: json.loads(m.payload)["state"] == "released"
                                    and json.loads(m.payload)["round"] == 1, timeout=60)
        assert sorted(json.loads(released.payload)["participants"]) == sorted([a.id, b.id])
        before = decode((folder / "global-0.safetensors").read_bytes(),
                        GlobalModelEnvelope).tensors
        after = decode((folder / "global-1.safetensors").read_bytes(),
                       GlobalModelEnvelope).tensors
        # FedAvg of +0.5 (a, 10 examples) and 0 (b, 10 examples): +0.25, once.
        np.testing.assert_allclose(after[name] - before[name], 0.25, atol=1e-6)
        for other in good:
            if other != name:
                np.testing.assert_allclose(after[other], before[other], atol=1e-7)
        # Round 2 goes on from the resumed round's weights and ends the task.
        plan2 = a.plan(2)
        assert plan2.global_version == "1"
        a.send(plan2, good)
        b.send(plan2, good)
        finished = watcher.wait_for(lambda m: json.loads(m.payload)["state"] == "finished",
                                    timeout=60)
        assert json.loads(finished.payload)["round"] == 2
        rounds = cloud.rows("SELECT round, COUNT(*) FROM fl_rounds WHERE task=? "
                            "AND json_extract(status, '$.state')='released' GROUP BY round",
                            (TASK,))
        assert rounds == [(1, 1), (2, 1)], rounds
        log = cloud.log.read_text()
        assert log.count("round 1 aggregated and evaluated") == 1, "the first never finished"
        assert "round 1 resumed with 2 update(s)" in log
        assert cloud.stop() == 0
    finally:
        cloud.close()
        watcher.close()
        for device in (a, b):
            device.client.close()


def test_cloud_killed_during_a_secure_round_opens_a_new_attempt_with_new_keys(
    mosquitto: RunningBroker, topics: Topics, tmp_path: Path, make_agent: AgentFactory,
    new_device_id: Callable[[], str],
) -> None:
    """Secure aggregation keeps its state in memory (masked inputs are summed as they
    come, never stored): killed while the masked inputs arrive, the next process opens
    the round again as a new attempt, the devices make new keys, and the round is
    released once, with the mean of the devices that took part."""
    cloud = CloudProcess(mosquitto, topics, tmp_path / "cloud", instance="fl-kill-secagg", fl={
        TASK: secagg_task(min_fit_clients=3, min_available_clients=4, round_timeout_s=30,
                          secagg={"threshold": 0.6, "clip_range": CLIP,
                                  "stage_timeout_s": 5})})
    spy = mosquitto.connected(mosquitto.cloud_username)
    spy.subscribe(topics.filter(TopicKind.SECAGG_DEVICE, task=TASK))
    spy.subscribe(topics.task_status(TASK))
    # A device that takes part in the keys of attempt 0 and then sends nothing more: the
    # masked stage waits for it until the round's deadline, and the kill lands there.
    holder = HandDevice(mosquitto, topics, new_device_id())
    holder.client.subscribe(topics.secagg_broadcast(TASK, 1, ROSTER))
    try:
        cloud.start()
        ids = [new_device_id() for _ in range(3)]
        agents = [make_agent(d, fl=secagg_fl(mosquitto, d, i, 3)) for i, d in enumerate(ids)]
        plan = holder.plan()
        assert plan.attempt == 0 and plan.secagg is not None
        folder = mosquitto.settings.layout.secrets / "identities"
        device = SecAggDevice(TASK, 1, 0, holder.id, load_identity_key(
            folder / f"{holder.id}.key"), decode_message(
            DeviceIdentity, (folder / f"{holder.id}.json").read_bytes()), nonce=plan.nonce or "")
        holder.client.publish(topics.secagg_device(TASK, 1, ADVERTISE, holder.id),
                              device.advertise().to_json())
        roster = decode_message(SecAggRoster, holder.client.wait_topic(
            topics.secagg_broadcast(TASK, 1, ROSTER), timeout=30).payload)
        authority = (mosquitto.settings.layout.secrets / "identity-authority.pub").read_text()
        holder.client.publish(topics.secagg_device(TASK, 1, SHARES, holder.id), device.share_keys(
            roster, Ed25519PublicKey.from_public_bytes(base64.b64decode(authority.strip())))
            .to_json())
        wait_until(lambda: all(spy.received_on(topics.secagg_device(TASK, 1, MASKED, d))
                               for d in ids), timeout=60, what="the agents' masked inputs")
        cloud.kill()
        cloud.start()
        done = spy.wait_for(lambda m: m.topic == topics.task_status(TASK) and json.loads(
            m.payload)["state"] == "finished", timeout=90)
        status = json.loads(done.payload)
        assert sorted(status["participants"]) == sorted(ids)
        assert status["attempt"] == 1, status
        assert cloud.rows("SELECT COUNT(*) FROM fl_rounds WHERE task=? AND round=1 AND "
                          "json_extract(status, '$.state')='released'", (TASK,)) == [(1,)]
        data = tmp_path / "cloud" / "data" / "fl" / TASK
        before = {k: np.asarray(v, np.float64) for k, v in decode(
            (data / "global-0.safetensors").read_bytes(), GlobalModelEnvelope).tensors.items()}
        after = {k: np.asarray(v, np.float64) for k, v in decode(
            (data / "global-1.safetensors").read_bytes(), GlobalModelEnvelope).tensors.items()}
        for name, value in before.items():
            expected = np.mean([np.clip(a.fl.tasks[TASK].local_weights[name] - value,
                                        -CLIP, CLIP) for a in agents], axis=0)
            np.testing.assert_allclose(after[name] - value, expected, atol=1.01 * STEP)
        for agent in agents:  # one masked input per attempt, two attempts
            assert agent.counters["secagg_masked_sent"] == 2
        assert "secure aggregation state lost with the last process" in cloud.log.read_text()
    finally:
        cloud.close()
        spy.close()
        holder.client.close()


def test_a_rollout_resumes_after_the_cloud_is_killed_during_probation(
    mosquitto: RunningBroker, topics: Topics, make_agent: AgentFactory,
    onnx_model: bytes, tmp_path: Path,
) -> None:
    process = CloudProcess(mosquitto, topics, tmp_path / "cloud", instance="rollout-kill",
                           models={"key_id": KEY_ID, "chunk_bytes": 4096})
    save_signing_key(SIGNING_KEY, tmp_path / "cloud" / "data" / "keys" / "release.pem")
    process.start()
    store = SqliteStore(process.store)
    try:
        registry = ModelRegistry(store, tmp_path / "cloud" / "data" / "artifacts")
        registry.register(MODEL, "1.0.0", onnx_model, ArtifactFormat.ONNX,
                          input_shape=[-1, 64])
        agents = [make_agent() for _ in range(3)]
        rows = RolloutStore(store)
        spec = RolloutSpec(model=MODEL, version="1.0.0",
                           canary_devices=[agents[0].device_id], probation_s=6.0,
                           abort_alert_severity=None)
        wait_until(lambda: len(store.query("SELECT 1 FROM devices")) >= 3, timeout=20,
                   what="devices known to the cloud")
        request_id = rows.request("release", spec.model_dump(mode="json"))
        wait_until(lambda: rows.get_request(request_id).state == "done",  # type: ignore[union-attr]
                   timeout=20, what="release accepted")
        wait_until(lambda: _active(agents[0]) == "1.0.0", timeout=30, what="canary installed")
        before = rows.latest(MODEL)
        assert before is not None and before.stage == 0 and before.published_stage == 0
        process.kill()
        process.start()
        wait_until(lambda: (r := rows.latest(MODEL)) is not None and r.state == "completed",
                   timeout=40, what="the resumed rollout completed")
        after = rows.latest(MODEL)
        assert after is not None and after.id == before.id
        assert after.stage_started_at == before.stage_started_at or after.stage == 1
        assert after.finished_at is not None and after.finished_at >= before.deadline
        wait_until(lambda: all(_active(a) == "1.0.0" for a in agents), timeout=30,
                   what="the whole fleet installed")
        log = process.log.read_text()
        assert f"rollout {before.id} of {MODEL} 1.0.0 resumed at stage 0" in log
        assert log.count(f"rollout {before.id}: {MODEL} 1.0.0 stage 0 published") == 1
    finally:
        store.close()
        process.close()
