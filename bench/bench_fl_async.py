"""A heterogeneous fleet race: wall time to a target accuracy, synchronous FedAvg vs FedBuff.

20 devices in this process (``edge_node.fleet.Fleet``, the fleet ``edgefl fleet`` runs)
on a local Mosquitto, the cloud service in a thread. The heterogeneity profile
(``edge_node.heterogeneity``, seeded) makes 30 % of the devices 10x slower and 20 % of
them offline about half of the time (exponential online and offline periods of
``--period`` seconds on average; offline is a power cycle), and every device
``--base-factor`` times slower than this machine, a Raspberry-Pi-class processor: the
digits MLP with 1,500 hidden units trains its 5 local epochs in about 15 ms here.
Dirichlet alpha 0.5 over the devices.

Both modes run on the same profile, seed for seed, and stop at 90 % of the centralized
accuracy (``target_accuracy``). The figure is the wall time from the fleet's start to
the global version that reached it, read from the coordinator's history:

* synchronous FedAvg: half of the online devices per round (at least 3 updates, else
  the round is retried), ``--deadline`` seconds per round (a round with a slow device,
  or one that went offline, waits for it until then);
* asynchronous FedBuff (``mode: async``): ``concurrency`` 10 (the synchronous cohort),
  a version every 5 updates, staleness scale ``1/sqrt(1+s)``, max staleness 20.

The reference is the synchronous mode in the same run: ``ratio`` is FedBuff's median
time over synchronous FedAvg's (the issue's goal: at most 0.5).

    .venv/bin/python bench/bench_fl_async.py [--seeds 3] [--deadline 15] [--period 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from broker.local import LocalBroker, start_local_broker  # noqa: E402
from cloud.demo_model import centralized_baseline  # noqa: E402
from cloud.service import ServiceThread  # noqa: E402
from cloud.settings import CloudSettings  # noqa: E402
from edge_node.fleet import Fleet  # noqa: E402
from edge_node.heterogeneity import HeterogeneityProfile, device_profiles  # noqa: E402
from edge_node.settings import EdgeSettings  # noqa: E402
from fl_tasks.base import Partition, get_weights  # noqa: E402
from fl_tasks.digits import DigitsTask  # noqa: E402
from schemas.fl import HyperParams  # noqa: E402

DEVICES = 20
HIDDEN = 1500
ALPHA = 0.5
HP = {"local_epochs": 5, "batch_size": 16, "learning_rate": 0.1, "momentum": 0.5}
TASK = "fl_tasks.digits:DigitsTask"
TARGET = 0.9
CAP_S = 600.0


def baseline() -> float:
    """Centralized accuracy: the union of the devices' data, 20 epochs."""
    partitions = [Partition(index=i, count=DEVICES, scheme="dirichlet", alpha=ALPHA)
                  for i in range(DEVICES)]
    return centralized_baseline(DigitsTask(hidden=HIDDEN), partitions,
                                HyperParams.model_validate(HP), 20).accuracy


def warm_up() -> None:
    """Torch's one-time start (about a second) is paid here, not by the first device.

    The simulation multiplies each training's measured time by the device's factor.
    """
    task = DigitsTask(hidden=HIDDEN)
    data = task.local_data(Partition(index=0, count=DEVICES, scheme="dirichlet", alpha=ALPHA))
    task.train(get_weights(task.build_model()), data, HyperParams.model_validate(HP), seed=0)


def race(broker: LocalBroker, folder: Path, ids: list[str], *, mode: str, seed: int,
         target: float, args: argparse.Namespace) -> dict[str, Any]:
    """One task on the heterogeneous fleet until it reaches ``target``; its timings."""
    root = "edgefl/v1"
    name = f"race-{uuid.uuid4().hex[:6]}"
    creds = broker.credentials("edgefl-cloud")
    assert creds is not None
    task: dict[str, Any] = {
        "task": TASK, "task_kwargs": {"hidden": HIDDEN}, "rounds": 10_000, "seed": seed,
        "strategy": "fedavg", "hyperparams": HP, "target_accuracy": target,
        "min_available_clients": DEVICES // 2, "min_fit_clients": 3,
        "fraction_fit": 0.5, "round_timeout_s": args.deadline, "keep_update_rounds": 0}
    if mode == "async":
        task |= {"mode": "async", "round_timeout_s": 60.0,
                 "fedbuff": {"concurrency": DEVICES // 2, "buffer_size": 5,
                             "max_staleness": 20, "staleness_exponent": 0.5}}
    cloud = ServiceThread(CloudSettings.model_validate({
        "instance": f"race-{uuid.uuid4().hex[:6]}", "topic_root": root,
        "data_dir": folder / uuid.uuid4().hex[:8],
        "mqtt": {"host": broker.host, "port": broker.service_port, "password": creds[1]},
        "fl": {name: task}})).start()
    profile = HeterogeneityProfile(seed=seed, slow_fraction=0.3, slow_factor=10,
                                   base_factor=args.base_factor, intermittent_fraction=0.2,
                                   online_s=args.period, offline_s=args.period)
    profiles = device_profiles(profile, ids)
    settings = []
    for i, device_id in enumerate(ids):
        p = profiles[device_id]
        settings.append(EdgeSettings.model_validate({
            "device_id": device_id, "topic_root": root, "state_dir": folder / name / device_id,
            "mqtt": {"host": broker.host, "port": broker.port,
                     "password": broker.credentials(device_id)[1]},  # type: ignore[index]
            "telemetry": {"interval_s": 1.0}, "buffer": {"durable": False},
            "fl": {"tasks": {name: {"path": TASK, "options": {"hidden": HIDDEN},
                                    "partition": i, "partitions": len(ids),
                                    "scheme": "dirichlet", "alpha": ALPHA}},
                   "simulation": {"speed_factor": p.speed_factor,
                                  "failure_rate": p.failure_rate, "seed": p.seed}},
        }))
    fleet = Fleet(settings, folder / name, profiles=profiles)
    coordinator = cloud.service.coordinators[name]
    started_wall = time.time()
    started = time.monotonic()
    fleet.start()
    tick = threading.Event()
    try:
        while coordinator.state.state.value not in ("finished", "failed"):
            if time.monotonic() - started > CAP_S:
                break
            tick.wait(0.1)
    finally:
        state = coordinator.state.state.value
        history = coordinator.history()
        fleet.stop()
        cloud.stop()
    reached = next((h for h in history if (h.central_accuracy or 0.0) >= target), None)
    rejected: dict[str, int] = {}
    for h in history:
        for reason, count in h.rejected_counts.items():
            rejected[reason] = rejected.get(reason, 0) + count
    return {
        "mode": mode, "seed": seed, "state": state,
        "seconds_to_target": round(reached.ts - started_wall, 2) if reached else None,
        "versions": len(history), "power_cycles": fleet.power_cycles,
        "version_s_median": round(statistics.median(h.duration_s or 0.0 for h in history), 2)
        if history else None,
        "slowest_update_s_median": round(statistics.median(
            h.slowest_client_s or 0.0 for h in history), 2) if history else None,
        "final_accuracy": history[-1].central_accuracy if history else None,
        "rejected": rejected,
        "staleness_mean": round(statistics.fmean(h.staleness_mean for h in history
                                                 if h.staleness_mean is not None), 2)
        if mode == "async" and history else None,
        "curve": [(round(h.ts - started_wall, 2), round(h.central_accuracy or 0.0, 4))
                  for h in history],
        "slow_devices": sorted(d for d, p in profiles.items() if p.speed_factor > args.base_factor),
        "intermittent_devices": sorted(d for d, p in profiles.items() if p.offline),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--deadline", type=float, default=15.0,
                        help="Synchronous round deadline, s")
    parser.add_argument("--period", type=float, default=20.0,
                        help="Mean online and offline period of the intermittent devices, s")
    parser.add_argument("--base-factor", type=float, default=30.0)
    args = parser.parse_args()
    warm_up()
    base = baseline()
    target = round(TARGET * base, 4)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-fl-async-") as tmp:
        folder = Path(tmp)
        count = 2 * args.seeds
        ids = [f"ra-{i:03d}" for i in range(DEVICES * count)]  # fresh ids per run
        broker = start_local_broker(folder / "broker", device_ids=ids, kind="mosquitto")
        pools = iter([ids[i:i + DEVICES] for i in range(0, len(ids), DEVICES)])
        try:
            for seed in range(args.seeds):
                for mode in ("sync", "async"):
                    outcome = race(broker, folder, next(pools), mode=mode, seed=seed,
                                   target=target, args=args)
                    runs.append(outcome)
                    print(json.dumps({k: v for k, v in outcome.items()
                                      if k not in ("curve", "slow_devices",
                                                   "intermittent_devices")}),
                          file=sys.stderr, flush=True)
        finally:
            broker.stop()
    by_mode: dict[str, Any] = {}
    for mode in ("sync", "async"):
        times = [r["seconds_to_target"] for r in runs if r["mode"] == mode]
        reached = [t for t in times if t is not None]
        by_mode[mode] = {"seconds_to_target": times,
                         "median_s": round(statistics.median(reached), 2) if reached else None,
                         "reached": len(reached), "runs": len(times)}
    sync_s, async_s = by_mode["sync"]["median_s"], by_mode["async"]["median_s"]
    print(json.dumps({
        "benchmark": "fl_async", "devices": DEVICES, "parameters": 64 * HIDDEN + HIDDEN
        + HIDDEN * 10 + 10, "alpha": ALPHA, "hyperparams": HP,
        "profile": {"slow_fraction": 0.3, "slow_factor": 10, "base_factor": args.base_factor,
                    "intermittent_fraction": 0.2, "online_s": args.period,
                    "offline_s": args.period},
        "sync_deadline_s": args.deadline, "centralized_baseline": round(base, 4),
        "target_accuracy": target, "modes": by_mode,
        "ratio_async_over_sync": round(async_s / sync_s, 3) if sync_s and async_s else None,
        "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
