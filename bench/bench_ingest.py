"""Cloud ingest throughput: publish -> validated -> stored, against a bare paho subscriber.

Device clients in a separate process publish valid DeviceTelemetry (QoS 1) as fast
as they can on loopback through Mosquitto. In the same run we measure:

* ``bare``: a paho subscriber that only counts messages;
* ``sqlite``: the cloud service (aiomqtt, validation, registry, default alert rules,
  SQLite sink), counting rows stored;
* ``influx``: the same with the InfluxDB sink writing to VictoriaMetrics as well;
* ``sqlite_during_fl`` (with ``--fl-params N``): the same as ``sqlite`` while a
  federated task of an N-parameter MLP runs in the same service: 8 simulated
  devices answer every round with a full-size update, so the coordinator decodes,
  validates, stores and aggregates updates all along the measurement.

Rates are messages per second from the first to the last message; medians of
``--repeats`` runs. Prints JSON:

    .venv/bin/python bench/bench_ingest.py [--messages 20000] [--repeats 3] [--fl-params 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.victoria

from broker.local import LocalBroker, start_local_broker
from cloud.service import CloudService
from cloud.settings import CloudSettings

PUBLISHER = textwrap.dedent("""
    import json, sys, threading, time, uuid
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    host, port, secrets, count, devices, run = sys.argv[1:7]
    count, devices = int(count), int(devices)
    per = count // devices
    def work(i):
        d = f"bench-{i:02d}"
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{d}-{run}", protocol=mqtt.MQTTv5)
        c.username_pw_set(d, open(f"{secrets}/{d}.password").read().strip())
        c.connect(host, int(port)); c.loop_start()
        session = uuid.uuid4().hex[:8]
        topic = f"edgefl/v1/devices/{d}/telemetry"
        last = None
        for seq in range(per):
            body = {"device_id": d, "session_id": session, "seq": seq, "ts": time.time(),
                    "cpu_percent": 20.0 + seq % 50, "memory_percent": 40.0,
                    "disk_percent": 10.0, "temperature_c": 50.0, "interval_s": 1.0,
                    "prediction_count": 10, "error_count": 0}
            last = c.publish(topic, json.dumps(body).encode(), qos=1)
            while len(c._out_messages) > 200:
                time.sleep(0.0005)
        last.wait_for_publish(60)
        c.disconnect(); c.loop_stop()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(devices)]
    for t in threads: t.start()
    for t in threads: t.join()
""")


def publish(broker: LocalBroker, count: int, devices: int, run: str) -> subprocess.Popen[bytes]:
    """Start the publisher process."""
    return subprocess.Popen([sys.executable, "-c", PUBLISHER, broker.host, str(broker.port),
                             str(broker.settings.layout.secrets), str(count), str(devices), run])


def bare_rate(broker: LocalBroker, count: int, devices: int, run: str) -> float:
    """Messages/s received by a paho subscriber that only counts."""
    creds = broker.credentials("edgefl-cloud")
    assert creds is not None
    got = {"n": 0, "first": 0.0, "last": 0.0}
    done = threading.Event()

    def on_message(_c: mqtt.Client, _u: object, _m: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        if got["n"] == 0:
            got["first"] = now
        got["n"] += 1
        got["last"] = now
        if got["n"] >= count:
            done.set()

    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bare-{run}", protocol=mqtt.MQTTv5)
    sub.username_pw_set(*creds)
    sub.on_message = on_message
    subscribed = threading.Event()
    sub.on_subscribe = lambda *_a: subscribed.set()
    sub.on_connect = lambda c, *_a: c.subscribe("edgefl/v1/devices/+/telemetry", qos=1)
    sub.connect(broker.host, broker.service_port)
    sub.loop_start()
    subscribed.wait(10)
    publisher = publish(broker, count, devices, run)
    done.wait(300)
    publisher.wait()
    sub.disconnect()
    sub.loop_stop()
    return got["n"] / max(1e-9, got["last"] - got["first"])


def aiomqtt_rate(broker: LocalBroker, count: int, devices: int, run: str) -> float:
    """Messages/s received by an aiomqtt subscriber that only counts (the library's own cost)."""
    import aiomqtt

    creds = broker.credentials("edgefl-cloud")
    assert creds is not None
    result: dict[str, float] = {}

    async def main() -> None:
        async with aiomqtt.Client(broker.host, broker.service_port, identifier=f"aio-{run}",
                                  username=creds[0], password=creds[1],
                                  protocol=aiomqtt.ProtocolVersion.V5) as client:
            await client.subscribe("edgefl/v1/devices/+/telemetry", qos=1)
            publisher = publish(broker, count, devices, run)
            n = 0
            first = 0.0
            async for _message in client.messages:
                n += 1
                if n == 1:
                    first = time.perf_counter()
                if n >= count:
                    break
            result["rate"] = n / max(1e-9, time.perf_counter() - first)
            await asyncio.to_thread(publisher.wait)

    asyncio.run(main())
    return result["rate"]


FL_DEVICES = tuple(f"fl-{i:02d}" for i in range(8))
FL_TASK = "bigmlp"
WIDE_OPEN = {"messages_per_s": 1e9, "message_burst": 1e9, "bytes_per_s": 1e15, "byte_burst": 1e15}
"""A device budget no publisher of the bench reaches (the budget is tested on its own)."""


def hidden_for(params: int) -> int:
    """Hidden width of the digits MLP (64 -> h -> 10) with about ``params`` parameters."""
    return max(1, round((params - 10) / 75))


class FlDevices:
    """Devices that answer every round plan with a full-size update (their own thread)."""

    def __init__(self, broker: LocalBroker, run: str) -> None:
        import numpy as np

        from schemas.codec import decode, encode
        from schemas.device import DeviceState, HardwareInfo
        from schemas.fl import GlobalModelEnvelope, RoundPlan, UpdateEnvelope

        self.updates = 0
        self.stop = threading.Event()
        self._clients: list[mqtt.Client] = []
        weights: dict[str, dict[str, np.ndarray]] = {}
        answered: set[tuple[str, int, int]] = set()
        lock = threading.Lock()
        hardware = HardwareInfo(platform="Linux", machine="x86_64", cpu_count=2,
                                memory_total_mb=4096.0)
        for device_id in FL_DEVICES:
            creds = broker.credentials(device_id)
            assert creds is not None
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{device_id}-{run}",
                                 protocol=mqtt.MQTTv5)
            client.username_pw_set(*creds)

            def on_message(c: mqtt.Client, _u: object, m: mqtt.MQTTMessage,
                           device_id: str = device_id) -> None:
                if not m.payload or self.stop.is_set():
                    return
                if "/global/" in m.topic:
                    version = m.topic.rsplit("/", 1)[1]
                    with lock:
                        if version not in weights:
                            tensors = decode(bytes(m.payload), GlobalModelEnvelope).tensors
                            weights[version] = {k: np.full_like(v, 1e-4)
                                                for k, v in tensors.items()}
                    return
                plan = RoundPlan.model_validate_json(m.payload)
                attempt = getattr(plan, "attempt", 0)  # (older schemas: no attempts)
                key = (device_id, plan.round, attempt)
                with lock:
                    delta = weights.get(plan.global_version)
                    if device_id not in plan.selected or key in answered or delta is None:
                        return
                    answered.add(key)
                envelope = UpdateEnvelope.model_validate({
                    "task": FL_TASK, "round": plan.round, "attempt": attempt,
                    "device_id": device_id, "base_version": plan.global_version,
                    "num_examples": 10, "train_loss": 1.0, "sent_at": time.time()})
                c.publish(f"edgefl/v1/fl/{FL_TASK}/rounds/{plan.round}/updates/{device_id}",
                          encode(delta, envelope), qos=1)
                self.updates += 1

            client.on_message = on_message
            client.connect(broker.host, broker.port)
            client.subscribe([(f"edgefl/v1/fl/{FL_TASK}/global/+", 1),
                              (f"edgefl/v1/fl/{FL_TASK}/round", 1)])
            state = DeviceState.model_validate({
                "device_id": device_id, "state": "online", "bd_seq": 0, "ts": time.time(),
                "agent_version": "bench", "hardware": hardware,
                "runtimes": {"torchscript": "2"}, "fl_tasks": [FL_TASK]})
            client.publish(f"edgefl/v1/devices/{device_id}/state", state.to_json(), qos=1,
                           retain=True)
            client.loop_start()
            self._clients.append(client)

    def close(self) -> None:
        """Stop answering and disconnect."""
        self.stop.set()
        for client in self._clients:
            client.disconnect()
            client.loop_stop()


def cloud_rate(broker: LocalBroker, count: int, devices: int, run: str, folder: Path,
               influx_url: str | None, fl_params: int | None = None) -> dict[str, float]:
    """Messages/s from first publish to stored, through the cloud service."""
    creds = broker.credentials("edgefl-cloud")
    assert creds is not None
    fl = None
    if fl_params is not None:
        fl = {FL_TASK: {"task": "fl_tasks.digits:DigitsTask",
                        "task_kwargs": {"hidden": hidden_for(fl_params)}, "rounds": 100_000,
                        "min_fit_clients": len(FL_DEVICES),
                        "min_available_clients": len(FL_DEVICES), "round_timeout_s": 120}}
    settings = CloudSettings.model_validate({
        "instance": f"bench-{run}", "data_dir": folder / run,
        "mqtt": {"host": broker.host, "port": broker.service_port, "password": creds[1]},
        # Each publisher sends thousands of messages as fast as it can, far over a device's
        # budget: with the default budget the bench would measure the budget, not ingest.
        "ingest": {"rate_limit": WIDE_OPEN},
        "influx": None if influx_url is None else {
            "url": influx_url, "token": "t", "org": "o", "bucket": "b"},
        **({"fl": fl} if fl else {}),
    })
    service = CloudService(settings)
    fl_devices = FlDevices(broker, run) if fl_params is not None else None
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    thread = threading.Thread(target=lambda: loop.run_until_complete(service.run(stop)))
    thread.start()
    deadline = time.monotonic() + 15
    while not service.connected.is_set() and time.monotonic() < deadline:
        time.sleep(0.01)
    if fl_devices is not None:  # the task is running before the measurement starts
        coordinator = service.coordinators[FL_TASK]
        while coordinator.state.round < 1 and time.monotonic() < deadline + 120:
            time.sleep(0.05)
    rounds_before = service.coordinators[FL_TASK].state.round if fl_devices else 0
    start = time.perf_counter()
    publisher = publish(broker, count, devices, run)
    stored = 0
    while stored < count and time.perf_counter() - start < 300:
        time.sleep(0.05)
        stored = service.ingest.stored
    elapsed = time.perf_counter() - start
    publisher.wait()
    if stored < count:
        limited = dict(service.health.rate_limited)
        loop.call_soon_threadsafe(stop.set)
        thread.join(60)
        raise SystemExit(f"run {run}: {stored} of {count} messages stored in 300 s "
                         f"(rate limited: {limited})")
    rounds = (service.coordinators[FL_TASK].state.round - rounds_before) if fl_devices else 0
    if fl_devices is not None:
        fl_devices.close()
    rows = service.store.query("SELECT COUNT(*) n FROM telemetry WHERE device_id LIKE "
                               "'bench-%'")[0]["n"]
    loop.call_soon_threadsafe(stop.set)
    thread.join(60)
    return {"rate": stored / elapsed, "rows": float(rows), "fl_rounds": float(rounds),
            "refused": float(sum(v for k, v in service.counters.items()
                                 if k.startswith("refused")))}


def main() -> None:
    """Run and print JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fl-params", type=int, default=None,
                        help="Also measure sqlite ingest while a task of this size trains")
    args = parser.parse_args()
    ids = [f"bench-{i:02d}" for i in range(args.devices)] + list(FL_DEVICES)
    results: dict[str, list[float]] = {"bare": [], "aiomqtt_bare": [], "sqlite": [],
                                       "influx": [], "sqlite_during_fl": []}
    fl_rounds: list[float] = []
    rows: dict[str, list[float]] = {"sqlite": [], "influx": []}
    vm_binary = shutil.which("victoria-metrics")
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        folder = Path(tmp)
        broker = start_local_broker(folder / "broker", device_ids=ids, kind="mosquitto")
        vm = None
        if vm_binary:
            from tests.victoria import start_victoria_metrics

            vm = start_victoria_metrics(Path(vm_binary), folder / "vm")
        try:
            for r in range(args.repeats):
                results["bare"].append(bare_rate(broker, args.messages, args.devices, f"b{r}"))
                results["aiomqtt_bare"].append(
                    aiomqtt_rate(broker, args.messages, args.devices, f"a{r}"))
                sq = cloud_rate(broker, args.messages, args.devices, f"s{r}", folder, None)
                results["sqlite"].append(sq["rate"])
                rows["sqlite"].append(sq["rows"])
                if args.fl_params is not None:
                    fl = cloud_rate(broker, args.messages, args.devices, f"f{r}", folder, None,
                                    args.fl_params)
                    results["sqlite_during_fl"].append(fl["rate"])
                    fl_rounds.append(fl["fl_rounds"])
                if vm is not None:
                    ix = cloud_rate(broker, args.messages, args.devices, f"i{r}", folder, vm.url)
                    results["influx"].append(ix["rate"])
                    rows["influx"].append(ix["rows"])
        finally:
            broker.stop()
            if vm is not None:
                vm.stop()
    medians = {k: round(statistics.median(v), 1) for k, v in results.items() if v}
    print(json.dumps({
        "benchmark": "cloud_ingest",
        "messages_per_run": args.messages,
        "publishing_devices": args.devices,
        "repeats": args.repeats,
        "median_messages_per_s": medians,
        "ratio_sqlite_over_bare": round(medians["sqlite"] / medians["bare"], 3),
        "ratio_aiomqtt_bare_over_bare": round(medians["aiomqtt_bare"] / medians["bare"], 3),
        "ratio_sqlite_over_aiomqtt_bare": round(medians["sqlite"] / medians["aiomqtt_bare"], 3),
        "ratio_influx_over_bare": round(medians["influx"] / medians["bare"], 3)
        if "influx" in medians else None,
        "ratio_sqlite_during_fl_over_sqlite": round(
            medians["sqlite_during_fl"] / medians["sqlite"], 3)
        if "sqlite_during_fl" in medians else None,
        "fl_params": None if args.fl_params is None
        else 75 * hidden_for(args.fl_params) + 10,
        "fl_rounds_during_measurement": fl_rounds,
        "rows_stored_per_run": rows,
        "runs": {k: [round(x, 1) for x in v] for k, v in results.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
