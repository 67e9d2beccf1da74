"""Federated learning at fleet scale: 100 and 300 simulated devices, a 112k-parameter model.

For each fleet size: a local Mosquitto, the devices in ``edgefl fleet`` processes of 100
agents each (telemetry every 5 s), each a member of two tasks (the digits MLP with 1,500
hidden units, 112,510 parameters; partition ``i`` of the fleet on device ``i``), and the
cloud service in this process, started once per task, so that this process's memory is
the coordinator's:

* sync: 10 rounds of FedAvg at 10 % participation. Each round broken down into plan
  (round opened -> the first selected device starts training: the plan and the weights
  reaching it), training (device-reported, median and slowest), upload (sent -> stored,
  median over the round's updates), aggregation, central evaluation and release (state
  committed; weights, plan and status published), from the coordinator's ``timings``
  and the stored updates;
* async: FedBuff for ``--async-s`` seconds (concurrency 10 % of the fleet, a version
  every 10 updates): versions, updates per second, staleness.

Memory: this process's resident set (psutil) when each task starts, when it ends, and
its peak, sampled every 0.2 s. The reference is the 100-device fleet: the ratios say
how round time and memory grow with three times the devices (FedAvg streams: its
aggregation holds one running sum whatever the number of updates).

    .venv/bin/python bench/bench_fl_scale.py [--sizes 100,300] [--rounds 10] [--async-s 600]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from broker.local import LocalBroker, start_local_broker  # noqa: E402
from cloud.service import ServiceThread  # noqa: E402
from cloud.settings import CloudSettings  # noqa: E402
from schemas.topics import TopicKind  # noqa: E402

HIDDEN = 1500
PARAMETERS = 64 * HIDDEN + HIDDEN + HIDDEN * 10 + 10
HP = {"local_epochs": 1, "batch_size": 16, "learning_rate": 0.05}
TASK = "fl_tasks.digits:DigitsTask"
PER_PROCESS = 100


class Memory:
    """This process's resident set, sampled on a thread."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.peak = 0
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss", daemon=True)

    def now_mb(self) -> float:
        """Resident set now, MB."""
        return round(float(self.process.memory_info().rss) / 2**20, 1)

    def _sample(self) -> None:
        while not self._halt.wait(0.2):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> Memory:
        self.peak = self.process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._halt.set()
        self._thread.join()


def cloud_for(broker: LocalBroker, folder: Path, name: str, task: dict[str, Any],
              ) -> ServiceThread:
    creds = broker.credentials("edgefl-cloud")
    assert creds is not None
    return ServiceThread(CloudSettings.model_validate({
        "instance": f"scale-{uuid.uuid4().hex[:6]}", "topic_root": "edgefl/v1",
        "data_dir": folder / name,
        "mqtt": {"host": broker.host, "port": broker.service_port, "password": creds[1]},
        "fl": {name: task}})).start()


def sync_rounds(broker: LocalBroker, folder: Path, name: str, size: int,
                rounds: int) -> dict[str, Any]:
    """Ten synchronous rounds at 10 % participation, broken down."""
    task = {"task": TASK, "task_kwargs": {"hidden": HIDDEN}, "rounds": rounds,
            "fraction_fit": 0.1, "min_fit_clients": size // 10,
            "min_available_clients": size, "round_timeout_s": 120, "hyperparams": HP,
            "keep_update_rounds": 0}
    with Memory() as memory:
        cloud = cloud_for(broker, folder, name, task)
        coordinator = cloud.service.coordinators[name]
        start_mb = memory.now_mb()
        pause = threading.Event()
        deadline = time.monotonic() + 300 + 60 * rounds
        while coordinator.state.state.value not in ("finished", "failed"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: {rounds} rounds did not finish")
            pause.wait(0.2)
        end_mb = memory.now_mb()
        history = coordinator.history()
        store = cloud.service.store
        rows = []
        for status in history:
            timing = coordinator.timings.get(status.round, {})
            updates = [(json.loads(r["meta"]), r["received_at"]) for r in store.query(
                "SELECT meta, received_at FROM fl_updates WHERE task=? AND round=?",
                (name, status.round))]
            issued = timing.get("issued_at", 0.0)
            starts = [m["sent_at"] - m["train_time_s"] for m, _ in updates]
            rows.append({
                "round": status.round, "updates": len(updates),
                "round_s": round(status.duration_s or 0.0, 3),
                "plan_s": round(min(starts) - issued, 3) if starts else None,
                "training_s_median": round(statistics.median(
                    m["train_time_s"] for m, _ in updates), 3),
                "training_s_max": round(max(m["train_time_s"] for m, _ in updates), 3),
                "upload_s_median": round(statistics.median(
                    received - m["sent_at"] for m, received in updates), 3),
                "aggregation_s": round(timing.get("aggregate_s", 0.0), 4),
                "evaluation_s": round(timing.get("evaluate_s", 0.0), 4),
                "release_s": round(timing.get("release_s", 0.0), 4),
                "central_accuracy": status.central_accuracy})
        cloud.stop()
    parts = ("round_s", "plan_s", "training_s_median", "training_s_max", "upload_s_median",
             "aggregation_s", "evaluation_s", "release_s")
    measured = rows[1:] or rows  # round 1 pays the first weights fetch
    return {"state": coordinator.state.state.value, "rounds": rows,
            "median": {p: round(statistics.median(r[p] for r in measured
                                                  if r[p] is not None), 4) for p in parts},
            "memory_mb": {"start": start_mb, "end": end_mb,
                          "peak": round(memory.peak / 2**20, 1)}}


def async_run(broker: LocalBroker, folder: Path, name: str, size: int,
              seconds: float) -> dict[str, Any]:
    """FedBuff for ``seconds``: throughput, staleness, memory."""
    task = {"task": TASK, "task_kwargs": {"hidden": HIDDEN}, "rounds": 1_000_000,
            "mode": "async", "min_available_clients": size, "round_timeout_s": 120,
            "hyperparams": HP, "keep_update_rounds": 0,
            "fedbuff": {"concurrency": size // 10, "buffer_size": 10, "max_staleness": 10}}
    with Memory() as memory:
        cloud = cloud_for(broker, folder, name, task)
        coordinator = cloud.service.coordinators[name]
        pause = threading.Event()
        while coordinator.state.state.value == "waiting":
            pause.wait(0.2)
        start_mb = memory.now_mb()
        started = time.monotonic()
        timeline = []
        while (elapsed := time.monotonic() - started) < seconds:
            pause.wait(min(seconds / 10, seconds - elapsed))
            timeline.append((round(time.monotonic() - started), memory.now_mb(),
                             coordinator.state.round))
        elapsed = time.monotonic() - started
        end_mb = memory.now_mb()
        history = coordinator.history()
        refused = dict(cloud.service.health.refused[TopicKind.UPDATE.value])
        updates = sum(len(cloud.service.store.query(
            "SELECT 1 FROM fl_updates WHERE task=? AND round=?", (name, h.round)))
            for h in history)
        cloud.stop()
    return {"seconds": round(elapsed, 1), "versions": len(history),
            "updates": updates, "updates_per_s": round(updates / elapsed, 2),
            "version_s_median": round(statistics.median(h.duration_s or 0.0 for h in history),
                                      3) if history else None,
            "staleness_mean": round(statistics.fmean(h.staleness_mean or 0.0
                                                     for h in history), 3) if history else None,
            "final_accuracy": history[-1].central_accuracy if history else None,
            "refused": refused,
            "memory_mb": {"start": start_mb, "end": end_mb,
                          "peak": round(memory.peak / 2**20, 1)},
            "memory_timeline": [{"s": s, "mb": mb, "versions": v} for s, mb, v in timeline]}


def fleet(broker: LocalBroker, folder: Path, size: int, prefix: str,
          tasks: list[str]) -> subprocess.Popen[bytes]:
    """The devices: ``edgefl fleet`` in processes of 100 agents."""
    config = folder / f"edge-{size}.yaml"
    config.write_text(yaml.safe_dump({"fl": {"tasks": {
        t: {"path": TASK, "options": {"hidden": HIDDEN}} for t in tasks}}}))
    log = (folder / f"fleet-{size}.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "edgefl", "fleet", "--devices", str(size),
         "--per-process", str(PER_PROCESS), "--prefix", prefix,
         "--broker", f"{broker.host}:{broker.port}",
         "--secrets-dir", str(broker.settings.layout.secrets), "--interval", "5",
         "--state-dir", str(folder / f"fleet-{size}"), "--config", str(config),
         *[x for t in tasks for x in ("--fl-task", f"{t}={TASK}")]],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,300")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--async-s", type=float, default=600.0)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    by_size: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-fl-scale-") as tmp:
        folder = Path(tmp)
        ids = [f"z{size}-{i:03d}" for size in sizes for i in range(size)]
        broker = start_local_broker(folder / "broker", device_ids=ids, kind="mosquitto")
        try:
            for size in sizes:
                names = [f"scale{size}-sync", f"scale{size}-async"]
                devices = fleet(broker, folder, size, f"z{size}-", names)
                try:
                    sync = sync_rounds(broker, folder, names[0], size, args.rounds)
                    buffered = async_run(broker, folder, names[1], size, args.async_s)
                finally:
                    os.killpg(devices.pid, signal.SIGTERM)
                    devices.wait(120)
                by_size[str(size)] = {"sync": sync, "async": buffered}
                print(json.dumps({size: {"sync": sync["median"], "sync_memory":
                                         sync["memory_mb"], "async": buffered}}),
                      file=sys.stderr, flush=True)
        finally:
            broker.stop()
    first, last = str(sizes[0]), str(sizes[-1])
    ratios = {}
    if first != last:
        a, b = by_size[first], by_size[last]
        ratios = {
            "round_s": round(b["sync"]["median"]["round_s"] / a["sync"]["median"]["round_s"],
                             3),
            "aggregation_s": round(b["sync"]["median"]["aggregation_s"]
                                   / a["sync"]["median"]["aggregation_s"], 3),
            "sync_memory_growth_mb": [
                round(x["sync"]["memory_mb"]["end"] - x["sync"]["memory_mb"]["start"], 1)
                for x in (a, b)],
            "async_memory_growth_mb": [
                round(x["async"]["memory_mb"]["end"] - x["async"]["memory_mb"]["start"], 1)
                for x in (a, b)]}
    print(json.dumps({"benchmark": "fl_scale", "parameters": PARAMETERS, "hyperparams": HP,
                      "participation": 0.1, "sizes": sizes, "rounds": args.rounds,
                      "async_s": args.async_s, "by_size": by_size,
                      f"ratio_{last}_to_{first}": ratios}, indent=1))


if __name__ == "__main__":
    main()
