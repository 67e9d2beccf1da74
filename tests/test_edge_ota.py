"""OTA model installs against the real Mosquitto: signed, verified, atomic, with rollback."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from edge_node import ota
from edge_node.agent import EdgeAgent
from edge_node.ota import UNSUBSCRIBE_BATCH
from schemas.base import ModelFormat, RuntimeName, decode_message
from schemas.device import (
    CommandStatus,
    DeploymentState,
    DeploymentStatus,
    DeviceTelemetry,
    ModelMetrics,
)
from schemas.release import Requirements, Targeting
from schemas.topics import Topics
from tests.agent_fixtures import AgentFactory, send_command, telemetry, wait_until
from tests.mqtt_client import Received, SyncClient
from tests.releases import (
    DELIVERED,
    OTHER_KEY,
    build_release,
    export_onnx,
    export_torchscript,
    mlp,
    publish_chunks,
    publish_manifest,
    reference,
    release,
)

pytestmark = pytest.mark.integration

MODEL = "digits"
FIXTURES = Path(__file__).parent / "fixtures" / "models"
BATCH = np.random.default_rng(3).standard_normal((6, 64)).astype(np.float32)


def status_is(topics: Topics, device_id: str, state: DeploymentState,
              version: str | None = None, model: str = MODEL) -> Callable[[Received], bool]:
    """Predicate on DeploymentStatus messages."""
    def check(m: Received) -> bool:
        if m.topic != topics.deployment_status(device_id, model) or not m.payload:
            return False
        s = decode_message(DeploymentStatus, m.payload)
        return s.state is state and (version is None or s.target_version == version
                                     or s.active_version == version)
    return check


def last_status(cloud: SyncClient, topics: Topics, device_id: str,
                model: str = MODEL) -> DeploymentStatus:
    """The newest DeploymentStatus received."""
    return decode_message(DeploymentStatus,
                          cloud.received_on(topics.deployment_status(device_id, model))[-1]
                          .payload)


@pytest.fixture
def onnx_v1(tmp_path: Path) -> tuple[torch.nn.Module, bytes]:
    model = mlp(1)
    return model, export_onnx(model, tmp_path / "v1.onnx")


@pytest.fixture
def onnx_v2(tmp_path: Path) -> tuple[torch.nn.Module, bytes]:
    model = mlp(2)
    return model, export_onnx(model, tmp_path / "v2.onnx")


def install(cloud: SyncClient, topics: Topics, agent: EdgeAgent, version: str, data: bytes,
            **kwargs: object) -> DeploymentStatus:
    """Release ``data`` and wait for the device to report installed."""
    manifest, chunks = build_release(MODEL, version, data, **kwargs)  # type: ignore[arg-type]
    release(cloud, topics, manifest, chunks)
    msg = cloud.wait_for(status_is(topics, agent.device_id, DeploymentState.INSTALLED, version),
                         timeout=20)
    return decode_message(DeploymentStatus, msg.payload)


def test_signed_release_is_installed_and_served(make_agent: AgentFactory, cloud: SyncClient,
                                                topics: Topics,
                                                onnx_v1: tuple[torch.nn.Module, bytes]) -> None:
    agent = make_agent()
    model, data = onnx_v1
    status = install(cloud, topics, agent, "1.0.0", data)
    assert (status.active_version, status.slot) == ("1.0.0", "A")
    seen = [decode_message(DeploymentStatus, m.payload).state for m in
            cloud.received_on(topics.deployment_status(agent.device_id, MODEL))]
    for state in (DeploymentState.DOWNLOADING, DeploymentState.VERIFYING,
                  DeploymentState.INSTALLING, DeploymentState.INSTALLED):
        assert state in seen
    np.testing.assert_allclose(agent.infer(MODEL, BATCH), reference(model, BATCH),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fault", ["tampered_chunk", "wrong_signature", "fails_to_load",
                                   "untrusted_key", "chunk_too_long"])
def test_bad_release_leaves_the_old_model_serving(
    make_agent: AgentFactory, cloud: SyncClient, topics: Topics, fault: str,
    onnx_v1: tuple[torch.nn.Module, bytes], onnx_v2: tuple[torch.nn.Module, bytes],
) -> None:
    agent = make_agent()
    model_v1, data_v1 = onnx_v1
    install(cloud, topics, agent, "1.0.0", data_v1)
    _, data_v2 = onnx_v2
    if fault == "tampered_chunk":
        manifest, chunks = build_release(MODEL, "2.0.0", data_v2)
        chunks[1] = bytes([chunks[1][0] ^ 0xFF]) + chunks[1][1:]
        expected = "sha256_mismatch"
    elif fault == "wrong_signature":
        manifest, chunks = build_release(MODEL, "2.0.0", data_v2, key=OTHER_KEY)
        expected = "bad_signature"
    elif fault == "untrusted_key":
        manifest, chunks = build_release(MODEL, "2.0.0", data_v2, key=OTHER_KEY,
                                         key_id="someone-else")
        expected = "untrusted_key"
    elif fault == "fails_to_load":
        manifest, chunks = build_release(MODEL, "2.0.0", b"\x08\x01garbage, not a model" * 50)
        expected = "load_failed"
    else:
        manifest, chunks = build_release(MODEL, "2.0.0", data_v2)
        chunks[0] = chunks[0] + b"extra"
        expected = "chunk_size_mismatch"
    release(cloud, topics, manifest, chunks)
    failed = decode_message(DeploymentStatus, cloud.wait_for(
        status_is(topics, agent.device_id, DeploymentState.FAILED, "2.0.0"), timeout=20).payload)
    assert failed.error is not None and failed.error.startswith(expected)
    assert failed.active_version == "1.0.0"
    assert agent.counters[f"install_{expected}"] == 1
    np.testing.assert_allclose(agent.infer(MODEL, BATCH), reference(model_v1, BATCH),
                               rtol=1e-5, atol=1e-5)
    assert agent.store.active(MODEL).version == "1.0.0"  # type: ignore[union-attr]


def test_incompatible_release_is_reported_not_installed(make_agent: AgentFactory,
                                                        cloud: SyncClient, topics: Topics,
                                                        onnx_v1: tuple[torch.nn.Module, bytes],
                                                        ) -> None:
    agent = make_agent()
    targeting = Targeting(requirements=Requirements(min_memory_mb=10**9, gpu=True))
    manifest, chunks = build_release(MODEL, "1.0.0", onnx_v1[1], targeting=targeting)
    release(cloud, topics, manifest, chunks)
    status = decode_message(DeploymentStatus, cloud.wait_for(
        status_is(topics, agent.device_id, DeploymentState.INCOMPATIBLE)).payload)
    assert any("MiB" in r for r in status.reasons) and "needs a GPU" in status.reasons
    assert agent.store.active(MODEL) is None


def test_release_for_other_devices_is_ignored(make_agent: AgentFactory, cloud: SyncClient,
                                              topics: Topics,
                                              onnx_v1: tuple[torch.nn.Module, bytes]) -> None:
    agent = make_agent()
    other = make_agent()
    targeting = Targeting(stage="canary", canary=[other.device_id])
    manifest, chunks = build_release(MODEL, "1.0.0", onnx_v1[1], targeting=targeting)
    release(cloud, topics, manifest, chunks)
    cloud.wait_for(status_is(topics, other.device_id, DeploymentState.INSTALLED), timeout=20)
    assert cloud.received_on(topics.deployment_status(agent.device_id, MODEL)) == []
    assert agent.store.active(MODEL) is None


def test_rollback_by_command(make_agent: AgentFactory, cloud: SyncClient, topics: Topics,
                             onnx_v1: tuple[torch.nn.Module, bytes],
                             onnx_v2: tuple[torch.nn.Module, bytes]) -> None:
    agent = make_agent()
    install(cloud, topics, agent, "1.0.0", onnx_v1[1])
    status = install(cloud, topics, agent, "2.0.0", onnx_v2[1])
    assert (status.active_version, status.previous_version, status.slot) == ("2.0.0", "1.0.0",
                                                                             "B")
    np.testing.assert_allclose(agent.infer(MODEL, BATCH), reference(onnx_v2[0], BATCH),
                               rtol=1e-5, atol=1e-5)
    reply = send_command(cloud, topics, agent.device_id, "rollback", {"model": MODEL})
    assert reply.status is CommandStatus.OK and reply.result["active_version"] == "1.0.0"
    rolled = decode_message(DeploymentStatus, cloud.wait_for(
        status_is(topics, agent.device_id, DeploymentState.ROLLED_BACK)).payload)
    assert (rolled.active_version, rolled.slot) == ("1.0.0", "A")
    np.testing.assert_allclose(agent.infer(MODEL, BATCH), reference(onnx_v1[0], BATCH),
                               rtol=1e-5, atol=1e-5)


def test_rollback_when_probation_error_rate_is_exceeded(
    make_agent: AgentFactory, cloud: SyncClient, topics: Topics,
    onnx_v1: tuple[torch.nn.Module, bytes], onnx_v2: tuple[torch.nn.Module, bytes],
) -> None:
    agent = make_agent(ota={"probation_s": 60, "probation_min_samples": 5,
                            "max_error_rate_percent": 20.0}, interval_s=0.1)
    install(cloud, topics, agent, "1.0.0", onnx_v1[1])
    agent.ota.probation.clear()  # v1 is the known-good baseline
    install(cloud, topics, agent, "2.0.0", onnx_v2[1])
    for _ in range(5):  # the application feeds inputs v2 cannot take
        with pytest.raises(Exception, match="inference failed"):
            agent.infer(MODEL, BATCH.astype(np.float64))
    rolled = decode_message(DeploymentStatus, cloud.wait_for(
        status_is(topics, agent.device_id, DeploymentState.ROLLED_BACK), timeout=10).payload)
    assert rolled.active_version == "1.0.0"
    assert rolled.error is not None and "error rate" in rolled.error


def test_resume_after_disconnect_fetches_only_missing_chunks(
    make_agent: AgentFactory, cloud: SyncClient, topics: Topics,
    onnx_v1: tuple[torch.nn.Module, bytes],
) -> None:
    agent = make_agent()
    manifest, chunks = build_release(MODEL, "1.0.0", onnx_v1[1], chunk_size=1024)
    half = len(chunks) // 2
    publish_manifest(cloud, topics, manifest)
    publish_chunks(cloud, topics, manifest, chunks, list(range(half)))
    wait_until(lambda: len(agent.store.present_chunks(manifest)) >= half,
               what="first half of the chunks on the device's disk")
    # ... and done with: a chunk stored but not yet unsubscribed when the connection
    # drops is subscribed again on reconnection (a duplicate, counted and ignored).
    first_half = {topics.chunk(MODEL, "1.0.0", i) for i in range(half)}
    wait_until(lambda: not first_half & agent.session.subscriptions(),
               what="the first half's chunk topics unsubscribed")
    first_bd = agent.session.bd_seq
    agent.session.drop()
    cloud.wait_for(lambda m: m.topic == topics.device_state(agent.device_id)
                   and b'"online"' in m.payload and f'"bd_seq":{first_bd + 1}'.encode()
                   in m.payload)
    publish_chunks(cloud, topics, manifest, chunks, list(range(half, len(chunks))))
    cloud.wait_for(status_is(topics, agent.device_id, DeploymentState.INSTALLED), timeout=20)
    # Every chunk once, but for at most one QoS 1 redelivery: a chunk already on disk
    # whose PUBACK had not left the device when the connection was cut.
    duplicates = agent.counters["chunk_duplicate"]
    assert duplicates <= 1
    assert agent.ota.chunk_messages[MODEL] - duplicates == len(chunks)
    np.testing.assert_allclose(agent.infer(MODEL, BATCH), reference(onnx_v1[0], BATCH),
                               rtol=1e-5, atol=1e-5)


def test_stored_chunks_are_unsubscribed_in_batches(
    make_agent: AgentFactory, cloud: SyncClient, topics: Topics,
    onnx_v1: tuple[torch.nn.Module, bytes], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One UNSUBSCRIBE per batch of stored chunks, not per chunk; none left after."""
    monkeypatch.setattr(ota, "PROGRESS_INTERVAL_S", 3600.0)  # no flush at a progress status
    agent = make_agent(interval_s=30)  # nor at a report tick
    manifest, chunks = build_release(MODEL, "1.0.0", onnx_v1[1], chunk_size=128)
    assert len(chunks) > 3 * UNSUBSCRIBE_BATCH
    sent: list[list[str]] = []
    unsubscribe = agent.session.client.unsubscribe

    def spy(topic: str | list[str], *args: Any, **kwargs: Any) -> Any:
        sent.append([topic] if isinstance(topic, str) else list(topic))
        return unsubscribe(topic, *args, **kwargs)

    monkeypatch.setattr(agent.session.client, "unsubscribe", spy)
    release(cloud, topics, manifest, chunks)
    cloud.wait_for(status_is(topics, agent.device_id, DeploymentState.INSTALLED), timeout=20)
    chunk_topics = {topics.chunk(MODEL, "1.0.0", i) for i in range(len(chunks))}
    assert not chunk_topics & agent.session.subscriptions()
    assert sorted(t for batch in sent for t in batch) == sorted(chunk_topics)
    assert len(sent) == -(-len(chunks) // UNSUBSCRIBE_BATCH)  # full batches, the rest at the end


def test_a_chunk_unsubscribed_while_offline_is_unsubscribed_on_the_broker(
    make_agent: AgentFactory, cloud: SyncClient, topics: Topics,
) -> None:
    """The broker keeps a device's subscriptions across connections: one the device
    drops while it is not connected (here: a restarted agent dropping a chunk topic an
    earlier run left subscribed) is sent after the next CONNACK, not forgotten."""
    stale, probe = topics.chunk(MODEL, "9.0.0", 0), topics.chunk(MODEL, "9.0.0", 1)
    first = make_agent()
    first.session.subscribe(stale)
    wait_until(lambda: cloud.publish(stale, b"x") in DELIVERED
               and first.counters["chunk_unexpected"] >= 1, what="the stale chunk received")
    first.stop()
    again = make_agent(first.device_id, state_dir=first.state_dir, start=False)
    again.session.unsubscribe_many([stale], force=True)  # not connected yet
    again.session.subscribe(probe)
    again.start()
    assert again.session.connected.wait(10)
    cloud.publish(stale, b"x")
    cloud.publish(probe, b"x")  # after it, in order: once it is in, so would the stale one
    wait_until(lambda: again.counters["chunk_unexpected"] >= 1, what="the probe received")
    assert again.counters["chunk_unexpected"] == 1


@pytest.mark.parametrize("power_loss", [False, True], ids=["killed", "torn_chunk"])
def test_a_restarted_agent_resumes_its_download_and_a_torn_chunk_starts_it_over(
    make_agent: AgentFactory, cloud: SyncClient, topics: Topics,
    onnx_v1: tuple[torch.nn.Module, bytes], power_loss: bool,
) -> None:
    """The chunks land at their offsets in one file. A restart fetches only the missing
    ones; if a chunk the log lists was torn by a power loss (nothing is synced per
    chunk), the release's sha256 catches it and the download starts over once."""
    agent = make_agent()
    manifest, chunks = build_release(MODEL, "1.0.0", onnx_v1[1], chunk_size=1024)
    half = len(chunks) // 2
    publish_manifest(cloud, topics, manifest)
    publish_chunks(cloud, topics, manifest, chunks, list(range(half)))
    wait_until(lambda: len(agent.store.present_chunks(manifest)) >= half,
               what="first half of the chunks on the device's disk")
    agent.stop()
    staging = agent.store.staging_dir(manifest)
    assert sorted(p.name for p in staging.iterdir()) == ["chunks.log", "download.onnx"]
    download = agent.store.download_file(manifest)
    assert download.stat().st_size == manifest.size_bytes  # reserved at the start
    assert download.read_bytes()[:half * 1024] == b"".join(chunks[:half])
    if power_loss:
        with download.open("r+b") as handle:
            handle.seek(1024 + 100)
            handle.write(b"\0" * 16)
    publish_chunks(cloud, topics, manifest, chunks, list(range(half, len(chunks))))
    again = make_agent(agent.device_id, state_dir=agent.state_dir)
    cloud.wait_for(status_is(topics, again.device_id, DeploymentState.INSTALLED), timeout=20)
    # the old session's queued chunks arrive before the retained manifest: not stored
    ignored = again.counters["chunk_duplicate"] + again.counters["chunk_unexpected"]
    fetched = again.ota.chunk_messages[MODEL] - ignored
    if power_loss:
        assert again.counters["download_restarted"] == 1
        assert fetched == len(chunks) - half + len(chunks)
    else:
        assert again.counters["download_restarted"] == 0
        assert fetched == len(chunks) - half
    assert not staging.exists()
    installed = again.store.active(MODEL)
    assert installed is not None and Path(installed.path).read_bytes() == onnx_v1[1]
    np.testing.assert_allclose(again.infer(MODEL, BATCH), reference(onnx_v1[0], BATCH),
                               rtol=1e-5, atol=1e-5)


def test_chunks_out_of_order_land_at_their_offsets_and_a_torn_log_record_is_ignored(
    tmp_path: Path, onnx_v1: tuple[torch.nn.Module, bytes],
) -> None:
    from edge_node.model_store import ModelStore

    store = ModelStore(tmp_path / "models")
    manifest, chunks = build_release(MODEL, "1.0.0", onnx_v1[1], chunk_size=1000)
    assert store.open_download(manifest) == set()
    order = list(range(len(chunks)))[::-1]
    for index in order[:-1]:
        store.store_chunk(manifest, index, chunks[index])
    with (store.staging_dir(manifest) / "chunks.log").open("ab") as log:
        log.write(b"\x00\x00")  # the process died inside the last record's write
    assert ModelStore(tmp_path / "models").open_download(manifest) == set(order[:-1])
    store.store_chunk(manifest, order[-1], chunks[order[-1]])
    assert store.present_chunks(manifest) == set(range(len(chunks)))
    assert store.read_chunk(manifest, len(chunks) - 1) == chunks[-1]
    assert store.complete_download(manifest).read_bytes() == onnx_v1[1]


def test_a_full_disk_fails_the_install_keeps_the_model_serving_and_retries_later(
    make_agent: AgentFactory, cloud: SyncClient, topics: Topics, tmp_path: Path,
    onnx_v1: tuple[torch.nn.Module, bytes],
) -> None:
    """Issue 14: the disk refuses a release (here the kernel's file-size limit, EFBIG,
    as ENOSPC would): the device says why in its status and telemetry, keeps serving
    the model it has, and installs the release when it is delivered again."""
    import resource
    import signal

    agent = make_agent(interval_s=0.2)
    install(cloud, topics, agent, "1.0.0", onnx_v1[1])
    torch.manual_seed(5)
    big = torch.nn.Sequential(torch.nn.Linear(64, 27_000), torch.nn.ReLU(),
                              torch.nn.Linear(27_000, 10)).eval()
    data = export_onnx(big, tmp_path / "big.onnx")
    limit = 6 * 1024 * 1024
    assert len(data) > limit + 1024 * 1024  # the outbox's files stay below the limit
    manifest, chunks = build_release(MODEL, "2.0.0", data, chunk_size=256 * 1024)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    previous_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, previous_limit[1]))
    try:
        release(cloud, topics, manifest, chunks)
        failed = decode_message(DeploymentStatus, cloud.wait_for(
            status_is(topics, agent.device_id, DeploymentState.FAILED, "2.0.0"),
            timeout=20).payload)
        assert failed.error is not None and failed.error.startswith("storage_error: "), failed
        assert failed.active_version == "1.0.0"
        np.testing.assert_allclose(agent.infer(MODEL, BATCH), reference(onnx_v1[0], BATCH),
                                   rtol=1e-5, atol=1e-5)
        cloud.wait_for(lambda m: m.topic == topics.telemetry(agent.device_id) and decode_message(
            DeviceTelemetry, m.payload).counters.get("install_storage_error", 0) >= 1)
        assert not agent.store.staging_dir(manifest).exists()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous_limit)
        signal.signal(signal.SIGXFSZ, previous_handler)
    agent.session.drop()  # space again; the retained release comes with the reconnection
    cloud.wait_for(status_is(topics, agent.device_id, DeploymentState.INSTALLED, "2.0.0"),
                   timeout=60)
    np.testing.assert_allclose(agent.infer(MODEL, BATCH), reference(big, BATCH),
                               rtol=1e-4, atol=1e-4)


def test_restart_serves_the_last_model_without_the_network(
    make_agent: AgentFactory, cloud: SyncClient, topics: Topics, tmp_path: Path,
    onnx_v1: tuple[torch.nn.Module, bytes],
) -> None:
    agent = make_agent()
    install(cloud, topics, agent, "1.0.0", onnx_v1[1])
    agent.stop()
    offline = make_agent(agent.device_id, start=False, state_dir=agent.state_dir,
                         mqtt={"port": 1})  # nothing listens there
    offline.start()
    np.testing.assert_allclose(offline.infer(MODEL, BATCH), reference(onnx_v1[0], BATCH),
                               rtol=1e-5, atol=1e-5)
    assert not offline.session.connected.is_set()


def test_every_runtime_reports_latency_percentiles(make_agent: AgentFactory, cloud: SyncClient,
                                                   topics: Topics, tmp_path: Path) -> None:
    agent = make_agent(interval_s=30)
    torch_model = mlp(5)
    files = {
        "mlp-onnx": (ModelFormat.ONNX, export_onnx(torch_model, tmp_path / "m.onnx")),
        "mlp-ts": (ModelFormat.TORCHSCRIPT, export_torchscript(torch_model, tmp_path / "m.pt")),
        "mlp-tflite": (ModelFormat.TFLITE, (FIXTURES / "digits_mlp.tflite").read_bytes()),
    }
    for name, (fmt, data) in files.items():
        manifest, chunks = build_release(name, "1.0.0", data, fmt=fmt, input_shape=[1, 64])
        release(cloud, topics, manifest, chunks)
        cloud.wait_for(status_is(topics, agent.device_id, DeploymentState.INSTALLED,
                                 model=name), timeout=20)
    for name in files:
        for _ in range(50):
            agent.infer(name, BATCH[:1])
    send_command(cloud, topics, agent.device_id, "report_now")
    runtimes = {"mlp-onnx": RuntimeName.ONNXRUNTIME, "mlp-ts": RuntimeName.TORCHSCRIPT,
                "mlp-tflite": RuntimeName.LITERT}
    for name, runtime in runtimes.items():
        topic = topics.model_metrics(agent.device_id, name)
        metrics = decode_message(ModelMetrics, cloud.wait_topic(topic).payload)
        assert metrics.runtime is runtime
        assert metrics.sample_count >= 50
        p50, p95, p99 = metrics.latency_ms_p50, metrics.latency_ms_p95, metrics.latency_ms_p99
        assert p50 is not None and p95 is not None and p99 is not None
        assert 0 < p50 <= p95 <= p99
        assert metrics.throughput_per_s > 0 and metrics.error_count == 0


@pytest.mark.parametrize(("payload", "reason"), [
    (b"{not json", "invalid_manifest"),
    (b'{"model": "digits", "version": "1", "format": "caffe"}', "invalid_manifest"),
])
def test_malformed_manifests_are_refused_and_counted(make_agent: AgentFactory,
                                                     cloud: SyncClient, topics: Topics,
                                                     payload: bytes, reason: str) -> None:
    agent = make_agent()
    assert cloud.publish(topics.release(MODEL), payload, retain=True) in (0, 0x10)
    failed = decode_message(DeploymentStatus, cloud.wait_for(
        status_is(topics, agent.device_id, DeploymentState.FAILED)).payload)
    assert failed.error is not None and failed.error.startswith(reason)
    assert agent.counters[f"install_{reason}"] == 1
    assert agent.session.connected.is_set()


def test_out_of_range_and_unexpected_chunks_are_counted(
    make_agent: AgentFactory, cloud: SyncClient, topics: Topics,
    onnx_v1: tuple[torch.nn.Module, bytes],
) -> None:
    agent = make_agent()
    manifest, chunks = build_release(MODEL, "1.0.0", onnx_v1[1])
    publish_manifest(cloud, topics, manifest)
    cloud.wait_for(status_is(topics, agent.device_id, DeploymentState.DOWNLOADING))
    # Deliveries the agent did not subscribe to (as after a manifest was replaced).
    agent.ota.submit_chunk(MODEL, "1.0.0", manifest.chunk_count + 5, b"x")
    agent.ota.submit_chunk(MODEL, "0.9.0", 0, b"x")
    wait_until(lambda: agent.counters["chunk_out_of_range"] == 1
               and agent.counters["chunk_unexpected"] == 1, what="chunks counted")
    publish_chunks(cloud, topics, manifest, chunks)
    cloud.wait_for(status_is(topics, agent.device_id, DeploymentState.INSTALLED), timeout=20)


def test_infer_command_and_prediction_counts(make_agent: AgentFactory, cloud: SyncClient,
                                             topics: Topics,
                                             onnx_v1: tuple[torch.nn.Module, bytes]) -> None:
    agent = make_agent(interval_s=30)
    install(cloud, topics, agent, "1.0.0", onnx_v1[1])
    reply = send_command(cloud, topics, agent.device_id, "infer",
                         {"model": MODEL, "inputs": BATCH[:2].tolist()})
    assert reply.status is CommandStatus.OK
    np.testing.assert_allclose(np.asarray(reply.result["outputs"], dtype=np.float32),
                               reference(onnx_v1[0], BATCH[:2]), rtol=1e-5, atol=1e-5)
    bad = send_command(cloud, topics, agent.device_id, "infer",
                       {"model": MODEL, "inputs": [[1.0, 2.0]]})
    assert bad.status is CommandStatus.ERROR and "inference failed" in (bad.error or "")
    agent.infer(MODEL, BATCH)
    send_command(cloud, topics, agent.device_id, "report_now")
    sent = telemetry(cloud, topics, agent.device_id)[-1]
    assert (sent.prediction_count, sent.error_count) == (2 + 1 + 6, 1)


def test_the_fleets_simulated_applications_serve_the_active_model_with_feedback(
    make_agent: AgentFactory, cloud: SyncClient, topics: Topics,
    onnx_v1: tuple[torch.nn.Module, bytes],
) -> None:
    from edge_node.fleet import Traffic, TrafficLoop
    from fl_tasks.digits import DigitsTask

    agents = [make_agent(), make_agent()]
    x, y = DigitsTask().central_data()
    loop = TrafficLoop(agents, Traffic(MODEL, x, y, rate_per_s=50.0))
    loop.start()
    try:
        threading.Event().wait(0.3)
        assert loop.served == 0  # nothing active yet: nothing sent
        for agent in agents:
            install(cloud, topics, agent, "1.0.0", onnx_v1[1])
        wait_until(lambda: loop.served >= 40, timeout=20, what="requests served")
    finally:
        loop.stop()
    for agent in agents:
        stats = agent.inference.stats(MODEL)
        assert stats is not None and stats.samples > 0 and stats.accuracy is not None
    assert loop.failed == 0


def test_a_bad_serve_option_is_one_line_and_exit_2(tmp_path: Path) -> None:
    for bad in ("digits", "digits=fl_tasks.nothing:Task"):
        result = subprocess.run(
            [sys.executable, "-m", "edgefl", "fleet", "--devices", "1", "--serve", bad,
             "--state-dir", str(tmp_path / "s")],
            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
            timeout=60, check=False)
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stderr.strip().count("\n") == 0, result.stderr
