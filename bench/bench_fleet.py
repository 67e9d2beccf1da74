"""How many simulated agents one core sustains at one telemetry message per second each.

The fleet (real EdgeAgents, each with its own MQTT connection) runs in this process
pinned to one core; Mosquitto and a counting subscriber run on the other core. For
each fleet size, telemetry is counted at the subscriber over a fixed window and the
fleet process's CPU time and resident memory are read with psutil. Prints JSON:

    .venv/bin/python bench/bench_fleet.py [--sizes 50 100 200 400] [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil

from broker.local import start_local_broker
from edge_node.fleet import Fleet, fleet_settings
from edge_node.inference import available_runtimes
from edge_node.settings import MqttSettings

COUNTER = textwrap.dedent("""
    import json, sys, threading, time
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    host, port, user, password, topic, seconds, warmup = sys.argv[1:8]
    counts = {"n": 0, "lag": []}
    measuring = threading.Event()
    def on_message(c, u, msg):
        if measuring.is_set():
            counts["n"] += 1
            ts = json.loads(msg.payload)["ts"]
            counts["lag"].append(time.time() - ts)
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-counter",
                    protocol=mqtt.MQTTv5)
    c.username_pw_set(user, password)
    c.on_message = on_message
    c.on_connect = lambda cl, *a: cl.subscribe(topic, qos=1)
    c.connect(host, int(port))
    c.loop_start()
    time.sleep(float(warmup))
    measuring.set()
    start = time.time()
    time.sleep(float(seconds))
    measuring.clear()
    elapsed = time.time() - start
    lag = sorted(counts["lag"]) or [0.0]
    print(json.dumps({"messages": counts["n"], "seconds": elapsed,
                      "lag_ms_p50": 1000 * lag[len(lag) // 2],
                      "lag_ms_p99": 1000 * lag[int(len(lag) * 0.99)]}))
""")


def run_size(n: int, broker_port: int, secrets: Path, cloud_password: str, seconds: float,
             warmup: float, other_cpu: int) -> dict[str, float | int | bool]:
    """Run ``n`` agents and measure."""
    proc = psutil.Process()
    with tempfile.TemporaryDirectory(prefix="fleet-") as tmp:
        settings = fleet_settings(n, prefix="sim-", state_root=Path(tmp),
                                  mqtt=MqttSettings(host="127.0.0.1", port=broker_port),
                                  secrets_dir=secrets, interval_s=1.0)
        rss_before = proc.memory_info().rss
        fleet = Fleet(settings, Path(tmp))
        fleet.start()
        connected = fleet.wait_connected(60)
        counter = subprocess.Popen(
            [sys.executable, "-c", COUNTER, "127.0.0.1", str(broker_port), "edgefl-cloud",
             cloud_password, "edgefl/v1/devices/+/telemetry", str(seconds), str(warmup)],
            stdout=subprocess.PIPE, text=True)
        os.sched_setaffinity(counter.pid, {other_cpu})
        time.sleep(warmup)  # the counter's warm-up: let the fleet reach its steady state
        cpu0 = sum(proc.cpu_times()[:2])
        wall0 = time.monotonic()
        out, _ = counter.communicate(timeout=seconds + warmup + 60)
        cpu = sum(proc.cpu_times()[:2]) - cpu0
        wall = time.monotonic() - wall0
        rss = proc.memory_info().rss
        threads = proc.num_threads()
        fleet.stop()
    result = json.loads(out)
    expected = n * result["seconds"]
    delivered = result["messages"] / expected if expected else 0.0
    cpu_percent = 100.0 * cpu / wall
    return {
        "agents": n,
        "connected": connected,
        "telemetry_per_s": round(result["messages"] / result["seconds"], 1),
        "delivered_fraction": round(delivered, 3),
        "fleet_cpu_percent_of_one_core": round(cpu_percent, 1),
        "rss_mib_per_agent": round((rss - rss_before) / n / 2**20, 2),
        "threads": threads,
        "lag_ms_p50": round(result["lag_ms_p50"], 1),
        "lag_ms_p99": round(result["lag_ms_p99"], 1),
        "sustained": delivered >= 0.97 and cpu_percent < 90.0,
    }


def main() -> None:
    """Run the sizes and print JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200, 400])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    fleet_cpu, other_cpu = cpus[0], cpus[-1]
    os.sched_setaffinity(0, {fleet_cpu})
    available_runtimes()  # import the runtime libraries once, outside the RSS measurement
    ids = [f"sim-{i:03d}" for i in range(max(args.sizes))]
    with tempfile.TemporaryDirectory(prefix="bench-broker-") as tmp:
        broker = start_local_broker(Path(tmp), device_ids=ids, kind="mosquitto")
        try:
            pid = broker._mosquitto.pid if broker._mosquitto else None
            if pid:
                os.sched_setaffinity(pid, {other_cpu})
            cloud = broker.credentials("edgefl-cloud")
            assert cloud is not None
            results = [run_size(n, broker.port, broker.settings.layout.secrets, cloud[1],
                                args.seconds, args.warmup, other_cpu) for n in args.sizes]
        finally:
            broker.stop()
    sustained = [r["agents"] for r in results if r["sustained"]]
    print(json.dumps({
        "benchmark": "fleet_simulator",
        "interval_s": 1.0,
        "fleet_cpu": fleet_cpu,
        "broker_and_counter_cpu": other_cpu,
        "results": results,
        "max_sustained_agents_tested": max(sustained) if sustained else 0,
    }, indent=2))


if __name__ == "__main__":
    main()
