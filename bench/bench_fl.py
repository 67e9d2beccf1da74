"""Federated learning on the real system: learning quality, bytes on wire, round overhead.

Every run starts a cloud service (coordinator) and 10 edge agents (FL clients) on a
local Mosquitto; training happens on the agents, updates travel over MQTT, and the
coordinator aggregates and evaluates on the held-out digits test split. Prints JSON:

    .venv/bin/python bench/bench_fl.py [--rounds 30] [--only quality|compression|overhead]

* quality: FedAvg, FedAdam, SCAFFOLD and FedNova on digits (MLP), 10 devices,
  Dirichlet alpha 0.5 and 0.1,
  50 % participation; curves, and the round at which 95 % of the centralized baseline
  (same model, same data union, same epochs budget) is reached.
* compression: bytes on wire per update and final accuracy for fp32, fp16, int8 and
  top-k 10 % + int8 (FedAvg, alpha 0.5).
* overhead: wall time of a round minus the slowest client's training time, 10 devices,
  a 112k-parameter MLP, every device each round.
* robustness: FedAvg, median, trimmed mean (beta 0.3), Krum and Multi-Krum (f = the
  attackers, at least 1; m = n - f) with 0, 1, 2 and 3 of the 10 devices attacking
  (updates scaled by 10, or sign-flipped and scaled by 4), alpha 0.5, every device each
  round; final and best accuracy. The reference for k attackers is FedAvg over the
  10 - k honest devices alone (``fedavg/absent_kof10``): the attackers' partitions
  of the non-IID data are then missing, as they are from any aggregate that
  discards their updates.
* privacy: privacy against utility, FedAvg alpha 0.5: final accuracy without
  differential privacy and at epsilon 1, 3 and 8 (delta 1e-5; the noise multiplier
  calibrated by dp-accounting for the rounds at 50 % participation), in central and
  client mode, with adaptive clipping (median of the update norms).
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker.local import LocalBroker, start_local_broker
from cloud.demo_model import centralized_baseline
from cloud.service import ServiceThread
from cloud.settings import CloudSettings
from edge_node.agent import EdgeAgent
from edge_node.settings import EdgeSettings
from fl_tasks.base import Partition
from fl_tasks.digits import DigitsTask
from schemas.fl import HyperParams

DEVICES = 10
CLIENT_CLIP = 0.5
"""Client mode's fixed bound (adaptive clipping needs the bits' sum noised once)."""
HP = {"local_epochs": 2, "batch_size": 16, "learning_rate": 0.1, "momentum": 0.5}


def run(broker: LocalBroker, folder: Path, ids: list[str], *, rounds: int, alpha: float,
        strategy: str = "fedavg", params: dict[str, Any] | None = None,
        compression: dict[str, Any] | None = None, fraction: float = 0.5,
        task_kwargs: dict[str, Any] | None = None,
        privacy: dict[str, Any] | None = None,
        attack: dict[str, Any] | None = None, attackers: int = 0,
        partitions: int | None = None, task: str = "fl_tasks.digits:DigitsTask",
        seed: int = 0, keep: int = 0, data_seed: int = 0) -> dict[str, Any]:
    """One federated task on the real system; returns the coordinator's history.

    Device ``i`` holds partition ``i`` of ``partitions`` (by default one per device),
    split with ``data_seed``: with fewer devices than partitions, the last partitions'
    data is absent. The last ``attackers`` devices run ``attack``.
    """
    # The broker's ACL covers the default root; each run has a task name of its own.
    root = "edgefl/v1"
    name = f"digits-{uuid.uuid4().hex[:6]}"
    creds = broker.credentials("edgefl-cloud")
    assert creds is not None
    kwargs = task_kwargs or {}
    data_dir = folder / uuid.uuid4().hex[:8]
    cloud = ServiceThread(CloudSettings.model_validate({
        "instance": f"bench-{uuid.uuid4().hex[:6]}", "topic_root": root,
        "data_dir": data_dir,
        "mqtt": {"host": broker.host, "port": broker.service_port, "password": creds[1]},
        "fl": {name: {
            "task": task, "task_kwargs": kwargs, "rounds": rounds, "seed": seed,
            "strategy": strategy, "strategy_params": params or {}, "fraction_fit": fraction,
            "min_fit_clients": max(1, round(fraction * len(ids))),
            "min_available_clients": len(ids), "round_timeout_s": 60, "hyperparams": HP,
            "compression": compression or {"kind": "none"}, "privacy": privacy,
            "keep_update_rounds": keep}},
    })).start()
    agents = []
    for i, device_id in enumerate(ids):
        settings = EdgeSettings.model_validate({
            "device_id": device_id, "topic_root": root, "state_dir": folder / name / device_id,
            "mqtt": {"host": broker.host, "port": broker.port,
                     "password": broker.credentials(device_id)[1]},  # type: ignore[index]
            "telemetry": {"interval_s": 1.0},
            "fl": {"tasks": {name: {"path": task, "options": kwargs,
                                        "partition": i, "partitions": partitions or len(ids),
                                        "scheme": "dirichlet", "alpha": alpha,
                                        "seed": data_seed,
                                        "attack": attack if i >= len(ids) - attackers
                                        else None}}},
        })
        agent = EdgeAgent(settings)
        agent.start()
        agents.append(agent)
    coordinator = cloud.service.coordinators[name]
    started = time.monotonic()
    tick = threading.Event()
    while coordinator.state.state.value not in ("finished", "failed"):
        if time.monotonic() - started > rounds * 60:
            raise TimeoutError("training did not finish")
        tick.wait(0.1)
    history = [h.model_dump(mode="json") for h in coordinator.history()]
    for agent in agents:
        agent.stop()
    cloud.stop()
    return {"history": history, "seconds": time.monotonic() - started,
            "state": coordinator.state.state.value, "name": name,
            "task_folder": str(data_dir / "fl" / name)}


def baseline(alpha: float, rounds: int) -> float:
    """Centralized accuracy with the same model, data union and epochs budget."""
    task = DigitsTask()
    partitions = [Partition(index=i, count=DEVICES, scheme="dirichlet", alpha=alpha)
                  for i in range(DEVICES)]
    epochs = max(1, round(rounds * HP["local_epochs"] * 0.5))
    return centralized_baseline(task, partitions, HyperParams.model_validate(HP),
                                epochs).accuracy


def spread(values: list[float]) -> dict[str, float]:
    """Mean, standard deviation, min and max (of the seeds' final accuracies)."""
    return {"mean": round(statistics.mean(values), 4),
            "stdev": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def curve(result: dict[str, Any]) -> list[float]:
    """Central test accuracy per round."""
    return [round(h["central_accuracy"], 4) for h in result["history"]]


def overhead(broker: LocalBroker, folder: Path, ids: list[str]) -> dict[str, Any]:
    """Round wall time minus the slowest client's training, 112k parameters."""
    result = run(broker, folder, ids, rounds=6, alpha=0.5, fraction=1.0,
                 task_kwargs={"hidden": 1500})
    rows = [(h["duration_s"], h["slowest_client_s"]) for h in result["history"][1:]]
    overheads = [d - s for d, s in rows]
    return {"parameters": 64 * 1500 + 1500 + 1500 * 10 + 10, "devices": len(ids),
            "rounds_measured": len(rows),
            "round_s_median": round(statistics.median(d for d, _ in rows), 3),
            "slowest_client_s_median": round(statistics.median(s for _, s in rows), 3),
            "overhead_s_median": round(statistics.median(overheads), 3),
            "overhead_s_max": round(max(overheads), 3)}


def main() -> None:
    """Run and print JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--only", choices=["quality", "compression", "overhead", "privacy",
                                                   "robustness"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-fl-") as tmp:
        folder = Path(tmp)
        # One fresh pool of device ids per run (persistent sessions never mix): 8 quality,
        # 4 compression, 1 overhead, 3 + 35 robustness and 7 privacy runs.
        ids = [f"fl-{i:03d}" for i in range(DEVICES * (8 + 4 + 1 + 3 + 35 + 7))]
        broker = start_local_broker(folder / "broker", device_ids=ids, kind="mosquitto")
        pools = iter([ids[i:i + DEVICES] for i in range(0, len(ids), DEVICES)])
        result: dict[str, Any] = {"benchmark": "federated_learning", "devices": DEVICES,
                                  "rounds": args.rounds, "hyperparams": HP}
        try:
            if args.only in (None, "quality"):
                result["quality"] = {}
                for key, value in quality_pools(broker, folder, pools, args.rounds).items():
                    result["quality"][key] = value
            if args.only in (None, "compression"):
                result["compression"] = {}
                for label, value in compression_pools(broker, folder, pools,
                                                      args.rounds).items():
                    result["compression"][label] = value
            if args.only in (None, "overhead"):
                result["round_overhead"] = overhead(broker, folder, next(pools))
            if args.only in (None, "robustness"):
                result["robustness"] = robustness_pools(broker, folder, pools, args.rounds)
            if args.only in (None, "privacy"):
                result["privacy"] = privacy_pools(broker, folder, pools, args.rounds)
        finally:
            broker.stop()
    print(json.dumps(result, indent=2))


def quality_pools(broker: LocalBroker, folder: Path, pools: Any, rounds: int,
                  ) -> dict[str, Any]:
    """quality() with fresh device ids per run (persistent sessions never mix)."""
    out: dict[str, Any] = {}
    for alpha in (0.5, 0.1):
        base = baseline(alpha, rounds)
        for strategy, params in (("fedavg", {}), ("fedadam", {"eta": 0.01}),
                                 ("scaffold", {}), ("fednova", {})):
            result = run(broker, folder, next(pools), rounds=rounds, alpha=alpha,
                         strategy=strategy, params=params)
            accs = curve(result)
            reached = next((i + 1 for i, a in enumerate(accs) if a >= 0.95 * base), None)
            out[f"{strategy}_alpha{alpha}"] = {
                "final_accuracy": accs[-1] if accs else None,
                "best_accuracy": max(accs) if accs else None,
                "centralized_baseline": round(base, 4),
                "final_over_baseline": round(accs[-1] / base, 4) if accs else None,
                "round_reaching_95pct_of_baseline": reached,
                "curve": accs, "seconds": round(result["seconds"], 1),
            }
            print(json.dumps({f"{strategy}_alpha{alpha}": out[f"{strategy}_alpha{alpha}"]}),
                  file=sys.stderr, flush=True)
    return out


def compression_pools(broker: LocalBroker, folder: Path, pools: Any,
                      rounds: int) -> dict[str, Any]:
    """compression() with fresh device ids per run."""
    out: dict[str, Any] = {}
    for label, spec in (("fp32", {"kind": "none"}), ("fp16", {"kind": "fp16"}),
                        ("int8", {"kind": "int8"}),
                        ("topk10_int8", {"kind": "topk_int8", "topk_fraction": 0.1})):
        result = run(broker, folder, next(pools), rounds=rounds, alpha=0.5, compression=spec)
        history = result["history"]
        updates = sum(len(h["participants"]) for h in history)
        out[label] = {
            "bytes_per_update": round(sum(h["bytes_received"] for h in history)
                                      / max(1, updates)),
            "final_accuracy": curve(result)[-1] if history else None,
        }
        print(json.dumps({label: out[label]}), file=sys.stderr, flush=True)
    return out


def robustness_pools(broker: LocalBroker, folder: Path, pools: Any, rounds: int,
                     ) -> dict[str, Any]:
    """Final accuracy per strategy, attack and number of attackers (of 10)."""
    strategies: list[tuple[str, str, Callable[[int], dict[str, Any]]]] = [
        ("fedavg", "fedavg", lambda f: {}),
        ("median", "median", lambda f: {}),
        ("trimmed_mean", "trimmed_mean", lambda f: {"beta": 0.3}),
        ("krum", "krum", lambda f: {"num_byzantine": f}),
        ("multikrum", "multikrum", lambda f: {"num_byzantine": f}),
    ]
    attacks = {"scale10": {"kind": "scale", "factor": 10.0},
               "sign_flip4": {"kind": "sign_flip", "factor": 4.0}}
    out: dict[str, Any] = {}
    for k in (1, 2, 3):  # the reference: the honest devices alone, attackers absent
        ids = next(pools)[: DEVICES - k]
        result = run(broker, folder, ids, rounds=rounds, alpha=0.5, fraction=1.0,
                     partitions=DEVICES)
        accs = curve(result)
        key = f"fedavg/absent_{k}of{DEVICES}"
        out[key] = {"final_accuracy": accs[-1] if accs else None,
                    "best_accuracy": max(accs) if accs else None,
                    "state": result["state"], "seconds": round(result["seconds"], 1)}
        print(json.dumps({key: out[key]}), file=sys.stderr, flush=True)
    for label, strategy, params in strategies:
        runs = [("clean", None, 0)] + [(f"{name}_{k}of{DEVICES}", spec, k)
                                       for k in (1, 2, 3) for name, spec in attacks.items()]
        for case, attack, count in runs:
            result = run(broker, folder, next(pools), rounds=rounds, alpha=0.5,
                         strategy=strategy,
                         params=params(max(count, 1) if "krum" in label else count),
                         fraction=1.0, attack=attack, attackers=count)
            accs = curve(result)
            key = f"{label}/{case}"
            out[key] = {"final_accuracy": accs[-1] if accs else None,
                        "best_accuracy": max(accs) if accs else None,
                        "state": result["state"], "seconds": round(result["seconds"], 1)}
            print(json.dumps({key: out[key]}), file=sys.stderr, flush=True)
    return out


def privacy_pools(broker: LocalBroker, folder: Path, pools: Any, rounds: int,
                  ) -> dict[str, Any]:
    """Final accuracy and epsilon spent, without DP and at three budgets, two modes."""
    out: dict[str, Any] = {"baseline_alpha0.5": round(baseline(0.5, rounds), 4)}
    runs: list[tuple[str, dict[str, Any] | None]] = [("no_dp", None)]
    for mode in ("central", "client"):
        for target in (1.0, 3.0, 8.0):
            clipping: dict[str, Any] = (
                {"adaptive_clip": {"target_quantile": 0.5, "initial_clip": 0.5}}
                if mode == "central" else {"clip_norm": CLIENT_CLIP})
            runs.append((f"{mode}_eps{target:g}", {
                "mode": mode, "target_epsilon": target, "delta": 1e-5, **clipping}))
    for label, privacy in runs:
        result = run(broker, folder, next(pools), rounds=rounds, alpha=0.5, privacy=privacy)
        history = result["history"]
        accs = curve(result)
        out[label] = {
            "final_accuracy": accs[-1] if accs else None,
            "best_accuracy": max(accs) if accs else None,
            "rounds": len(history),
            "epsilon_spent": history[-1].get("epsilon_spent") if history else None,
            "noise_multiplier": history[-1].get("dp_noise_multiplier") if history else None,
            "clip_norm_per_round": [h.get("dp_clip_norm") for h in history],
            "curve": accs, "seconds": round(result["seconds"], 1),
        }
        print(json.dumps({label: out[label]}), file=sys.stderr, flush=True)
    return out


if __name__ == "__main__":
    main()
