"""Rollout fan-out and abort latency, against the broker's own delivery in the same run.

Fan-out: a 100-device simulated fleet (`python -m edge_node fleet`, real agents
with their own MQTT connections) and the cloud service (`python -m edgefl cloud`)
run against Mosquitto from the project's config. A release of a 1 MB and of a
10 MB ONNX model (an MLP sized to that) is handed to the service as `edgefl model
release --canary 100%` does; the time is taken from the request to the last
device's `DeploymentStatus` saying the version is installed (seen by a subscriber
of the bench), and from the first chunk's publication (the bytes start to flow:
what the ratio uses; the request adds the service's request poll, up to 0.5 s).
Each device downloads the retained chunks, checks size, sha256 and the Ed25519
signature, writes its B slot, loads the model in onnxruntime and runs the smoke
test.

Reference, in the same run: the broker delivers the same bytes (same chunk size,
QoS 1, retained) to 100 plain paho subscribers (with the devices' identities,
before the fleet starts); the time from the first publish to the last byte at
the last subscriber. The ratio fan-out / reference is the figure (goal: <= 1.5).

Both report the CPU seconds each process spent (the broker; the subscribers or the
fleet, the cloud): the simulated fleet shares this machine's cores, so its installs
(write, sha256, onnxruntime load, smoke test, statuses) queue behind each other,
while on a real fleet each device spends its own.

Abort latency: a canary release (`--abort-on-alert critical`, a long probation)
to one more device, an agent of the bench's own whose sampler then reports 90 °C:
the cloud's `temperature_high` rule (critical) opens an alert, the rollout
aborts; the time from the alert's `opened_at` to the rollback command reaching
the bench's subscriber (goal: <= 2 s).

Prints JSON:

    .venv/bin/python bench/bench_rollout.py [--devices 100] [--sizes-mb 1 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paho.mqtt.client as mqtt
import psutil
import torch
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from broker.local import LocalBroker, start_local_broker
from cloud.models.formats import ArtifactFormat
from cloud.models.registry import ModelRegistry
from cloud.models.rollout import RolloutSpec
from cloud.models.rollout_store import RolloutStore
from cloud.settings import CloudSettings
from cloud.storage.sqlite_store import SqliteStore
from edge_node.fleet import MAX_AGENTS_PER_PROCESS
from schemas.alerts import Alert
from schemas.base import Severity, decode_message
from schemas.device import DeploymentState, DeploymentStatus
from schemas.errors import UnknownTopicError
from schemas.topics import TopicKind, Topics

CHUNK_BYTES = 256 * 1024
CANARY = "bench-canary"
TOPICS = Topics()

SUBSCRIBERS = textwrap.dedent("""
    import json, sys, threading, time
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    host, port, secrets, topic, ids, expected = sys.argv[1:7]
    ids, expected = ids.split(","), int(expected)
    got = {d: 0 for d in ids}
    done = {}
    subscribed = threading.Semaphore(0)
    lock = threading.Lock()
    def on_message(client, device, msg):
        with lock:
            got[device] += len(msg.payload)
            if got[device] >= expected and device not in done:
                done[device] = time.time()
    clients = []
    for device in ids:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device, userdata=device,
                        protocol=mqtt.MQTTv5)
        c.username_pw_set(device, open(f"{secrets}/{device}.password").read().strip())
        c.on_message = on_message
        c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(topic, qos=1)
        c.on_subscribe = lambda *a: subscribed.release()
        c.connect(host, int(port))
        c.loop_start()
        clients.append(c)
    for _ in ids:
        assert subscribed.acquire(timeout=60)
    print("ready", flush=True)
    deadline = time.time() + 600
    while len(done) < len(ids) and time.time() < deadline:
        time.sleep(0.01)
    print(json.dumps({"done": len(done), "last": max(done.values(), default=None)}), flush=True)
    for c in clients:
        c.disconnect(); c.loop_stop()
""")


def mlp_onnx(size_mb: float, path: Path) -> bytes:
    """An MLP 64 -> h -> 10 whose fp32 ONNX file is about ``size_mb`` MB."""
    hidden = max(16, round(size_mb * 1_000_000 / 4 / 75))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(),
                                torch.nn.Linear(hidden, 10)).eval()
    torch.onnx.export(model, (torch.zeros(1, 64),), str(path), input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
                      dynamo=False)
    return path.read_bytes()


class Watcher:
    """A subscriber with the cloud's identity (own client id) that timestamps messages."""

    def __init__(self, broker: LocalBroker, password: str, topic_filter: str) -> None:
        self.messages: list[tuple[float, str, bytes]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="edgefl-bench-watch",
                                  protocol=mqtt.MQTTv5)
        self.client.username_pw_set("edgefl-cloud", password)
        subscribed = threading.Event()
        self.client.on_connect = lambda c, *a: c.subscribe(topic_filter, qos=1)
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", broker.service_port)
        self.client.loop_start()
        if not subscribed.wait(30):
            raise RuntimeError("the bench's watcher did not subscribe")

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((time.time(), msg.topic, bytes(msg.payload)))

    def since(self, t0: float) -> list[tuple[float, str, bytes]]:
        """Messages received at or after ``t0``."""
        with self.lock:
            return [m for m in self.messages if m[0] >= t0]

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()


def cpu_seconds(*pids: int) -> float:
    """User + system CPU seconds of these processes and their children so far."""
    total = 0.0
    for pid in pids:
        root = psutil.Process(pid)
        for proc in (root, *root.children(recursive=True)):
            try:
                times = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
    return total


def broker_pid(broker: LocalBroker) -> int:
    """Mosquitto's pid, from its pid file."""
    return int((broker.settings.layout.root / "mosquitto.pid").read_text().split()[0])


def reference(broker: LocalBroker, password: str, ids: list[str], data: bytes,
              cpu: dict[str, list[float]]) -> float:
    """Seconds for the broker to deliver ``data`` in chunks to one paho subscriber per id.

    Appends the CPU seconds the broker and the subscribers spent on it to ``cpu``.
    """
    chunks = TOPICS.filter(TopicKind.CHUNK, model="benchref", version="1.0.0")
    subs = subprocess.Popen(
        [sys.executable, "-c", SUBSCRIBERS, "127.0.0.1", str(broker.port),
         str(broker.settings.layout.secrets), chunks, ",".join(ids), str(len(data))],
        stdout=subprocess.PIPE, text=True)
    assert subs.stdout is not None
    if subs.stdout.readline().strip() != "ready":
        raise RuntimeError("reference subscribers did not start")
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="edgefl-bench-ref",
                         protocol=mqtt.MQTTv5)
    client.username_pw_set("edgefl-cloud", password)
    client.connect("127.0.0.1", broker.service_port)
    client.loop_start()
    count = (len(data) + CHUNK_BYTES - 1) // CHUNK_BYTES
    before = cpu_seconds(broker_pid(broker)), cpu_seconds(subs.pid)
    t0 = time.time()
    infos = [client.publish(TOPICS.chunk("benchref", "1.0.0", i),
                            data[i * CHUNK_BYTES:(i + 1) * CHUNK_BYTES],
                            qos=1, retain=True) for i in range(count)]
    for info in infos:
        info.wait_for_publish(60)
    result = json.loads(subs.stdout.readline())
    cpu.setdefault("broker", []).append(cpu_seconds(broker_pid(broker)) - before[0])
    cpu.setdefault("subscribers", []).append(cpu_seconds(subs.pid) - before[1])
    subs.wait(60)
    for i in range(count):  # leave nothing retained
        client.publish(TOPICS.chunk("benchref", "1.0.0", i), b"", qos=1,
                       retain=True).wait_for_publish(60)
    client.disconnect()
    client.loop_stop()
    if result["done"] != len(ids):
        raise RuntimeError(f"reference: {result['done']} of {len(ids)} subscribers got it all")
    return float(result["last"]) - t0


def release(settings: CloudSettings, spec: RolloutSpec) -> float:
    """Hand a rollout to the service as `edgefl model release` does; the request's time."""
    rows = RolloutStore(SqliteStore(settings.sqlite_path))
    t0 = time.time()
    request_id = rows.request("release", spec.model_dump(mode="json"))
    deadline = time.time() + 60
    while (request := rows.get_request(request_id)) is not None and request.state == "pending":
        if time.time() > deadline:
            raise RuntimeError("the service did not take the release")
        time.sleep(0.02)
    if request is None or request.state != "done":
        raise RuntimeError(f"release refused: {request.detail if request else '?'}")
    return t0


def is_chunk_of(topic: str, version: str) -> bool:
    """Whether ``topic`` carries a chunk of ``bench`` ``version``."""
    try:
        parsed = TOPICS.parse(topic)
    except UnknownTopicError:
        return False
    return parsed.kind is TopicKind.CHUNK and parsed.model == "bench" \
        and parsed.version == version


def installed_at(watcher: Watcher, t0: float, version: str, ids: list[str],
                 timeout: float) -> dict[str, float]:
    """When each device first said ``version`` is installed (waits for all, bounded)."""
    deadline = time.time() + timeout
    wanted = {TOPICS.deployment_status(d, "bench") for d in ids}
    while True:
        seen: dict[str, float] = {}
        for ts, topic, payload in watcher.since(t0):
            if topic not in wanted or not payload:
                continue
            status = decode_message(DeploymentStatus, payload)
            if status.state is DeploymentState.INSTALLED and status.active_version == version:
                seen.setdefault(status.device_id, ts)
        if len(seen) >= len(ids) or time.time() > deadline:
            return seen
        time.sleep(0.05)


def device_steps(messages: list[tuple[float, str, bytes]], version: str, ids: list[str],
                 ) -> dict[str, dict[str, float]]:
    """Per device, when (its clock) it first reported each state of installing ``version``."""
    wanted = {TOPICS.deployment_status(d, "bench") for d in ids}
    out: dict[str, dict[str, float]] = {}
    for _, topic, payload in messages:
        if topic not in wanted or not payload:
            continue
        status = decode_message(DeploymentStatus, payload)
        if version not in (status.target_version, status.active_version):
            continue
        out.setdefault(status.device_id, {}).setdefault(status.state.value, status.ts)
    return out


def start_cloud(folder: Path, broker: LocalBroker) -> tuple[subprocess.Popen[bytes], Path]:
    """`edgefl model keygen`, then `edgefl cloud`, from a settings file."""
    config = folder / "cloud.yaml"
    config.write_text(yaml.safe_dump({
        "instance": "bench", "data_dir": str(folder / "cloud"),
        "mqtt": {"host": "127.0.0.1", "port": broker.service_port,
                 "password_file": str(broker.settings.layout.secrets / "edgefl-cloud.password")},
        "ingest": {"flush_interval_s": 0.1},
        "alerts": {"tick_interval_s": 0.5},
        "models": {"chunk_bytes": CHUNK_BYTES},
    }))
    subprocess.run([sys.executable, "-m", "edgefl", "model", "keygen", "--config", str(config)],
                   check=True, stdout=subprocess.DEVNULL)
    cloud = subprocess.Popen([sys.executable, "-m", "edgefl", "--log-level", "WARNING", "cloud",
                              "--config", str(config)], stdout=subprocess.DEVNULL)
    return cloud, config


def start_fleet(folder: Path, broker: LocalBroker, count: int,
                cloud_settings: CloudSettings, per_process: int) -> subprocess.Popen[bytes]:
    """`edgefl fleet` trusting the release key."""
    config = folder / "edge.yaml"
    config.write_text(yaml.safe_dump({
        "telemetry": {"interval_s": 2},
        "ota": {"trusted_key_files": {
            cloud_settings.models.key_id: str(cloud_settings.release_key_path.with_suffix(
                ".pub"))}},
    }))
    return subprocess.Popen(
        [sys.executable, "-m", "edge_node", "fleet", "--devices", str(count),
         "--broker", f"127.0.0.1:{broker.port}", "--secrets-dir",
         str(broker.settings.layout.secrets), "--state-dir", str(folder / "fleet"),
         "--config", str(config), "--per-process", str(per_process)],
        stdout=subprocess.DEVNULL)


def wait_devices(settings: CloudSettings, count: int, fleet: subprocess.Popen[bytes],
                 timeout: float = 180) -> None:
    """Until the cloud knows ``count`` online devices."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if fleet.poll() is not None:
            raise RuntimeError(f"the fleet exited with {fleet.returncode}")
        if settings.sqlite_path.exists():
            rows = SqliteStore(settings.sqlite_path).query(
                "SELECT COUNT(*) AS n FROM devices WHERE json_extract(record, '$.online')")
            if rows and rows[0]["n"] >= count:
                return
        time.sleep(0.5)
    raise RuntimeError(f"fewer than {count} devices online within {timeout} s")


class HotCanary:
    """An agent of the bench's own whose sampler reports 90 °C while ``hot`` is set."""

    def __init__(self, folder: Path, broker: LocalBroker, settings: CloudSettings) -> None:
        from edge_node.agent import EdgeAgent
        from edge_node.settings import EdgeSettings
        from edge_node.system_metrics import sample

        self.hot = threading.Event()
        state_dir = folder / CANARY

        def read() -> Any:
            reading = sample(state_dir)
            return dataclasses.replace(reading, temperature_c=90.0) if self.hot.is_set() \
                else dataclasses.replace(reading, temperature_c=40.0)

        self.agent = EdgeAgent(EdgeSettings.model_validate({
            "device_id": CANARY, "state_dir": str(state_dir),
            "mqtt": {"host": "127.0.0.1", "port": broker.port,
                     "password_file": str(broker.settings.layout.secrets / f"{CANARY}.password")},
            "telemetry": {"interval_s": 0.2},
            "ota": {"trusted_key_files": {settings.models.key_id: str(
                settings.release_key_path.with_suffix(".pub"))}},
        }, strict=False), sampler=read)
        self.agent.start()


def abort_latency(settings: CloudSettings, registry: ModelRegistry, watcher: Watcher,
                  canary: HotCanary, data: bytes, version: str) -> float:
    """Release to the canary, which then overheats; alert opened -> rollback command, s."""
    registry.register("bench", version, data, ArtifactFormat.ONNX, input_shape=[-1, 64])
    spec = RolloutSpec(model="bench", version=version, canary_devices=[CANARY],
                       probation_s=600.0, abort_alert_severity=Severity.CRITICAL)
    t0 = release(settings, spec)
    if CANARY not in installed_at(watcher, t0, version, [CANARY], 120):
        raise RuntimeError("the canary did not install")
    canary.hot.set()
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            opened: float | None = None
            rollback_at: float | None = None
            for ts, topic, payload in watcher.since(t0):
                if topic == TOPICS.alert(CANARY, "temperature_high") and payload \
                        and opened is None:
                    opened = decode_message(Alert, payload).opened_at
                if topic == TOPICS.command(CANARY, "rollback") and rollback_at is None:
                    rollback_at = ts
            if opened is not None and rollback_at is not None:
                return rollback_at - opened
            time.sleep(0.02)
        raise RuntimeError("no alert and rollback within 120 s")
    finally:
        canary.hot.clear()
        time.sleep(3.0)  # the alert clears, the rollout's abort is recorded


def fanout(settings: CloudSettings, registry: ModelRegistry, watcher: Watcher,
           ids: list[str], models: dict[float, bytes], refs: dict[float, list[float]],
           ref_cpu: dict[float, dict[str, list[float]]], pids: dict[str, int],
           repeats: int) -> list[dict[str, Any]]:
    """Release each model ``repeats`` times to the whole fleet; figures per size.

    Also the CPU seconds each process (with its children) spent from the request to
    the last install, beside what the broker and the subscribers spent on the reference.
    """
    out = []
    serial = 0
    for size, data in models.items():
        times: list[float] = []
        from_chunks: list[float] = []
        phases: dict[str, list[float]] = {
            "cloud_publishes_chunks_s": [], "chunks_to_manifest_s": [],
            "manifest_to_first_installed_s": [], "manifest_to_all_installed_s": [],
            "device_download_s": [], "device_verify_s": [], "device_load_and_install_s": []}
        cpu: dict[str, list[float]] = {name: [] for name in pids}
        for _ in range(repeats):
            serial += 1
            version = f"{serial}.0.0"
            registry.register("bench", version, data, ArtifactFormat.ONNX,
                              input_shape=[-1, 64])
            spec = RolloutSpec(model="bench", version=version, canary_percent=100.0,
                               probation_s=0.0, abort_alert_severity=None)
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            t0 = release(settings, spec)
            seen = installed_at(watcher, t0, version, ids, 300)
            for name, pid in pids.items():
                cpu[name].append(cpu_seconds(pid) - before[name])
            if len(seen) < len(ids):
                raise RuntimeError(f"{len(seen)} of {len(ids)} installed {version}")
            seen_now = watcher.since(t0)
            chunk_times = [ts for ts, topic, payload in seen_now
                           if payload and is_chunk_of(topic, version)]
            manifest_at = min(ts for ts, topic, payload in seen_now
                              if topic == TOPICS.release("bench") and payload
                              and f'"version":"{version}"'.encode() in payload)
            first_chunk = min(chunk_times)
            done = max(seen.values())
            times.append(done - t0)
            from_chunks.append(done - first_chunk)
            phases["cloud_publishes_chunks_s"].append(max(chunk_times) - first_chunk)
            phases["chunks_to_manifest_s"].append(manifest_at - max(chunk_times))
            phases["manifest_to_first_installed_s"].append(min(seen.values()) - manifest_at)
            phases["manifest_to_all_installed_s"].append(done - manifest_at)
            steps = device_steps(seen_now, version, ids)
            for name, (a, b) in {"device_download_s": ("downloading", "verifying"),
                                 "device_verify_s": ("verifying", "installing"),
                                 "device_load_and_install_s": ("installing", "installed"),
                                 }.items():
                spans = [t[b] - t[a] for t in steps.values() if a in t and b in t]
                if spans:
                    phases[name].append(statistics.median(spans))
            time.sleep(2.0)  # the rollout completes; the next one may start
        ref = statistics.median(refs[size])
        fan = statistics.median(from_chunks)
        out.append({
            "size_bytes": len(data),
            "request_to_all_installed_s": [round(t, 3) for t in times],
            "first_chunk_to_all_installed_s": [round(t, 3) for t in from_chunks],
            "reference_s": [round(t, 3) for t in refs[size]],
            "request_to_all_installed_s_median": round(statistics.median(times), 3),
            "first_chunk_to_all_installed_s_median": round(fan, 3),
            "reference_s_median": round(ref, 3),
            "ratio": round(fan / ref, 2),
            "ratio_from_request": round(statistics.median(times) / ref, 2),
            "cpu_s_median": {name: round(statistics.median(v), 3) for name, v in cpu.items()},
            "reference_cpu_s_median": {name: round(statistics.median(v), 3)
                                       for name, v in ref_cpu[size].items()},
            "fleet_cpu_ms_per_install": round(
                statistics.median(cpu["fleet"]) / len(ids) * 1000, 1),
            "reference_subscriber_cpu_ms_per_device": round(
                statistics.median(ref_cpu[size]["subscribers"]) / len(ids) * 1000, 1),
            "phases_median": {k: round(statistics.median(v), 3) for k, v in phases.items()
                              if v}})
        print(json.dumps(out[-1]), file=sys.stderr, flush=True)
    return out


def main() -> None:
    """Measure and print JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[1.0, 10.0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--per-process", type=int, default=MAX_AGENTS_PER_PROCESS // 2,
                        help="Simulated devices per fleet process (each one Python process; "
                        "the default spreads 100 devices over two, one per core here)")
    args = parser.parse_args()
    ids = [f"sim-{i:03d}" for i in range(args.devices)]
    results: dict[str, Any] = {"benchmark": "rollout", "devices": args.devices,
                               "devices_per_fleet_process": args.per_process,
                               "chunk_bytes": CHUNK_BYTES, "fanout": []}
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        folder = Path(tmp)
        broker = start_local_broker(folder / "broker", device_ids=[*ids, CANARY],
                                    kind="mosquitto")
        cloud_password = broker.credentials("edgefl-cloud")
        assert cloud_password is not None
        models = {size: mlp_onnx(size, folder / f"m{size}.onnx") for size in args.sizes_mb}
        ref_cpu: dict[float, dict[str, list[float]]] = {size: {} for size in models}
        refs = {size: [reference(broker, cloud_password[1], ids, data, ref_cpu[size])
                       for _ in range(args.repeats)] for size, data in models.items()}
        cloud, config = start_cloud(folder, broker)
        settings = CloudSettings.load(config)
        fleet = start_fleet(folder, broker, args.devices, settings, args.per_process)
        watcher = Watcher(broker, cloud_password[1],
                          TOPICS.root + "/#")
        try:
            wait_devices(settings, args.devices, fleet)
            registry = ModelRegistry(SqliteStore(settings.sqlite_path), settings.artifacts_dir)
            pids = {"broker": broker_pid(broker), "fleet": fleet.pid, "cloud": cloud.pid}
            results["fanout"] = fanout(settings, registry, watcher, ids, models, refs,
                                       ref_cpu, pids, args.repeats)
            serial = len(models) * args.repeats
            canary = HotCanary(folder, broker, settings)
            try:
                wait_devices(settings, args.devices + 1, fleet)
                small = models[min(models)]
                latencies = [abort_latency(settings, registry, watcher, canary, small,
                                           f"{serial + 1 + i}.0.0")
                             for i in range(args.repeats)]
            finally:
                canary.agent.stop()
            results["abort"] = {"alert_opened_to_rollback_s": [round(t, 3) for t in latencies],
                                "median_s": round(statistics.median(latencies), 3)}
        finally:
            watcher.close()
            for proc in (fleet, cloud):
                proc.send_signal(signal.SIGTERM)
            for proc in (fleet, cloud):
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
            broker.stop()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
