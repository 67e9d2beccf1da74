"""Sustained fleet load: 1,000 devices at 1 telemetry message per second each, for 5
minutes, through Mosquitto into the cloud service (SQLite sink, default alert rules).

Devices: publisher processes (``--per-process`` devices each), one MQTT connection per
device with its own identity (the broker's ACL lets each write only its own topics),
QoS 1, valid `DeviceTelemetry`, the sends spread evenly over each second. A message is
*acknowledged* when the broker's PUBACK arrives; every acknowledged message must end up
in a cloud store exactly once (`lost` counts those that did not; the goal is 0).

Latency from publish to stored: one more device, run by the bench itself, publishes at
the same rate and polls the store(s) for each of its messages by primary key (every
5 ms), under the same load. Memory: resident set of the cloud(s) and of Mosquitto at
the start and at the end of the window; CPU seconds of each over the window.

``--instances 2`` splits the load over two cloud instances with an MQTT 5 shared
subscription (``$share/ingest/...``), each with its own store: the figures then say
how the messages divided and that their union holds each exactly once. ``--compare``
runs 1 and then 2 instances in the same invocation and reports the ratio of the cloud
CPU seconds per 1,000 messages (the load is fixed, so throughput is the offered rate
when nothing is lost; the CPU cost is what scale-out divides).

Prints JSON:

    .venv/bin/python bench/bench_sustained.py [--devices 1000] [--seconds 300]
        [--rate 1.0] [--instances 1|2] [--compare]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
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
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from broker.local import LocalBroker, start_local_broker
from schemas.topics import Topics

TOPICS = Topics()
PROBE = "sim-probe"
SHARED_GROUP = "ingest"

PUBLISHERS = textwrap.dedent("""
    import json, secrets, sys, threading, time
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    host, port, secrets_dir, topics, ids, rate, seconds = sys.argv[1:8]
    ids, rate, seconds = ids.split(","), float(rate), float(seconds)
    topic = dict(zip(ids, topics.split(","), strict=True))
    lock = threading.Lock()
    acked = {d: 0 for d in ids}
    sent = {d: 0 for d in ids}
    session = {d: secrets.token_hex(8) for d in ids}
    connected = threading.Semaphore(0)
    clients = {}
    for d in ids:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=d, userdata=d,
                        protocol=mqtt.MQTTv5)
        c.username_pw_set(d, open(f"{secrets_dir}/{d}.password").read().strip())
        c.max_inflight_messages_set(100)
        def on_publish(client, device, mid, reason, props):
            if not reason.is_failure:
                with lock:
                    acked[device] += 1
        c.on_publish = on_publish
        c.on_connect = lambda cl, u, f, rc, p: connected.release()
        c.connect(host, int(port))
        c.loop_start()
        clients[d] = c
    for _ in ids:
        assert connected.acquire(timeout=120)
    print("ready", flush=True)
    sys.stdin.readline()  # go
    start = time.time()
    step = 1.0 / (rate * len(ids))
    k = 0
    while True:
        at = start + k * step
        if at >= start + seconds:
            break
        delay = at - time.time()
        if delay > 0:
            time.sleep(delay)
        d = ids[k % len(ids)]
        seq = k // len(ids)
        body = {"schema_version": 1, "device_id": d, "session_id": session[d], "seq": seq,
                "ts": time.time(), "cpu_percent": 20.0, "memory_percent": 40.0,
                "disk_percent": 30.0, "interval_s": 1.0 / rate}
        clients[d].publish(topic[d], json.dumps(body), qos=1)
        sent[d] += 1
        k += 1
    deadline = time.time() + 60
    while time.time() < deadline:
        with lock:
            if acked == sent:
                break
        time.sleep(0.1)
    print(json.dumps({"sent": sent, "acked": acked, "session": session}), flush=True)
    for c in clients.values():
        c.disconnect(); c.loop_stop()
""")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` in MiB."""
    return float(psutil.Process(pid).memory_info().rss) / 2**20


def broker_pid(broker: LocalBroker) -> int:
    """Mosquitto's pid, from its pid file."""
    return int((broker.settings.layout.root / "mosquitto.pid").read_text().split()[0])


def start_cloud(folder: Path, broker: LocalBroker, instance: str,
                shared: bool) -> tuple[subprocess.Popen[bytes], Path]:
    """`edgefl cloud` from a settings file; returns the process and its SQLite store."""
    data = folder / instance
    config = folder / f"{instance}.yaml"
    mqtt_settings: dict[str, Any] = {
        "host": "127.0.0.1", "port": broker.service_port,
        "password_file": str(broker.settings.layout.secrets / "edgefl-cloud.password")}
    if shared:
        mqtt_settings["shared_group"] = SHARED_GROUP
    config.write_text(yaml.safe_dump({"instance": instance, "data_dir": str(data),
                                      "mqtt": mqtt_settings}))
    log = (folder / f"{instance}.log").open("wb")
    cloud = subprocess.Popen([sys.executable, "-m", "edgefl", "--log-level", "INFO",
                              "cloud", "--config", str(config)], stdout=log, stderr=log)
    store = data / "edgefl.sqlite3"
    deadline = time.time() + 60
    while not (folder / f"{instance}.log").read_bytes().count(b"serving on") and \
            time.time() < deadline:
        if cloud.poll() is not None:
            raise RuntimeError(f"cloud {instance} exited: "
                               f"{(folder / f'{instance}.log').read_text()[-2000:]}")
        time.sleep(0.2)
    return cloud, store


def stored_counts(stores: list[Path]) -> dict[tuple[str, str], list[int]]:
    """(device, session) -> stored seqs, over every store (a seq twice if twice)."""
    out: dict[tuple[str, str], list[int]] = {}
    for path in stores:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            for device, session, seq in db.execute(
                    "SELECT device_id, session_id, seq FROM telemetry"):
                out.setdefault((device, session), []).append(seq)
        finally:
            db.close()
    return out


def start_publishers(broker: LocalBroker, ids: list[str], rate: float, seconds: float,
                     per_process: int) -> list[subprocess.Popen[str]]:
    """Publisher processes, every device connected (they wait for "go" on stdin)."""
    publishers = []
    for start in range(0, len(ids), per_process):
        chunk = ids[start:start + per_process]
        publishers.append(subprocess.Popen(
            [sys.executable, "-c", PUBLISHERS, "127.0.0.1", str(broker.port),
             str(broker.settings.layout.secrets), ",".join(TOPICS.telemetry(d) for d in chunk),
             ",".join(chunk),
             str(rate), str(seconds)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    for pub in publishers:
        assert pub.stdout is not None
        if pub.stdout.readline().strip() != "ready":
            raise RuntimeError("a publisher process did not connect its devices")
    return publishers


def wait_stored(stores: list[Path], acked: dict[tuple[str, str], int],
                timeout: float = 120.0) -> tuple[int, int]:
    """Until every acknowledged message is stored (bounded): (missing, stored twice)."""
    deadline = time.time() + timeout
    while True:
        stored = stored_counts(stores)
        missing = sum(max(0, n - len(set(stored.get(key, [])))) for key, n in acked.items())
        if missing == 0 or time.time() > deadline:
            break
        time.sleep(1.0)
    return missing, sum(len(seqs) - len(set(seqs)) for seqs in stored.values())


class Probe(threading.Thread):
    """A device of the bench's own: publish, then poll the stores by primary key."""

    def __init__(self, broker: LocalBroker, stores: list[Path], rate: float) -> None:
        super().__init__(daemon=True, name="probe")
        self.stores, self.rate = stores, rate
        self.latencies: list[float] = []
        self.missing = 0
        self.stop = threading.Event()
        self.session = os.urandom(8).hex()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=PROBE,
                                  protocol=mqtt.MQTTv5)
        password = (broker.settings.layout.secrets / f"{PROBE}.password").read_text().strip()
        self.client.username_pw_set(PROBE, password)
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()

    def run(self) -> None:
        dbs = [sqlite3.connect(f"file:{p}?mode=ro", uri=True, timeout=30)
               for p in self.stores]
        seq = 0
        try:
            while not self.stop.wait(1.0 / self.rate):
                sent = time.time()
                body = {"schema_version": 1, "device_id": PROBE, "session_id": self.session,
                        "seq": seq, "ts": sent, "cpu_percent": 20.0, "memory_percent": 40.0,
                        "disk_percent": 30.0, "interval_s": 1.0 / self.rate}
                self.client.publish(TOPICS.telemetry(PROBE), json.dumps(body), qos=1)
                deadline = sent + 30
                while time.time() < deadline:
                    if any(db.execute("SELECT 1 FROM telemetry WHERE device_id=? AND "
                                      "session_id=? AND seq=?", (PROBE, self.session, seq))
                           .fetchone() for db in dbs):
                        self.latencies.append(time.time() - sent)
                        break
                    time.sleep(0.005)
                else:
                    self.missing += 1
                seq += 1
        finally:
            for db in dbs:
                db.close()
            self.client.disconnect()
            self.client.loop_stop()


def run(devices: int, seconds: float, rate: float, instances: int,
        per_process: int) -> dict[str, Any]:
    """One configuration; its figures."""
    ids = [f"sim-{i:04d}" for i in range(devices)]
    with tempfile.TemporaryDirectory(prefix="bench-sustained-") as tmp:
        folder = Path(tmp)
        broker = start_local_broker(folder / "broker", device_ids=[*ids, PROBE],
                                    kind="mosquitto")
        clouds: list[subprocess.Popen[bytes]] = []
        publishers: list[subprocess.Popen[str]] = []
        try:
            stores = []
            for i in range(instances):
                cloud, store = start_cloud(folder, broker, f"cloud-{i}", shared=instances > 1)
                clouds.append(cloud)
                stores.append(store)
            publishers += start_publishers(broker, ids, rate, seconds, per_process)
            mosquitto = broker_pid(broker)
            pids = {"broker": mosquitto} | {f"cloud-{i}": c.pid for i, c in enumerate(clouds)}
            memory_start = {name: round(rss_mib(pid), 1) for name, pid in pids.items()}
            cpu_start = {name: cpu_seconds(pid) for name, pid in pids.items()}
            probe = Probe(broker, stores, rate)
            t0 = time.time()
            for pub in publishers:
                assert pub.stdin is not None
                pub.stdin.write("go\n")
                pub.stdin.flush()
            probe.start()
            results = []
            for pub in publishers:
                assert pub.stdout is not None
                results.append(json.loads(pub.stdout.readline()))
            probe.stop.set()
            probe.join(60)
            window = time.time() - t0
            cpu = {name: round(cpu_seconds(pid) - cpu_start[name], 2)
                   for name, pid in pids.items()}
            memory_end = {name: round(rss_mib(pid), 1) for name, pid in pids.items()}
            acked = {(d, r["session"][d]): n for r in results for d, n in r["acked"].items()}
            sent = sum(n for r in results for n in r["sent"].values())
            missing, doubled = wait_stored(stores, acked)
            per_store = [sum(len(s) for s in stored_counts([p]).values()) for p in stores]
            total_acked = sum(acked.values())
        finally:
            procs: list[subprocess.Popen[Any]] = [*publishers, *clouds]
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
            broker.stop()
    latencies = sorted(probe.latencies) or [float("nan")]
    cloud_cpu = sum(v for k, v in cpu.items() if k.startswith("cloud"))
    return {
        "devices": devices, "rate_per_device_per_s": rate, "seconds": seconds,
        "instances": instances, "window_s": round(window, 1),
        "sent": sent, "acknowledged": total_acked, "lost": missing, "stored_twice": doubled,
        "stored_per_instance": per_store,
        "offered_msgs_per_s": round(sent / window, 1),
        "probe": {"samples": len(probe.latencies), "missing": probe.missing,
                  "publish_to_stored_ms_p50": round(statistics.median(latencies) * 1000, 1),
                  "publish_to_stored_ms_p99": round(
                      latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, 1),
                  "publish_to_stored_ms_max": round(latencies[-1] * 1000, 1)},
        "rss_mib_start": memory_start, "rss_mib_end": memory_end,
        "cpu_s": cpu,
        "cloud_cpu_s_per_1000_msgs": round(cloud_cpu / max(1, total_acked) * 1000, 3),
    }


def main() -> None:
    """Measure and print JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--rate", type=float, default=1.0, help="Messages per device per s")
    parser.add_argument("--instances", type=int, choices=(1, 2), default=1)
    parser.add_argument("--compare", action="store_true",
                        help="Run 1 and then 2 cloud instances; report both and the ratio")
    parser.add_argument("--per-process", type=int, default=250,
                        help="Devices per publisher process")
    args = parser.parse_args()
    runs = [run(args.devices, args.seconds, args.rate, n, args.per_process)
            for n in ((1, 2) if args.compare else (args.instances,))]
    out: dict[str, Any] = {"benchmark": "sustained", "runs": runs}
    if args.compare:
        one, two = runs
        out["scale_out"] = {
            "stored_exactly_once": two["lost"] == 0 and two["stored_twice"] == 0,
            "split": two["stored_per_instance"],
            "cloud_cpu_per_1000_msgs_ratio_2_to_1": round(
                two["cloud_cpu_s_per_1000_msgs"] / one["cloud_cpu_s_per_1000_msgs"], 2),
            "p99_ratio_2_to_1": round(two["probe"]["publish_to_stored_ms_p99"]
                                      / one["probe"]["publish_to_stored_ms_p99"], 2)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
