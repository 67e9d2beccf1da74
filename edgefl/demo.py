"""``edgefl demo``: the platform end to end on one machine.

A real broker from edgefl's config; a simulated fleet of real edge agents (each
with its own MQTT connection, credentials, state folder, psutil telemetry and
offline buffer); the cloud service, whose coordinator trains a digits
classifier with federated averaging across the fleet and registers the result;
the ONNX export registered as the release, handed to the service's rollout
manager, signed and rolled out in stages (a canary fifth, then the fleet); every
device installs it (sha256, Ed25519, A/B slot, smoke test) and serves it,
reporting latency percentiles and accuracy on labelled feedback; an observer
with the cloud identity that validates every message against the schemas; a
real alert, an ACL refusal, a malformed message refused with its reason, and an
abrupt disconnect whose LWT arrives retained.
"""

from __future__ import annotations

import contextlib
import json
import logging
import ssl
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from broker.local import LocalBroker, start_local_broker
from cloud.demo_model import centralized_baseline
from cloud.models.formats import ArtifactFormat
from cloud.models.rollout import RolloutSpec
from cloud.models.rollout_store import RolloutStore
from cloud.releases import public_key_b64, save_signing_key
from cloud.service import ServiceThread
from cloud.settings import CloudSettings
from cloud.storage.sqlite_store import SqliteStore
from edge_node.agent import EdgeAgent
from edge_node.errors import EdgeError
from edge_node.settings import EdgeSettings
from fl_tasks.base import Partition
from fl_tasks.digits import DigitsTask
from schemas.alerts import Alert
from schemas.base import decode_message, now
from schemas.catalog import CHANNELS
from schemas.device import (
    DeploymentState,
    DeploymentStatus,
    DeviceState,
    DeviceTelemetry,
    ModelMetrics,
)
from schemas.errors import DecodeError, TopicError
from schemas.mqtt_properties import topic_properties
from schemas.topics import Topics

logger = logging.getLogger(__name__)

NOT_AUTHORIZED = 0x87
WAIT_S = 20.0
MODEL = "digits-mlp"
DEMO_RECIPES = ("onnx", "onnx-int8-dynamic", "torchscript")
"""What the demo's optimizer makes of the federated model (the fast recipes)."""
KEY_ID = "demo-release"


@dataclass
class DeviceResult:
    """What one device did."""

    device_id: str
    installed_version: str | None = None
    accuracy: float | None = None
    latency_ms_p50: float | None = None
    latency_ms_p95: float | None = None


@dataclass
class DemoSummary:
    """What the demo observed; written as JSON with ``--json``."""

    broker: str
    mqtt_version: str
    devices: int
    telemetry_expected: int
    tls: bool = False
    """Every client (devices, cloud, observer) connected with its certificate (mTLS)."""
    received: dict[str, int] = field(default_factory=dict)
    valid: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    model_test_accuracy: float | None = None
    fleet: list[DeviceResult] = field(default_factory=list)
    acl_denied_reason: int | None = None
    lwt_offline_retained: bool = False
    alert: dict[str, object] = field(default_factory=dict)
    fl: dict[str, object] = field(default_factory=dict)
    rollout: dict[str, object] = field(default_factory=dict)
    optimized: list[dict[str, object]] = field(default_factory=list)
    released_version: str | None = None
    cloud_stored_telemetry: int = 0
    cloud_devices_online: int = 0
    duration_s: float = 0.0
    ok: bool = False


class Observer:
    """Subscribes with the cloud identity and validates everything it receives."""

    def __init__(self, broker: LocalBroker, topics: Topics) -> None:
        self.topics = topics
        self.protocol = 5 if broker.mqtt5 else 4
        self.kinds: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.valid = 0
        self.messages: list[tuple[str, bytes, bool, float]] = []
        """(topic, payload, retained, when received)"""
        self._changed = threading.Condition()
        self.client = _client("demo-observer", broker, "edgefl-cloud")
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.on_connect = lambda c, *_a: c.subscribe(topics.all(), qos=1)
        _connect(self.client, broker, "edgefl-cloud")
        self.client.loop_start()
        if not subscribed.wait(WAIT_S):
            raise TimeoutError("observer did not get SUBACK")

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._changed:
            try:
                parsed = self.topics.parse(msg.topic)
                channel = CHANNELS[parsed.kind]
                self.kinds[parsed.kind.value] += 1
                if channel.message is not None and channel.content_type == "application/json" \
                        and msg.payload:
                    decode_message(channel.message, msg.payload)
                self.valid += 1
                self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain),
                                      time.time()))
            except (DecodeError, TopicError) as exc:
                self.refused[getattr(exc, "reason", type(exc).__name__)] += 1
                logger.warning("refused message on %s: %s", msg.topic, exc)
            self._changed.notify_all()

    def wait(self, predicate: object, timeout: float = WAIT_S) -> bool:
        """Wait (bounded) until ``predicate()`` holds."""
        with self._changed:
            return self._changed.wait_for(predicate, timeout)  # type: ignore[arg-type]

    def on_topic(self, topic: str) -> list[bytes]:
        """Payloads received on ``topic``."""
        with self._changed:
            return [p for t, p, _, _ in self.messages if t == topic]

    def timed(self, topic: str) -> list[tuple[float, bytes]]:
        """(when received, payload) of the messages on ``topic``."""
        with self._changed:
            return [(at, p) for t, p, _, at in self.messages if t == topic]

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish as the cloud, QoS 1, and wait until it is sent."""
        properties = topic_properties(self.topics, topic, protocol=self.protocol,
                                      payload=payload)
        self.client.publish(topic, payload, qos=1, retain=retain,
                            properties=properties).wait_for_publish(WAIT_S)

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()


def _client(client_id: str, broker: LocalBroker, username: str) -> mqtt.Client:
    """An unconnected client of ``username``: its certificate with TLS, else its password."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5 if broker.mqtt5 else mqtt.MQTTv311)
    if broker.tls:
        files = broker.tls_files(username)
        client.tls_set(ca_certs=str(files["ca_file"]), certfile=str(files["cert_file"]),
                       keyfile=str(files["key_file"]), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        return client
    creds = broker.credentials(username)
    if creds is not None:
        client.username_pw_set(*creds)
    return client


def _connect(client: mqtt.Client, broker: LocalBroker, username: str) -> None:
    """Connect ``client`` (made by :func:`_client`) to the listener of ``username``."""
    port = broker.tls_port_for(username) if broker.tls else broker.port_for(username)
    client.connect(broker.host, port)


def _retained_state(broker: LocalBroker, topics: Topics, device_id: str, expect: str) -> bool:
    """Whether a late subscriber finds ``expect`` retained on a device's state topic.

    Re-subscribes (each SUBSCRIBE re-sends retained messages) until the state is
    seen or the bounded wait ends: amqtt delivers a will before it stores it.
    """
    found: list[str] = []
    changed = threading.Condition()

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        with changed:
            if msg.retain and msg.topic == topic:
                try:
                    found.append(decode_message(DeviceState, msg.payload).state)
                except DecodeError as exc:
                    logger.warning("late subscriber: unexpected payload on %s: %s",
                                   msg.topic, exc)
            changed.notify_all()

    topic = topics.device_state(device_id)
    late = _client("demo-late-subscriber", broker, "edgefl-cloud")
    late.on_message = on_message
    _connect(late, broker, "edgefl-cloud")
    late.loop_start()
    deadline = time.monotonic() + WAIT_S
    ok = False
    while not ok and time.monotonic() < deadline:
        late.unsubscribe(topic)
        late.subscribe(topic, qos=1)
        with changed:
            changed.wait_for(lambda: bool(found), 0.5)
            ok = expect in found
            found.clear()
    late.disconnect()
    late.loop_stop()
    return ok


FL_TASK = "digits"
FL_ALPHA = 0.5


def _fl_config(rounds: int, devices: int) -> dict[str, object]:
    return {
        "task": "fl_tasks.digits:DigitsTask", "rounds": rounds, "strategy": "fedavg",
        "fraction_fit": 0.5, "min_fit_clients": max(1, devices // 2),
        "min_available_clients": devices, "round_timeout_s": 30.0,
        "hyperparams": {"local_epochs": 2, "batch_size": 16, "learning_rate": 0.1,
                        "momentum": 0.5},
        "model_name": MODEL,
    }


def _agent(broker: LocalBroker, device_id: str, folder: Path, key: Ed25519PrivateKey,
           interval_s: float, index: int, count: int) -> EdgeAgent:
    mqtt_settings = broker.client_settings(device_id) | {"reconnect_min_s": 0.2,
                                                         "reconnect_max_s": 2.0}
    settings = EdgeSettings.model_validate({
        "device_id": device_id, "state_dir": folder / device_id, "mqtt": mqtt_settings,
        "telemetry": {"interval_s": interval_s},
        "ota": {"trusted_keys": {KEY_ID: public_key_b64(key)}},
        "fl": {"tasks": {FL_TASK: {"path": "fl_tasks.digits:DigitsTask", "partition": index,
                                   "partitions": count, "scheme": "dirichlet",
                                   "alpha": FL_ALPHA}}},
    })
    return EdgeAgent(settings)


def run_demo(
    *, devices: int = 10, reports: int = 5, rounds: int = 15, data_dir: Path | None = None,
    json_path: Path | None = None, plot_dir: Path | None = None,
    console: Console | None = None,
    broker_kind: Literal["auto", "mosquitto", "amqtt"] = "auto",
    tls: bool = False,
) -> DemoSummary:
    """Run the demo end to end and return what was observed.

    With ``tls`` every client (the devices, the cloud, the observer) connects to
    Mosquitto's mTLS listeners with a certificate from the broker's CAs, and no password.
    """
    console = console or Console()
    with tempfile.TemporaryDirectory(prefix="edgefl-demo-") as tmp:
        folder = data_dir or Path(tmp)
        ids = [f"demo-{i:02d}" for i in range(devices)]
        broker = start_local_broker(folder / "broker", device_ids=ids, kind=broker_kind,
                                    tls=tls)
        try:
            return _run(broker, ids, reports, rounds, folder, console, json_path, plot_dir)
        finally:
            broker.stop()


def _run(broker: LocalBroker, ids: list[str], reports: int, rounds: int, folder: Path,
         console: Console, json_path: Path | None, plot_dir: Path | None) -> DemoSummary:
    started = time.monotonic()
    if broker.kind == "amqtt":
        console.print(
            "[yellow]note:[/] mosquitto is not installed; using the embedded amqtt broker "
            "(MQTT 3.1.1, no ACL). `sudo apt-get install mosquitto` for the real one."
        )
    console.print(f"broker: {broker.kind} on {broker.host}:{broker.port}")
    if broker.tls:
        tls = broker.settings.tls
        console.print(f"mTLS: devices on {tls.host}:{tls.port}, the cloud on "
                      f"{tls.host}:{tls.service_port} (the services' CA); every client "
                      "below connects with its certificate, no password")
    topics = Topics()
    interval = 0.25
    summary = DemoSummary(broker=broker.kind, mqtt_version="5" if broker.mqtt5 else "3.1.1",
                          tls=broker.tls, devices=len(ids),
                          telemetry_expected=len(ids) * reports)
    observer = Observer(broker, topics)
    key = Ed25519PrivateKey.generate()
    save_signing_key(key, folder / "cloud" / "keys" / "release.pem")
    cloud = _cloud(broker, folder / "cloud", _fl_config(rounds, len(ids))).start()
    console.print(f"cloud: service {cloud.settings.instance} online, store "
                  f"{cloud.settings.sqlite_path}")
    fleet = [_agent(broker, d, folder / "fleet", key, interval, i, len(ids))
             for i, d in enumerate(ids)]
    try:
        for agent in fleet:
            agent.start()
        for agent in fleet:
            if not agent.session.connected.wait(WAIT_S):
                raise TimeoutError(f"{agent.device_id} did not connect")
        console.print(f"fleet: {len(fleet)} agents online, each with a Dirichlet({FL_ALPHA}) "
                      "share of the digits")
        weights = _federated(cloud, summary, console, rounds, len(ids))
        _rollout(cloud, observer, topics, fleet, weights, summary, console)
        observer.wait(lambda: observer.kinds["telemetry"] >= summary.telemetry_expected,
                      timeout=reports * interval * 4 + WAIT_S)
        _alert(observer, topics, fleet[len(fleet) // 2], summary, console)
        _faults(broker, observer, topics, fleet, summary, console)
        summary.cloud_devices_online = len(cloud.service.registry.devices(online=True))
    finally:
        for agent in fleet:
            agent.stop()
        cloud.stop()
        store = SqliteStore(cloud.settings.sqlite_path)  # the service closed its own
        summary.cloud_stored_telemetry = int(store.query(
            "SELECT COUNT(*) n FROM telemetry")[0]["n"])
        store.close()
        observer.close()
    summary.received = dict(observer.kinds)
    summary.valid = observer.valid
    summary.refused = dict(observer.refused)
    summary.duration_s = round(time.monotonic() - started, 1)
    summary.ok = (
        observer.kinds["telemetry"] >= summary.telemetry_expected
        and summary.lwt_offline_retained
        and summary.refused.get("validation", 0) >= 1
        and summary.acl_denied_reason in (None, NOT_AUTHORIZED)
        and all(d.installed_version == summary.released_version and d.accuracy is not None
                for d in summary.fleet)
        and summary.alert.get("resolved") is True
        and summary.fl.get("final_accuracy") is not None
        and summary.rollout.get("state") == "completed"
        and summary.cloud_stored_telemetry >= summary.telemetry_expected
    )
    _print(console, summary)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(asdict(summary), indent=2) + "\n")
    if plot_dir is not None:
        from edgefl.demo_plots import write_plots

        charts = write_plots(asdict(summary), plot_dir)
        console.print(f"charts: {', '.join(str(p) for p in charts)}")
    return summary


def _federated(cloud: ServiceThread, summary: DemoSummary, console: Console, rounds: int,
               devices: int) -> dict[str, np.ndarray]:
    """FedAvg rounds over MQTT with partial participation, shown round by round."""
    coordinator = cloud.service.coordinators[FL_TASK]
    with Progress(console=console, transient=False) as progress:
        bar = progress.add_task("federated rounds (FedAvg, 50 % of devices per round)",
                                total=rounds)
        deadline = time.monotonic() + rounds * 60
        done = threading.Event()
        while coordinator.state.state.value not in ("finished", "failed"):
            if time.monotonic() > deadline:
                raise TimeoutError("federated training did not finish")
            progress.update(bar, completed=coordinator.state.round)
            done.wait(0.1)
        progress.update(bar, completed=coordinator.state.round)
    if coordinator.state.state.value == "failed":
        raise RuntimeError(f"federated training failed: {coordinator.state.message}")
    history = [h.model_dump(mode="json") for h in coordinator.history()]

    task = DigitsTask()
    config = cloud.settings.fl[FL_TASK]
    partitions = [Partition(index=i, count=devices, scheme="dirichlet", alpha=FL_ALPHA)
                  for i in range(devices)]
    epochs = max(1, round(rounds * config.hyperparams.local_epochs * config.fraction_fit))
    baseline = centralized_baseline(task, partitions, config.hyperparams, epochs)
    summary.fl = {
        "rounds": [{k: h.get(k) for k in ("round", "central_accuracy", "train_loss",
                                          "bytes_received")}
                   | {"participants": len(h["participants"])} for h in history],
        "final_accuracy": history[-1]["central_accuracy"] if history else None,
        "centralized_baseline_accuracy": baseline.accuracy,
        "centralized_epochs": baseline.epochs,
        "bytes_on_wire": sum(h["bytes_received"] for h in history),
        "epsilon_spent": history[-1].get("epsilon_spent") if history else None,
    }
    table = Table(title="federated training (central test accuracy per round)")
    for column in ("round", "participants", "train loss", "accuracy", "bytes"):
        table.add_column(column, justify="right")
    for h in history:
        table.add_row(str(h["round"]), str(len(h["participants"])),
                      f"{h['train_loss']:.3f}" if h.get("train_loss") is not None else "-",
                      f"{h['central_accuracy']:.3f}", str(h["bytes_received"]))
    console.print(table)
    console.print(f"federated: {summary.fl['final_accuracy']:.3f}; centralized baseline on the "
                  f"union of the same data, {baseline.epochs} epochs: {baseline.accuracy:.3f}")
    return dict(coordinator.global_weights)


def _rollout(cloud: ServiceThread, observer: Observer, topics: Topics, fleet: list[EdgeAgent],
             weights: dict[str, np.ndarray], summary: DemoSummary, console: Console) -> None:
    """Register the federated model as ONNX and hand a rollout to the cloud service.

    The rollout manager signs and publishes it to a canary fifth of the fleet, then to
    every device; each installs, serves and reports.
    """
    task = DigitsTask()
    test_x, test_y = task.central_data()
    accuracy = task.evaluate(weights, test_x, test_y).accuracy
    summary.model_test_accuracy = round(accuracy, 4)
    released = _optimize(cloud, summary, console)
    summary.released_version = released
    version = cloud.service.models.get(MODEL, released)
    requests = RolloutStore(cloud.service.store)
    spec = RolloutSpec(model=MODEL, version=released, canary_percent=20.0, steps=[100.0],
                       probation_s=2.0)
    request_id = requests.request("release", spec.model_dump(mode="json"))
    observer.wait(lambda: (r := requests.get_request(request_id)) is not None
                  and r.state != "pending")
    answer = requests.get_request(request_id)
    if answer is None or answer.state != "done":
        raise RuntimeError(f"the release was refused: {answer.detail if answer else '-'}")
    console.print(f"release: {MODEL} {released} (from {version.parent_version}), "
                  f"{version.size_bytes} bytes, signed; {answer.detail}")

    def completed() -> bool:
        rollout = requests.latest(MODEL)
        return rollout is not None and rollout.state in ("completed", "aborted")

    observer.wait(completed, timeout=WAIT_S * 3)
    rollout = requests.latest(MODEL)
    summary.rollout = {} if rollout is None else {
        "id": rollout.id, "state": rollout.state, "canary": rollout.canary,
        "stages": rollout.stage_sizes, "reason": rollout.reason}
    console.print(f"rollout: {rollout.state if rollout else 'missing'}: canary "
                  f"{', '.join(rollout.canary) if rollout else '-'}, then the whole fleet")

    def installed(device_id: str) -> bool:
        for payload in observer.on_topic(topics.deployment_status(device_id, MODEL)):
            if decode_message(DeploymentStatus, payload).state is DeploymentState.INSTALLED:
                return True
        return False

    observer.wait(lambda: all(installed(a.device_id) for a in fleet))
    x, y = test_x, test_y
    shares = np.array_split(np.arange(len(y)), len(fleet))
    for agent, share in zip(fleet, shares, strict=True):
        result = DeviceResult(agent.device_id)
        summary.fleet.append(result)
        if agent.store.active(MODEL) is None:
            continue
        result.installed_version = agent.store.active(MODEL).version  # type: ignore[union-attr]
        for i in share:  # one request per sample, as an application would
            logits = agent.infer(MODEL, x[i:i + 1])
            agent.inference.record_feedback(MODEL, int(logits.argmax() == y[i]), 1)
        agent.request_report()
    def measured(device_id: str, count: int) -> ModelMetrics | None:
        """The first metrics that cover this device's inferences and feedback."""
        for payload in observer.on_topic(topics.model_metrics(device_id, MODEL)):
            metrics = decode_message(ModelMetrics, payload)
            if metrics.accuracy is not None and metrics.sample_count >= count:
                return metrics
        return None

    observer.wait(lambda: all(measured(a.device_id, len(s)) for a, s in
                              zip(fleet, shares, strict=True)))
    for result, share in zip(summary.fleet, shares, strict=True):
        metrics = measured(result.device_id, len(share))
        if metrics is not None:
            result.accuracy = metrics.accuracy
            result.latency_ms_p50 = metrics.latency_ms_p50
            result.latency_ms_p95 = metrics.latency_ms_p95


def _optimize(cloud: ServiceThread, summary: DemoSummary, console: Console) -> str:
    """The optimizer on the federated weights; returns the ONNX build to release.

    Each output is converted, loaded in the edge runtime of its format, evaluated on
    the task's test split, timed and registered as a child of the weights.
    """
    from cloud.models.optimizer import Optimizer, Options
    from edgefl.model_cli import edge_runner

    models = cloud.service.models
    trained = [v for v in models.versions(MODEL) if v.format is ArtifactFormat.WEIGHTS
               and v.note is not None and v.note.startswith("final")]
    if not trained:
        raise RuntimeError("the federated task registered no final model")
    with console.status(f"optimizing {MODEL} {trained[-1].version}") as status:
        report = Optimizer(models, edge_runner()).optimize(
            MODEL, trained[-1].version, Options(recipes=DEMO_RECIPES), progress=status.update)
    summary.optimized = [
        {"recipe": o.recipe, "version": o.version, "state": o.state,
         "size_bytes": o.size_bytes, "compression": o.compression, "accuracy": o.accuracy,
         "accuracy_delta_points": o.accuracy_delta_points,
         "latency_ms_p50": o.latency_ms_p50, "latency_ms_p99": o.latency_ms_p99}
        for o in report.outputs]
    table = Table(title=f"optimized for the edge ({MODEL} {trained[-1].version}, accuracy "
                  f"{report.parent_accuracy:.3f})")
    for column in ("recipe", "state", "bytes", "x smaller", "accuracy", "p50 ms", "p99 ms"):
        table.add_column(column, justify="right")
    for o in report.outputs:
        table.add_row(o.recipe, o.state, str(o.size_bytes or "-"),
                      f"{o.compression:.2f}" if o.compression else "-",
                      f"{o.accuracy:.3f}" if o.accuracy is not None else "-",
                      f"{o.latency_ms_p50:.3f}" if o.latency_ms_p50 is not None else "-",
                      f"{o.latency_ms_p99:.3f}" if o.latency_ms_p99 is not None else "-")
    console.print(table)
    onnx = [o.version for o in report.outputs if o.recipe == "onnx" and o.version
            and o.state == "registered"]
    if not onnx:
        raise RuntimeError(f"the optimizer produced no ONNX build: {report.outputs}")
    return onnx[0]


def _cloud(broker: LocalBroker, folder: Path, fl: dict[str, object]) -> ServiceThread:
    mqtt = broker.client_settings("edgefl-cloud")
    settings = CloudSettings.model_validate({
        "instance": "demo-cloud", "data_dir": folder, "mqtt": mqtt,
        "ingest": {"flush_interval_s": 0.1}, "alerts": {"tick_interval_s": 0.5},
        "fl": {FL_TASK: fl}, "models": {"key_id": KEY_ID, "chunk_bytes": 16 * 1024},
    })
    return ServiceThread(settings)


def _alert(observer: Observer, topics: Topics, agent: EdgeAgent, summary: DemoSummary,
           console: Console) -> None:
    """A faulty application on one device raises a real alert, then it clears.

    The application feeds inputs the model cannot take: the inference errors are
    real, the device's error rate passes 5 %, and the cloud's default rule
    `device_error_rate_high` opens an alert; when the application stops, it clears.
    """
    rule = "device_error_rate_high"
    topic = topics.alert(agent.device_id, rule)
    good = np.zeros((1, 64), dtype=np.float32)
    bad = np.zeros((1, 64), dtype=np.float64)
    stop = threading.Event()

    def faulty_application() -> None:
        while not stop.is_set():
            agent.infer(MODEL, good)
            with contextlib.suppress(EdgeError):  # the app ignores it; the agent counts it
                agent.infer(MODEL, bad)
            stop.wait(0.02)

    app = threading.Thread(target=faulty_application, daemon=True)
    began = time.time()
    app.start()
    opened = observer.wait(lambda: any(p for p in observer.on_topic(topic)))
    stop.set()
    app.join()
    resolved = opened and observer.wait(lambda: observer.on_topic(topic)[-1:] == [b""])
    summary.alert = {"device": agent.device_id, "rule": rule, "opened": opened,
                     "resolved": resolved}
    if resolved:  # a few more reports after the clear, for the chart
        seen = len(observer.on_topic(topics.telemetry(agent.device_id)))
        observer.wait(lambda: len(observer.on_topic(topics.telemetry(agent.device_id)))
                      >= seen + 4)
    summary.alert["telemetry"] = [
        {"ts": reading.ts, "error_rate_percent": round(reading.error_rate_percent, 3)}
        for reading in (decode_message(DeviceTelemetry, p)
                        for p in observer.on_topic(topics.telemetry(agent.device_id)))
        if reading.ts >= began - 2.0]
    if opened:
        alert = decode_message(Alert, next(p for p in observer.on_topic(topic) if p))
        summary.alert |= {"severity": alert.severity.value, "message": alert.message,
                          "opened_at": alert.opened_at, "threshold": alert.threshold}
    if resolved:
        summary.alert["cleared_at"] = next(at for at, p in reversed(observer.timed(topic))
                                           if not p)
        console.print(f"alert: {alert.severity.value} {rule} on {agent.device_id}: "
                      f"{alert.message}; {'cleared' if resolved else 'still open'}")


def _faults(broker: LocalBroker, observer: Observer, topics: Topics, fleet: list[EdgeAgent],
            summary: DemoSummary, console: Console) -> None:
    """A malformed message, an ACL refusal and an abrupt disconnect."""
    first = fleet[0]
    console.print(f"[yellow]deliberate fault[/]: {first.device_id} sends telemetry with "
                  "cpu_percent 250; the cloud must refuse it and count it (the WARNING "
                  "that follows is expected)")
    payload = json.dumps({"schema_version": 1, "device_id": first.device_id,
                          "session_id": first.session_id, "seq": 10**6, "ts": now(),
                          "cpu_percent": 250.0, "memory_percent": 1.0,
                          "disk_percent": 1.0}).encode()
    first.session.publish_wait(topics.telemetry(first.device_id), payload)
    observer.wait(lambda: sum(observer.refused.values()) >= 1)
    if broker.mqtt5 and len(fleet) > 1:
        console.print(f"[yellow]deliberate fault[/]: {first.device_id} writes on "
                      f"{fleet[1].device_id}'s telemetry topic; the broker's ACL must refuse it")
        summary.acl_denied_reason = first.session.publish_wait(
            topics.telemetry(fleet[1].device_id), b"{}")
    last = fleet[-1]
    bd_seq = last.session.bd_seq
    console.print(f"[yellow]deliberate fault[/]: {last.device_id} drops its connection "
                  "without a goodbye; the broker must publish its will (offline)")
    last.session.drop()

    def died() -> bool:
        for payload in observer.on_topic(topics.device_state(last.device_id)):
            state = decode_message(DeviceState, payload)
            if (state.state, state.bd_seq, state.reason) == ("offline", bd_seq, "lwt"):
                return True
        return False

    if observer.wait(died):
        summary.lwt_offline_retained = _retained_state(broker, topics, last.device_id,
                                                       "offline")
    last.session.connected.wait(WAIT_S)  # it reconnects by itself, with a new bd_seq


def _print(console: Console, summary: DemoSummary) -> None:
    table = Table(title="what the broker carried")
    table.add_column("topic kind")
    table.add_column("messages", justify="right")
    for kind, count in sorted(summary.received.items()):
        table.add_row(kind, str(count))
    console.print(table)
    fleet = Table(title=f"{MODEL} on the fleet (central test accuracy "
                  f"{summary.model_test_accuracy})")
    for column in ("device", "installed", "accuracy", "p50 ms", "p95 ms"):
        fleet.add_column(column)
    for d in summary.fleet:
        fleet.add_row(d.device_id, d.installed_version or "-",
                      f"{d.accuracy:.3f}" if d.accuracy is not None else "-",
                      f"{d.latency_ms_p50:.3f}" if d.latency_ms_p50 is not None else "-",
                      f"{d.latency_ms_p95:.3f}" if d.latency_ms_p95 is not None else "-")
    console.print(fleet)
    console.print(f"validated: {summary.valid}, refused: {summary.refused or 'none'}")
    console.print(f"cloud: stored {summary.cloud_stored_telemetry} telemetry messages; "
                  f"{summary.cloud_devices_online} devices online in its registry")
    if summary.acl_denied_reason is not None:
        verdict = "refused" if summary.acl_denied_reason == NOT_AUTHORIZED else "NOT refused"
        console.print(f"ACL: device writing another device's topic {verdict} "
                      f"(reason 0x{summary.acl_denied_reason:02x})")
    console.print(f"LWT: abrupt disconnect -> retained offline state "
                  f"{'received' if summary.lwt_offline_retained else 'MISSING'}")
    console.print(f"[green]demo ok[/] in {summary.duration_s} s" if summary.ok
                  else "[red]demo FAILED[/]")
