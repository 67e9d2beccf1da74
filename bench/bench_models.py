"""Model formats side by side: size, latency and accuracy, as ratios to ONNX fp32.

For the digits MLP and CNN (trained in the run on the task's training split), the
optimizer produces every recipe; each output is loaded in its edge runtime with 1
thread and timed one example per call (``--runs`` calls after 20 warm-up calls),
medians over ``--repeats`` optimizations. The ratios are against ONNX fp32 of the
same model measured in the same run (this machine is shared and noisy). The
TFLite recipes need litert-torch: ``--converter-python`` (default
``.cache/venv-convert/bin/python``). Prints JSON:

    .venv/bin/python bench/bench_models.py [--runs 2000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safetensors.numpy import save as save_safetensors

from cloud.models.formats import ArtifactFormat
from cloud.models.optimizer import RECIPES, Optimizer, Options
from cloud.models.registry import ModelRegistry
from cloud.storage.sqlite_store import SqliteStore
from edge_node.inference import load_runtime
from fl_tasks.base import LocalData, get_weights
from fl_tasks.digits import DigitsTask
from schemas.fl import HyperParams

REPO = Path(__file__).resolve().parents[1]


def measure(kind: str, runs: int, repeats: int, converter: str) -> dict[str, Any]:
    task = DigitsTask(model=kind)  # type: ignore[arg-type]
    x, y = task.server_data()
    hp = HyperParams(local_epochs=15, learning_rate=0.1, momentum=0.5, batch_size=32)
    weights = task.train(get_weights(task.build_model()), LocalData(x, y, x[:1], y[:1]), hp,
                         seed=0).weights
    per_recipe: dict[str, list[Any]] = {r: [] for r in RECIPES}
    for repeat in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            registry = ModelRegistry(SqliteStore(Path(tmp) / "s.sqlite3"), Path(tmp) / "a")
            registry.register("digits", "1.0.0", save_safetensors(weights),
                              ArtifactFormat.WEIGHTS, task="fl_tasks.digits:DigitsTask",
                              recipe={"task_kwargs": {"model": kind}})
            optimizer = Optimizer(registry, lambda p, f: load_runtime(p, f, threads=1),
                                  converter_python=converter)
            report = optimizer.optimize("digits", "1.0.0",
                                        Options(latency_runs=runs, seed=repeat))
            for out in report.outputs:
                per_recipe[out.recipe].append(out)
    base = per_recipe["onnx"]
    base_p50 = statistics.median(o.latency_ms_p50 for o in base)
    base_p99 = statistics.median(o.latency_ms_p99 for o in base)
    rows: dict[str, Any] = {}
    for recipe, outs in per_recipe.items():
        ok = [o for o in outs if o.latency_ms_p50 is not None]
        if not ok:
            rows[recipe] = {"state": outs[0].state if outs else "missing",
                            "reason": outs[0].reason if outs else None}
            continue
        p50 = statistics.median(o.latency_ms_p50 for o in ok)
        p99 = statistics.median(o.latency_ms_p99 for o in ok)
        rows[recipe] = {
            "size_bytes": ok[0].size_bytes, "size_ratio": round(ok[0].size_bytes
                                                                / base[0].size_bytes, 3),
            "latency_ms_p50": round(p50, 4), "p50_ratio": round(p50 / base_p50, 3),
            "latency_ms_p99": round(p99, 4), "p99_ratio": round(p99 / base_p99, 3),
            "accuracy": round(ok[0].accuracy, 4),
            "accuracy_delta_points": ok[0].accuracy_delta_points,
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--converter-python",
                        default=str(REPO / ".cache" / "venv-convert" / "bin" / "python"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    result = {"runs": args.runs, "repeats": args.repeats, "threads": 1,
              "reference": "onnx (fp32, onnxruntime) of the same model, same run",
              "models": {kind: measure(kind, args.runs, args.repeats, args.converter_python)
                         for kind in ("mlp", "cnn")}}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
