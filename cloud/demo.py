"""``edgefl demo``: start a broker and show the wire contract working end to end.

What exists so far (foundation): a real broker from edgefl's config, a few
in-process devices with their own MQTT connections and credentials publishing
a retained birth and psutil telemetry, an observer with the cloud identity
validating every message against the schemas, an ACL refusal, a malformed
message refused with its reason, and an abrupt disconnect whose LWT arrives
retained. Later issues add the cloud service, the fleet, FL and rollout.
"""

from __future__ import annotations

import json
import logging
import secrets
import socket
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode
from rich.console import Console
from rich.table import Table

from broker.local import LocalBroker, start_local_broker
from edge_node.system_metrics import hardware_info, sample
from schemas.base import decode_message, now
from schemas.catalog import CHANNELS
from schemas.device import DeviceState, DeviceTelemetry
from schemas.errors import DecodeError, TopicError
from schemas.topics import Topics

logger = logging.getLogger(__name__)

NOT_AUTHORIZED = 0x87
WAIT_S = 10.0


@dataclass
class DemoSummary:
    """What the demo observed; written as JSON with ``--json``."""

    broker: str
    mqtt_version: str
    devices: int
    telemetry_expected: int
    received: dict[str, int] = field(default_factory=dict)
    valid: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    acl_denied_reason: int | None = None
    lwt_offline_retained: bool = False
    ok: bool = False


class Observer:
    """Subscribes with the cloud identity and validates everything it receives."""

    def __init__(self, broker: LocalBroker, topics: Topics, protocol: MQTTProtocolVersion):
        self.topics = topics
        self.kinds: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.valid = 0
        self.offline_seen = threading.Event()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.client = _client("demo-observer", broker, "edgefl-cloud", protocol)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_args: subscribed.set()
        self.client.on_connect = lambda c, *_a: c.subscribe(topics.all(), qos=1)
        _connect(self.client, broker)
        if not subscribed.wait(WAIT_S):
            raise TimeoutError("observer did not get SUBACK")

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._changed:
            try:
                parsed = self.topics.parse(msg.topic)
                channel = CHANNELS[parsed.kind]
                self.kinds[parsed.kind.value] += 1
                if channel.message is not None and channel.content_type == "application/json":
                    message = decode_message(channel.message, msg.payload)
                    if isinstance(message, DeviceState) and message.state == "offline" \
                            and message.reason == "lwt":
                        self.offline_seen.set()
                self.valid += 1
            except (DecodeError, TopicError) as exc:
                reason = getattr(exc, "reason", type(exc).__name__)
                self.refused[reason] += 1
                logger.warning("refused message on %s: %s", msg.topic, exc)
            self._changed.notify_all()

    def wait_for(self, kind: str, count: int, timeout: float = WAIT_S) -> bool:
        """Wait (bounded) until ``count`` messages of ``kind`` arrived."""
        with self._changed:
            return self._changed.wait_for(lambda: self.kinds[kind] >= count, timeout)

    def wait_refused(self, count: int, timeout: float = WAIT_S) -> bool:
        """Wait (bounded) until ``count`` messages were refused."""
        with self._changed:
            return self._changed.wait_for(lambda: sum(self.refused.values()) >= count, timeout)


def _client(
    client_id: str, broker: LocalBroker, username: str, protocol: MQTTProtocolVersion
) -> mqtt.Client:
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol
    )
    creds = broker.credentials(username)
    if creds is not None:
        client.username_pw_set(*creds)
    return client


def _connect(client: mqtt.Client, broker: LocalBroker) -> None:
    connected = threading.Event()
    client.on_connect_fail = lambda *_a: logger.error("connect failed")
    previous: Any = client.on_connect

    def on_connect(c: mqtt.Client, u: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        if previous is not None:
            previous(c, u, flags, rc, props)
        if not rc.is_failure:
            connected.set()

    client.on_connect = on_connect
    client.connect(broker.host, broker.port, keepalive=30)
    client.loop_start()
    if not connected.wait(WAIT_S):
        raise TimeoutError(f"{client._client_id!r} could not connect")


class DemoDevice:
    """An in-process device: birth with LWT, psutil telemetry with sequence numbers."""

    def __init__(self, device_id: str, broker: LocalBroker, topics: Topics,
                 protocol: MQTTProtocolVersion) -> None:
        self.device_id = device_id
        self.topics = topics
        self.session_id = secrets.token_hex(6)
        self.seq = 0
        self.client = _client(device_id, broker, device_id, protocol)
        will = DeviceState(device_id=device_id, state="offline", bd_seq=0, ts=now(), reason="lwt")
        self.client.will_set(topics.device_state(device_id), will.to_json(), qos=1, retain=True)
        self.acks: dict[int, int] = {}
        self._acked = threading.Condition()
        self.client.on_publish = self._on_publish
        _connect(self.client, broker)
        sys = sample()
        birth = DeviceState(
            device_id=device_id, state="online", bd_seq=0, ts=now(), agent_version="demo",
            hardware=hardware_info(), memory_available_mb=sys.memory_available_mb,
            reason="birth",
        )
        self.publish(topics.device_state(device_id), birth.to_json(), retain=True)

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, rc: ReasonCode, _p: Any) -> None:
        with self._acked:
            self.acks[mid] = rc.value
            self._acked.notify_all()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> int:
        """Publish QoS 1 and return the broker's PUBACK reason code (0 = success)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        with self._acked:
            if not self._acked.wait_for(lambda: info.mid in self.acks, WAIT_S):
                raise TimeoutError(f"no PUBACK for {topic}")
            return self.acks.pop(info.mid)

    def report(self) -> None:
        """Measure with psutil and publish one DeviceTelemetry."""
        s = sample()
        telemetry = DeviceTelemetry(
            device_id=self.device_id, session_id=self.session_id, seq=self.seq, ts=now(),
            cpu_percent=s.cpu_percent, memory_percent=s.memory_percent,
            disk_percent=s.disk_percent, temperature_c=s.temperature_c,
            battery_percent=s.battery_percent, battery_plugged=s.battery_plugged,
            uptime_s=s.uptime_s, interval_s=0.2,
        )
        self.seq += 1
        self.publish(self.topics.telemetry(self.device_id), telemetry.to_json())

    def drop_connection(self) -> None:
        """Abrupt loss: stop the network loop and cut the TCP socket (no DISCONNECT)."""
        self.client.loop_stop()
        sock = self.client.socket()
        if isinstance(sock, socket.socket):
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def shutdown(self) -> None:
        """Clean stop: retained offline state, then DISCONNECT."""
        state = DeviceState(device_id=self.device_id, state="offline", bd_seq=0, ts=now(),
                            reason="shutdown")
        self.publish(self.topics.device_state(self.device_id), state.to_json(), retain=True)
        self.client.disconnect()
        self.client.loop_stop()


def _retained_state(broker: LocalBroker, topics: Topics, device_id: str,
                    protocol: MQTTProtocolVersion, expect: str) -> bool:
    """Whether a late subscriber finds ``expect`` retained on a device's state topic.

    Re-subscribes (each SUBSCRIBE re-sends retained messages) until the state is
    seen or the bounded wait ends: amqtt delivers a will before it stores it.
    """
    found: list[str] = []
    changed = threading.Condition()

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        with changed:
            if msg.retain:
                found.append(decode_message(DeviceState, msg.payload).state)
            changed.notify_all()

    topic = topics.device_state(device_id)
    late = _client("demo-late-subscriber", broker, "edgefl-cloud", protocol)
    late.on_message = on_message
    _connect(late, broker)
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


def run_demo(
    *, devices: int = 3, reports: int = 5, data_dir: Path | None = None,
    json_path: Path | None = None, console: Console | None = None,
    broker_kind: Literal["auto", "mosquitto", "amqtt"] = "auto",
) -> DemoSummary:
    """Run the demo end to end and return what was observed."""
    console = console or Console()
    with tempfile.TemporaryDirectory(prefix="edgefl-demo-") as tmp:
        folder = data_dir or Path(tmp)
        ids = [f"demo-{i:02d}" for i in range(devices)]
        broker = start_local_broker(folder / "broker", device_ids=ids, kind=broker_kind)
        try:
            return _run(broker, ids, reports, console, json_path)
        finally:
            broker.stop()


def _run(broker: LocalBroker, ids: list[str], reports: int, console: Console,
         json_path: Path | None) -> DemoSummary:
    if broker.kind == "amqtt":
        console.print(
            "[yellow]note:[/] mosquitto is not installed; using the embedded amqtt broker "
            "(MQTT 3.1.1, no ACL). `sudo apt-get install mosquitto` for the real one."
        )
    protocol = mqtt.MQTTv5 if broker.mqtt5 else mqtt.MQTTv311
    console.print(f"broker: {broker.kind} on {broker.host}:{broker.port}")
    topics = Topics()
    summary = DemoSummary(broker=broker.kind, mqtt_version="5" if broker.mqtt5 else "3.1.1",
                          devices=len(ids), telemetry_expected=len(ids) * reports)
    observer = Observer(broker, topics, protocol)
    fleet = [DemoDevice(d, broker, topics, protocol) for d in ids]
    for _ in range(reports):
        for device in fleet:
            device.report()
    observer.wait_for("telemetry", summary.telemetry_expected)

    # A malformed message (CPU over 100 %) is refused by the observer with its reason.
    bad = json.loads(DeviceTelemetry(
        device_id=ids[0], session_id=fleet[0].session_id, seq=fleet[0].seq, ts=now(),
        cpu_percent=1.0, memory_percent=1.0, disk_percent=1.0).model_dump_json())
    bad["cpu_percent"] = 250.0
    fleet[0].publish(topics.telemetry(ids[0]), json.dumps(bad).encode())
    observer.wait_refused(1)

    if broker.mqtt5 and len(fleet) > 1:
        # The ACL: a device writing another device's topic is refused (reason 0x87).
        summary.acl_denied_reason = fleet[0].publish(topics.telemetry(ids[1]), b"{}")

    fleet[-1].drop_connection()
    if observer.offline_seen.wait(WAIT_S):
        summary.lwt_offline_retained = _retained_state(broker, topics, ids[-1], protocol,
                                                       "offline")
    for device in fleet[:-1]:
        device.shutdown()
    observer.client.disconnect()
    observer.client.loop_stop()

    summary.received = dict(observer.kinds)
    summary.valid = observer.valid
    summary.refused = dict(observer.refused)
    summary.ok = (
        observer.kinds["telemetry"] >= summary.telemetry_expected
        and summary.lwt_offline_retained
        and summary.refused.get("validation", 0) >= 1
        and (summary.acl_denied_reason in (None, NOT_AUTHORIZED))
    )
    _print(console, summary)
    if json_path is not None:
        json_path.write_text(json.dumps(asdict(summary), indent=2) + "\n")
    return summary


def _print(console: Console, summary: DemoSummary) -> None:
    table = Table(title="what the broker carried")
    table.add_column("topic kind")
    table.add_column("messages", justify="right")
    for kind, count in sorted(summary.received.items()):
        table.add_row(kind, str(count))
    console.print(table)
    console.print(f"validated: {summary.valid}, refused: {summary.refused or 'none'}")
    if summary.acl_denied_reason is not None:
        verdict = "refused" if summary.acl_denied_reason == NOT_AUTHORIZED else "NOT refused"
        console.print(f"ACL: device writing another device's topic {verdict} "
                      f"(reason 0x{summary.acl_denied_reason:02x})")
    console.print(f"LWT: abrupt disconnect -> retained offline state "
                  f"{'received' if summary.lwt_offline_retained else 'MISSING'}")
    console.print("[green]demo ok[/]" if summary.ok else "[red]demo FAILED[/]")

