"""How many simulated agents one core sustains at one telemetry message per second each.

The fleet runs as `python -m edge_node fleet` processes (at most 150 real agents each,
every agent with its own MQTT connection), all pinned to one core; Mosquitto and a
counting subscriber run on the other core. For each fleet size, telemetry is counted
at the subscriber over a fixed window, and the fleet processes' CPU time and resident
memory are read with psutil. Prints JSON:

    .venv/bin/python bench/bench_fleet.py [--sizes 150 300 600 1200] [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil

from broker.local import start_local_broker
from edge_node.fleet import MAX_AGENTS_PER_PROCESS

COUNTER = textwrap.dedent("""
    import json, sys, threading, time
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    host, port, user, password, topic, seconds, expected = sys.argv[1:8]
    state = {"n": 0, "lag": [], "devices": set()}
    measuring = threading.Event()
    def on_message(c, u, msg):
        body = json.loads(msg.payload)
        state["devices"].add(body["device_id"])
        if measuring.is_set():
            state["n"] += 1
            state["lag"].append(time.time() - body["ts"])
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-counter",
                    protocol=mqtt.MQTTv5)
    c.username_pw_set(user, password)
    c.on_message = on_message
    c.on_connect = lambda cl, *a: cl.subscribe(topic, qos=1)
    c.connect(host, int(port))
    c.loop_start()
    deadline = time.time() + 300
    while len(state["devices"]) < int(expected) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(2.0)
    print(json.dumps({"event": "start"}), flush=True)
    measuring.set()
    start = time.time()
    time.sleep(float(seconds))
    measuring.clear()
    elapsed = time.time() - start
    lag = sorted(state["lag"]) or [0.0]
    print(json.dumps({"messages": state["n"], "seconds": elapsed,
                      "reporting_devices": len(state["devices"]),
                      "lag_ms_p50": 1000 * lag[len(lag) // 2],
                      "lag_ms_p99": 1000 * lag[int(len(lag) * 0.99)]}), flush=True)
""")


def _tree_cpu_rss(procs: list[psutil.Process]) -> tuple[float, int]:
    cpu = 0.0
    rss = 0
    for proc in procs:
        try:
            times = proc.cpu_times()
            cpu += times.user + times.system
            rss += proc.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return cpu, rss


def run_size(n: int, port: int, service_port: int, secrets: Path, cloud_password: str,
             seconds: float,
             fleet_cpu: int, other_cpu: int) -> dict[str, float | int | bool]:
    """Run ``n`` agents and measure them."""
    with tempfile.TemporaryDirectory(prefix="fleet-") as tmp:
        counter = subprocess.Popen(
            [sys.executable, "-c", COUNTER, "127.0.0.1", str(service_port), "edgefl-cloud",
             cloud_password, "edgefl/v1/devices/+/telemetry", str(seconds), str(n)],
            stdout=subprocess.PIPE, text=True)
        os.sched_setaffinity(counter.pid, {other_cpu})
        children = []
        started = time.monotonic()
        for first in range(0, n, MAX_AGENTS_PER_PROCESS):
            count = min(MAX_AGENTS_PER_PROCESS, n - first)
            child = subprocess.Popen(
                [sys.executable, "-m", "edge_node", "fleet", "--devices", str(count),
                 "--first-index", str(first), "--broker", f"127.0.0.1:{port}",
                 "--secrets-dir", str(secrets), "--state-dir", tmp, "--interval", "1"],
                stdout=subprocess.DEVNULL)
            os.sched_setaffinity(child.pid, {fleet_cpu})
            children.append(child)
        procs = [psutil.Process(c.pid) for c in children]
        assert counter.stdout is not None
        # The counter waits until every device reported, waits 2 s more, says "start",
        # measures for `seconds` and prints the result: CPU is read at the same moments.
        counter.stdout.readline()
        cpu0, _ = _tree_cpu_rss(procs)
        wall0 = time.monotonic()
        startup_s = wall0 - started
        line = counter.stdout.readline()
        cpu1, rss = _tree_cpu_rss(procs)
        wall1 = time.monotonic()
        counter.wait()
        for child in children:
            child.send_signal(signal.SIGTERM)
        for child in children:
            child.wait(timeout=120)
    result = json.loads(line)
    expected = n * result["seconds"]
    delivered = result["messages"] / expected if expected else 0.0
    cpu_percent = 100.0 * (cpu1 - cpu0) / max(1e-9, wall1 - wall0)
    return {
        "agents": n,
        "processes": len(children),
        "startup_s": round(startup_s, 1),
        "reporting_devices": result["reporting_devices"],
        "telemetry_per_s": round(result["messages"] / result["seconds"], 1),
        "delivered_fraction": round(delivered, 3),
        "fleet_cpu_percent_of_one_core": round(cpu_percent, 1),
        "rss_mib_total": round(rss / 2**20, 1),
        "rss_mib_per_agent": round(rss / n / 2**20, 2),
        "lag_ms_p50": round(result["lag_ms_p50"], 1),
        "lag_ms_p99": round(result["lag_ms_p99"], 1),
        "sustained": delivered >= 0.97 and cpu_percent < 90.0,
    }


def main() -> None:
    """Run the sizes and print JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[150, 300, 600, 1200])
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    fleet_cpu, other_cpu = cpus[0], cpus[-1]
    os.sched_setaffinity(0, {other_cpu})
    ids = [f"sim-{i:03d}" for i in range(max(args.sizes))]
    with tempfile.TemporaryDirectory(prefix="bench-broker-") as tmp:
        broker = start_local_broker(Path(tmp), device_ids=ids, kind="mosquitto")
        try:
            cloud = broker.credentials("edgefl-cloud")
            assert cloud is not None
            results = []
            for n in args.sizes:
                results.append(run_size(n, broker.port, broker.service_port,
                                        broker.settings.layout.secrets,
                                        cloud[1], args.seconds, fleet_cpu, other_cpu))
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
        finally:
            broker.stop()
    sustained = [int(r["agents"]) for r in results if r["sustained"]]
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
