"""edgefl and Flower 1.42 side by side on the identical federated task.

The same task (digits MLP, ``fl_tasks.digits``), split (10 devices, Dirichlet alpha 0.1
by default, partition ``i`` on device ``i``), initial weights, hyperparameters, local
training code and seeds, and the same strategy (FedAvg, 50 % of the devices per round),
run twice:

* edgefl over the real system: a local Mosquitto, the cloud service, 10 edge agents
  (``bench_fl.run``); its coordinator samples the cohorts with its seed;
* Flower 1.42's simulation (``flwr.simulation.run_simulation``, Ray backend; installed
  in its own venv, ``.cache/flwr-sim-venv``, created on first use), whose ``ClientApp``
  trains with the very ``fl_tasks`` code (the venv sees this project's packages through
  a ``.pth`` file, so torch and scikit-learn are the same builds), in two ways:

  - ``same_cohorts``: every round trains the devices edgefl's round trained (a FedAvg
    subclass picks them; the devices tell their partition at the start, a ``query``
    message). Both are FedAvg on the same updates: a gap of more than float rounding
    is a bug to find;
  - ``own_sampling``: Flower's FedAvg samples its cohorts itself (``random`` seeded
    with the same seed), which is what users of either compare.

Per seed: central test accuracy per round for the three runs, each round's cohort, and
the bytes of the updates per round (edgefl: the safetensors payloads received, envelope
included; Flower: ``ArrayRecord.count_bytes()`` of the replies). Over the seeds: mean,
standard deviation, min and max of the final accuracies, and the largest difference
per round between edgefl and Flower on the same cohorts.

    .venv/bin/python bench/bench_fl_vs_flower.py [--seeds 5] [--rounds 50] [--alpha 0.1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_fl import DEVICES, HP, curve, run, spread  # noqa: E402

from broker.local import start_local_broker  # noqa: E402
from schemas.codec import decode  # noqa: E402
from schemas.fl import GlobalModelEnvelope  # noqa: E402

FLOWER_SPEC = "flwr[simulation]==1.42.*"
DEFAULT_VENV = REPO / ".cache" / "flwr-sim-venv"
TASK = "fl_tasks.digits:DigitsTask"
FRACTION = 0.5

# Runs in the Flower venv: python -c FLOWER_SIM SPEC.json; prints one JSON line.
FLOWER_SIM = r'''
import json, logging, random, sys, zlib
from pathlib import Path

import numpy as np

spec = json.loads(Path(sys.argv[1]).read_text())
sys.path.insert(0, spec["repo"])
import flwr
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

from fl_tasks.base import Partition, load_task
from schemas.fl import HyperParams

IDS = spec["device_ids"]
N = len(IDS)
ACCURACY, BYTES, COHORTS = [], [], []
client = ClientApp()


def task():
    return load_task(spec["task"], **spec["task_kwargs"])


@client.query()
def who(msg, context):
    partition = int(context.node_config["partition-id"])
    return Message(RecordDict({"who": MetricRecord({"partition": partition})}), reply_to=msg)


@client.train()
def train(msg, context):
    pid = int(context.node_config["partition-id"])
    server_round = int(msg.content["config"]["server-round"])
    t = task()
    data = t.local_data(Partition(index=pid, count=N, scheme="dirichlet", alpha=spec["alpha"]))
    weights = {k: np.asarray(v.numpy(), np.float32) for k, v in msg.content["arrays"].items()}
    # The seed edgefl's device uses for the same round (edge_node.fl_client).
    seed = zlib.crc32(f"{IDS[pid]}/{spec['name']}/{server_round}".encode())
    result = t.train(weights, data, HyperParams.model_validate(spec["hyperparams"]), seed=seed)
    arrays = ArrayRecord(array_dict={k: Array(np.asarray(result.weights[k], np.float32))
                                     for k in weights})
    metrics = MetricRecord({"num-examples": max(1, int(result.num_examples)),
                            "train-loss": float(result.loss)})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


class Cohorts(FedAvg):
    """FedAvg that trains given cohorts (or samples its own) and records bytes and who."""

    def __init__(self, cohorts, nodes, **kwargs):
        super().__init__(**kwargs)
        self.cohorts = cohorts
        self.nodes = nodes
        self.partition_of = {node: p for p, node in nodes.items()}

    def configure_train(self, server_round, arrays, config, grid):
        if self.cohorts is None:
            messages = list(super().configure_train(server_round, arrays, config, grid))
        else:
            config["server-round"] = server_round
            record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
            chosen = [self.nodes[p] for p in self.cohorts[server_round - 1]]
            messages = list(self._construct_messages(record, chosen, MessageType.TRAIN))
        COHORTS.append(sorted(self.partition_of[m.metadata.dst_node_id] for m in messages))
        return messages

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        BYTES.append(sum(m.content["arrays"].count_bytes() for m in replies
                         if m.has_content()))
        return super().aggregate_train(server_round, replies)


server = ServerApp()


@server.main()
def main(grid, context):
    random.seed(spec["seed"])  # Flower's sample_nodes() draws from `random`
    ids = []
    while len(ids) < N:
        ids = sorted(grid.get_node_ids())
    queries = [grid.create_message(RecordDict({}), MessageType.QUERY, node, "who")
               for node in ids]
    nodes = {int(r.content["who"]["partition"]): r.metadata.src_node_id
             for r in grid.send_and_receive(queries)}
    initial = np.load(spec["initial"], allow_pickle=False)
    arrays = ArrayRecord(array_dict={k: Array(initial[k]) for k in initial.files})
    central = task()
    x, y = central.central_data()

    def evaluate(server_round, arrays):
        if server_round == 0:
            return None
        weights = {k: v.numpy() for k, v in arrays.items()}
        accuracy = central.evaluate(weights, x, y).accuracy
        ACCURACY.append(round(float(accuracy), 4))
        return MetricRecord({"accuracy": float(accuracy)})

    strategy = Cohorts(spec["cohorts"], nodes, fraction_train=spec["fraction"],
                       fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=N)
    strategy.start(grid, arrays, num_rounds=spec["rounds"], evaluate_fn=evaluate)


logging.getLogger("flwr").setLevel(logging.WARNING)
run_simulation(server_app=server, client_app=client, num_supernodes=N,
               backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
print(json.dumps({"flwr": flwr.__version__, "accuracy": ACCURACY, "bytes": BYTES,
                  "cohorts": COHORTS}))
'''


def flower_python(venv: Path) -> Path:
    """The Flower venv's python, created on first use (fails loudly when it cannot be)."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=600)
    probe = subprocess.run([str(python), "-c", "import flwr, ray"], capture_output=True,
                           check=False)
    if probe.returncode != 0:
        subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", "install",
                        "--quiet", FLOWER_SPEC], check=True, timeout=1800)
    # This project's packages (torch, scikit-learn, pydantic) after Flower's own.
    site = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True).stdout.strip())
    (site / "zz-edgefl-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def run_flower(python: Path, folder: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """One Flower simulation; its accuracy per round, bytes per round and cohorts."""
    path = folder / f"flower-{spec['seed']}-{'same' if spec['cohorts'] else 'own'}.json"
    path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_DEDUP_LOGS": "0",
           "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    done = subprocess.run([str(python), "-c", FLOWER_SIM, str(path)], capture_output=True,
                          text=True, env=env, timeout=3600, check=False, cwd=folder)
    lines = [line for line in done.stdout.splitlines() if line.startswith('{"flwr"')]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"Flower simulation failed ({done.returncode}): "
                           f"{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def initial_weights(task_folder: Path, out: Path) -> Path:
    """edgefl's version 0 (what every device started from) as an .npz of plain arrays."""
    decoded = decode((task_folder / "global-0.safetensors").read_bytes(), GlobalModelEnvelope)
    savez: Any = np.savez  # (its stub takes the arrays' names for options)
    savez(out, **{k: np.asarray(v, np.float32) for k, v in decoded.tensors.items()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--flower-venv", type=Path, default=DEFAULT_VENV)
    args = parser.parse_args()
    python = flower_python(args.flower_venv)
    by_seed: list[dict[str, Any]] = []
    version = None
    with tempfile.TemporaryDirectory(prefix="bench-fl-flower-") as tmp:
        folder = Path(tmp)
        ids = [f"ff-{i:03d}" for i in range(DEVICES * args.seeds)]  # fresh ids per run
        broker = start_local_broker(folder / "broker", device_ids=ids, kind="mosquitto")
        try:
            for seed in range(args.seeds):
                pool = ids[seed * DEVICES:(seed + 1) * DEVICES]
                edge = run(broker, folder, pool, rounds=args.rounds, alpha=args.alpha,
                           fraction=FRACTION, seed=seed, keep=args.rounds)  # version 0 too
                history = edge["history"]
                cohorts = [sorted(pool.index(d) for d in h["participants"]) for h in history]
                spec = {"repo": str(REPO), "task": TASK, "task_kwargs": {},
                        "hyperparams": HP, "alpha": args.alpha, "device_ids": pool,
                        "name": edge["name"], "rounds": len(history), "fraction": FRACTION,
                        "seed": seed, "cohorts": cohorts,
                        "initial": str(initial_weights(Path(edge["task_folder"]),
                                                       folder / f"initial-{seed}.npz"))}
                same = run_flower(python, folder, spec)
                own = run_flower(python, folder, spec | {"cohorts": None,
                                                         "rounds": args.rounds})
                version = same["flwr"]
                assert same["cohorts"] == cohorts, "Flower trained other cohorts"
                accs = curve(edge)
                gaps = [abs(a - b) for a, b in zip(accs, same["accuracy"], strict=True)]
                row = {
                    "seed": seed, "edgefl_state": edge["state"],
                    "edgefl_curve": accs, "flower_same_cohorts_curve": same["accuracy"],
                    "flower_own_sampling_curve": own["accuracy"],
                    "edgefl_final": accs[-1], "flower_same_cohorts_final": same["accuracy"][-1],
                    "flower_own_sampling_final": own["accuracy"][-1],
                    "same_cohorts_max_gap": round(max(gaps), 4),
                    "edgefl_bytes_per_round": [h["bytes_received"] for h in history],
                    "flower_bytes_per_round": same["bytes"],
                    "edgefl_cohorts": cohorts, "flower_own_cohorts": own["cohorts"]}
                by_seed.append(row)
                print(json.dumps({k: v for k, v in row.items()
                                  if not k.endswith(("curve", "round", "cohorts"))}),
                      file=sys.stderr, flush=True)
        finally:
            broker.stop()
    edge_bytes = [b for r in by_seed for b in r["edgefl_bytes_per_round"]]
    flower_bytes = [b for r in by_seed for b in r["flower_bytes_per_round"]]
    print(json.dumps({
        "benchmark": "fl_vs_flower", "flwr": version, "task": TASK, "devices": DEVICES,
        "fraction_fit": FRACTION, "alpha": args.alpha, "rounds": args.rounds,
        "hyperparams": HP, "seeds": list(range(args.seeds)),
        "final_accuracy": {
            "edgefl": spread([r["edgefl_final"] for r in by_seed]),
            "flower_same_cohorts": spread([r["flower_same_cohorts_final"] for r in by_seed]),
            "flower_own_sampling": spread([r["flower_own_sampling_final"] for r in by_seed])},
        "same_cohorts_max_gap": max(r["same_cohorts_max_gap"] for r in by_seed),
        "bytes_per_round_median": {"edgefl": statistics.median(edge_bytes),
                                   "flower": statistics.median(flower_bytes)},
        "by_seed": by_seed}, indent=1))


if __name__ == "__main__":
    main()
