"""Federated quality over coordinator seeds: the mean, its spread, and who took part.

Client selection decides much of a non-IID result: with one coordinator seed a figure
looks steadier than it is. Here each strategy runs once per coordinator seed on the real
system (a local Mosquitto, the cloud service, 10 edge agents in this process, half of
them selected each round, Dirichlet alpha 0.1 by default), and the JSON gives, per task
and strategy:

* the final central test accuracy of every seed, their mean, standard deviation, min
  and max (``statistics``), and the mean curve;
* the centralized baseline (the same model on the union of the devices' data, the same
  epochs budget) and the round at which each seed first reached 95 % of it;
* every round's participants, per seed.

    .venv/bin/python bench/bench_fl_seeds.py [--tasks digits] [--seeds 5] [--rounds 50]
        [--alpha 0.1]

``--tasks digits,mnist1d`` adds MNIST-1D, the task that separates strategies (its 1-D
CNN makes a round about 1.5 s here with 5 devices training at once, one torch thread
each, so its 20 runs of 50 rounds take about half an hour; the full profile of
``run_all.py`` runs both tasks).

Strategies: FedAvg, FedProx (mu 0.01), SCAFFOLD and FedNova (local steps differ with the
devices' data sizes under Dirichlet splits, which is the objective inconsistency FedNova
normalizes away).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_fl import DEVICES, HP, curve, run, spread  # noqa: E402

from broker.local import start_local_broker  # noqa: E402
from cloud.demo_model import centralized_baseline  # noqa: E402
from edge_node.fleet import one_thread_per_device  # noqa: E402
from fl_tasks.base import FLTask, Partition  # noqa: E402
from fl_tasks.digits import DigitsTask  # noqa: E402
from fl_tasks.mnist1d import Mnist1dTask  # noqa: E402
from schemas.fl import HyperParams  # noqa: E402

TASKS: dict[str, tuple[str, dict[str, Any]]] = {
    "digits": ("fl_tasks.digits:DigitsTask", {}),
    "mnist1d": ("fl_tasks.mnist1d:Mnist1dTask", {}),
}
STRATEGIES: list[tuple[str, dict[str, Any]]] = [
    ("fedavg", {}), ("fedprox", {"proximal_mu": 0.01}), ("scaffold", {}), ("fednova", {}),
]
FRACTION = 0.5


def task_instance(name: str) -> FLTask:
    """The task object the devices and the coordinator build from its path."""
    return DigitsTask() if name == "digits" else Mnist1dTask()


def baseline(name: str, alpha: float, rounds: int) -> float:
    """Centralized accuracy: the union of the devices' data, each device's epochs budget."""
    partitions = [Partition(index=i, count=DEVICES, scheme="dirichlet", alpha=alpha)
                  for i in range(DEVICES)]
    epochs = max(1, round(rounds * HP["local_epochs"] * FRACTION))
    return centralized_baseline(task_instance(name), partitions,
                                HyperParams.model_validate(HP), epochs).accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="digits")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--alpha", type=float, default=0.1)
    args = parser.parse_args()
    one_thread_per_device()  # ten devices in this process, five training at once
    tasks = args.tasks.split(",")
    unknown = set(tasks) - set(TASKS)
    if unknown:
        parser.error(f"unknown task(s): {', '.join(sorted(unknown))}")
    result: dict[str, Any] = {"benchmark": "fl_seeds", "devices": DEVICES,
                              "fraction_fit": FRACTION, "rounds": args.rounds,
                              "alpha": args.alpha, "seeds": list(range(args.seeds)),
                              "hyperparams": HP, "tasks": {}}
    runs = len(tasks) * len(STRATEGIES) * args.seeds
    with tempfile.TemporaryDirectory(prefix="bench-fl-seeds-") as tmp:
        folder = Path(tmp)
        ids = [f"fs-{i:03d}" for i in range(DEVICES * runs)]  # fresh ids per run
        broker = start_local_broker(folder / "broker", device_ids=ids, kind="mosquitto")
        pools = iter([ids[i:i + DEVICES] for i in range(0, len(ids), DEVICES)])
        try:
            for name in tasks:
                path, kwargs = TASKS[name]
                base = baseline(name, args.alpha, args.rounds)
                by_strategy: dict[str, Any] = {}
                for strategy, params in STRATEGIES:
                    seeds = []
                    for seed in range(args.seeds):
                        outcome = run(broker, folder, next(pools), rounds=args.rounds,
                                      alpha=args.alpha, strategy=strategy, params=params,
                                      fraction=FRACTION, task=path, task_kwargs=kwargs,
                                      seed=seed)
                        accs = curve(outcome)
                        seeds.append({
                            "seed": seed, "state": outcome["state"],
                            "final_accuracy": accs[-1] if accs else None,
                            "round_reaching_95pct_of_baseline": next(
                                (i + 1 for i, a in enumerate(accs) if a >= 0.95 * base), None),
                            "curve": accs,
                            "participants": [sorted(h["participants"])
                                             for h in outcome["history"]],
                            "seconds": round(outcome["seconds"], 1)})
                        print(json.dumps({f"{name}/{strategy}/seed{seed}": {
                            k: v for k, v in seeds[-1].items()
                            if k not in ("curve", "participants")}}), file=sys.stderr,
                              flush=True)
                    finals = [s["final_accuracy"] for s in seeds
                              if s["final_accuracy"] is not None]
                    curves = [s["curve"] for s in seeds if len(s["curve"]) == args.rounds]
                    by_strategy[strategy] = {
                        "final_accuracy": spread(finals) if finals else None,
                        "final_over_baseline": round(statistics.mean(finals) / base, 4)
                        if finals else None,
                        "seeds_reaching_95pct": sum(
                            s["round_reaching_95pct_of_baseline"] is not None for s in seeds),
                        "mean_curve": [round(statistics.mean(c[i] for c in curves), 4)
                                       for i in range(args.rounds)] if curves else [],
                        "by_seed": seeds}
                result["tasks"][name] = {"centralized_baseline": round(base, 4),
                                         "strategies": by_strategy}
        finally:
            broker.stop()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
