"""Robust aggregation at 20 % attackers over data seeds: is the best strategy within 2 points?

``bench_fl``'s robustness block runs one data split, on which the two attacking devices
(the last two partitions) happen to hold data the others lack: there, discarding them
costs 4 points whatever the strategy. Here the same setting (digits MLP, 10 devices,
Dirichlet alpha 0.5, every device every round, 30 rounds, the real system: a local
Mosquitto, the cloud service, the agents in this process) runs on ``--seeds`` data
splits (the partition seed and the coordinator's seed both ``s``), and per seed:

* ``fedavg/clean``: all 10 devices honest;
* ``fedavg/honest_only``: the 8 honest devices alone, the attackers' partitions absent
  (what any aggregate that discards the attackers' updates can at best learn from);
* FedAvg, median, trimmed mean (beta 0.3), Krum and Multi-Krum (f = 2) with 2 of 10
  devices attacking: updates scaled by 10, or sign-flipped and scaled by 4.

The JSON has every run's final central accuracy per seed, and per attack the robust
strategy with the best mean and its gap to ``clean`` and to ``honest_only``, per seed
and on the means (``statistics``).

    .venv/bin/python bench/bench_fl_robust.py [--seeds 5] [--rounds 30]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_fl import DEVICES, curve, run, spread  # noqa: E402

from broker.local import start_local_broker  # noqa: E402
from edge_node.fleet import one_thread_per_device  # noqa: E402

ATTACKERS = 2
ALPHA = 0.5
STRATEGIES: dict[str, dict[str, Any]] = {
    "fedavg": {}, "median": {}, "trimmed_mean": {"beta": 0.3},
    "krum": {"num_byzantine": ATTACKERS}, "multikrum": {"num_byzantine": ATTACKERS}}
ROBUST = ["median", "trimmed_mean", "krum", "multikrum"]
ATTACKS = {"scale10": {"kind": "scale", "factor": 10.0},
           "sign_flip4": {"kind": "sign_flip", "factor": 4.0}}


def summary(values: list[float]) -> dict[str, Any]:
    """Per seed, then mean, standard deviation, min and max."""
    return {"by_seed": values, **spread(values)}


def main() -> None:
    """Run and print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    one_thread_per_device()  # ten devices in this process, all training at once
    cases: list[tuple[str, str, dict[str, Any] | None, int, int]] = [
        ("fedavg/clean", "fedavg", None, 0, DEVICES),
        ("fedavg/honest_only", "fedavg", None, 0, DEVICES - ATTACKERS)]
    cases += [(f"{strategy}/{name}", strategy, attack, ATTACKERS, DEVICES)
              for name, attack in ATTACKS.items() for strategy in STRATEGIES]
    seeds = list(range(args.seeds))
    finals: dict[str, list[float]] = {key: [] for key, *_ in cases}
    with tempfile.TemporaryDirectory(prefix="bench-fl-robust-") as tmp:
        folder = Path(tmp)
        ids = [f"rb-{i:04d}" for i in range(DEVICES * len(cases) * len(seeds))]
        broker = start_local_broker(folder / "broker", device_ids=ids, kind="mosquitto")
        pools = iter([ids[i:i + DEVICES] for i in range(0, len(ids), DEVICES)])
        try:
            for seed in seeds:
                for key, strategy, attack, attackers, devices in cases:
                    result = run(broker, folder, next(pools)[:devices], rounds=args.rounds,
                                 alpha=ALPHA, strategy=strategy,
                                 params=STRATEGIES[strategy], fraction=1.0, attack=attack,
                                 attackers=attackers, partitions=DEVICES, seed=seed,
                                 data_seed=seed)
                    if result["state"] != "finished":
                        raise RuntimeError(f"{key}, seed {seed}: {result['state']}")
                    finals[key].append(curve(result)[-1])
                    print(json.dumps({"seed": seed, key: finals[key][-1]}), file=sys.stderr,
                          flush=True)
        finally:
            broker.stop()
    runs = {key: summary(values) for key, values in finals.items()}
    clean, honest = finals["fedavg/clean"], finals["fedavg/honest_only"]
    best: dict[str, Any] = {}
    for name in ATTACKS:
        strategy = max(ROBUST, key=lambda s: runs[f"{s}/{name}"]["mean"])
        attacked = finals[f"{strategy}/{name}"]
        best[name] = {
            "strategy": strategy,
            **{k: runs[f"{strategy}/{name}"][k] for k in ("mean", "stdev")},
            "gap_to_clean_points": summary([round(100 * (c - a), 2)
                                            for c, a in zip(clean, attacked, strict=True)]),
            "gap_to_honest_only_points": summary([round(100 * (h - a), 2) for h, a
                                                  in zip(honest, attacked, strict=True)])}
    print(json.dumps({"benchmark": "fl_robust", "devices": DEVICES, "attackers": ATTACKERS,
                      "alpha": ALPHA, "rounds": args.rounds, "seeds": seeds, "runs": runs,
                      "best_robust": best}, indent=1))


if __name__ == "__main__":
    main()
