"""Streaming FedAvg aggregation: time per update added and peak extra memory.

100 client updates of 1M float32 parameters (two tensors, seeded), each encoded as the
real wire payload (``schemas.codec.encode`` + ``UpdateEnvelope``, compression none).
Decoding the payload counts in the time of every contender. In the same run:

* ours: ``decode`` + ``decompress`` + ``make_strategy("fedavg").add(delta, weight)``
  for each payload, between ``begin_round`` and ``finalize``;
* fused: the same decoding, then ``acc.add_(update, alpha=w)`` (torch, in place, no
  temporary) into a preallocated float32 accumulator: close to the memory-bandwidth
  limit of this machine, the floor for a streaming aggregator;
* flower: Flower's own ``flwr.server.strategy.aggregate.aggregate`` (and, for
  reference, ``aggregate_inplace``, the default path of its ``FedAvg`` strategy) on the
  same updates, run in a separate venv (``.cache/flwr-venv``, created on first use with
  ``flwr==1.42.*``). The decoded arrays are handed over as ``.npy`` files (no pickle);
  their bytes are Flower's own wire format for ``NDArrays`` (``ndarray_to_bytes``),
  so Flower's decoding (``parameters_to_ndarrays``) is timed apart from aggregation.

Memory is the tracemalloc peak (numpy and Python allocations) above what exists before
the loop (the payloads, the global model), as a multiple of one float32 model; it is
measured in a separate, untimed run. Time per update is the whole round (accumulator
allocation and final division included) over the number of updates, median over
repeats; ours and fused alternate. Pinned to one CPU, one torch thread. Prints one JSON
object. Run on purpose (not in CI):

    .venv/bin/python bench/bench_aggregation.py [--updates 100] [--params 1000000]
        [--repeats 3] [--skip-flower]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cloud.fl.registry import make_strategy
from schemas.codec import decode, encode
from schemas.compression import decompress
from schemas.fl import Compression, UpdateEnvelope

Arrays = dict[str, np.ndarray]

FLOWER_SPEC = "flwr==1.42.*"
DEFAULT_VENV = Path(__file__).resolve().parents[1] / ".cache" / "flwr-venv"
TOLERANCE = 1e-5
"""Largest accepted ``max|a - b| / max|ours|`` between two contenders' results."""

# Runs in the Flower venv: python -c FLOWER_WORKER <folder> <repeats>. Prints JSON.
FLOWER_WORKER = r'''
import json, statistics, sys, time, tracemalloc
from pathlib import Path

import numpy as np
import flwr
from flwr.common import Code, FitRes, Parameters, Status, parameters_to_ndarrays
from flwr.server.strategy.aggregate import aggregate, aggregate_inplace

folder, repeats = Path(sys.argv[1]), int(sys.argv[2])
meta = json.loads((folder / "meta.json").read_text())
weights, names, model_bytes = meta["weights"], meta["names"], meta["model_bytes"]
n = len(weights)
# Flower's wire format for NDArrays is np.save bytes per array (ndarray_to_bytes):
# the .npy files' bytes are the payloads, read before anything is measured.
payloads = [
    [(folder / f"u{i:05d}_{j}.npy").read_bytes() for j in range(len(names))]
    for i in range(n)
]


def params(i):
    return Parameters(tensors=payloads[i], tensor_type="numpy.ndarray")


def load_all():
    return [(parameters_to_ndarrays(params(i)), weights[i]) for i in range(n)]


def fit_results():
    ok = Status(code=Code.OK, message="")
    return [
        (None, FitRes(status=ok, parameters=params(i), num_examples=weights[i], metrics={}))
        for i in range(n)
    ]


def multiple(nbytes):
    return round(nbytes / model_bytes, 3)


tracemalloc.start()
base = tracemalloc.get_traced_memory()[0]
tracemalloc.reset_peak()
results = load_all()
held = tracemalloc.get_traced_memory()[0] - base
tracemalloc.reset_peak()
out = aggregate(results)
peak_aggregate = tracemalloc.get_traced_memory()[1] - base - held
peak_total = tracemalloc.get_traced_memory()[1] - base
for j, array in enumerate(out):
    np.save(folder / f"flower_{j}.npy", np.asarray(array), allow_pickle=False)
del results, out
fits = fit_results()
base_inplace = tracemalloc.get_traced_memory()[0]
tracemalloc.reset_peak()
out = aggregate_inplace(fits)
peak_inplace = tracemalloc.get_traced_memory()[1] - base_inplace
for j, array in enumerate(out):
    np.save(folder / f"flower_inplace_{j}.npy", np.asarray(array), allow_pickle=False)
del out
tracemalloc.stop()

load_s, agg_s, inplace_s = [], [], []
for _ in range(repeats):
    t0 = time.perf_counter()
    results = load_all()
    t1 = time.perf_counter()
    out = aggregate(results)
    t2 = time.perf_counter()
    del results, out
    t3 = time.perf_counter()
    out = aggregate_inplace(fits)
    t4 = time.perf_counter()
    del out
    load_s.append(t1 - t0)
    agg_s.append(t2 - t1)
    inplace_s.append(t4 - t3)


def ms_per_update(seconds):
    return round(statistics.median(seconds) / n * 1e3, 4)


def rounded(seconds):
    return [round(s, 4) for s in seconds]


print(json.dumps({
    "flwr": flwr.__version__,
    "numpy": np.__version__,
    "python": sys.version.split()[0],
    "aggregate": {
        "decode_ms_per_update": ms_per_update(load_s),
        "aggregate_ms_per_update": ms_per_update(agg_s),
        "total_ms_per_update": ms_per_update([a + b for a, b in zip(load_s, agg_s)]),
        "held_updates_model_multiple": multiple(held),
        "aggregate_peak_extra_model_multiple": multiple(peak_aggregate),
        "peak_extra_model_multiple": multiple(peak_total),
        "decode_runs_s": rounded(load_s),
        "aggregate_runs_s": rounded(agg_s),
    },
    "aggregate_inplace": {
        "total_ms_per_update": ms_per_update(inplace_s),
        "peak_extra_model_multiple": multiple(peak_inplace),
        "runs_s": rounded(inplace_s),
    },
}))
'''


# ------------------------------------------------------------------- inputs


def _shapes(params: int) -> dict[str, tuple[int, ...]]:
    """Two tensors of ``params`` elements in all: 500x1000 and 1000x500 for 1M."""
    first = params // 2
    second = params - first
    if first % 500 == 0 and second % 500 == 0:
        return {"fc1.weight": (500, first // 500), "fc2.weight": (second // 500, 500)}
    return {"fc1.weight": (first,), "fc2.weight": (second,)}


def _make_updates(updates: int, params: int, seed: int) -> tuple[list[bytes], list[int]]:
    """Wire payloads of random float32 deltas and their example counts (50..500)."""
    rng = np.random.default_rng(seed)
    shapes = _shapes(params)
    weights = [int(w) for w in rng.integers(50, 501, size=updates)]
    payloads = []
    for i, weight in enumerate(weights):
        tensors = {
            name: rng.standard_normal(shape, dtype=np.float32) * np.float32(0.01)
            for name, shape in shapes.items()
        }
        envelope = UpdateEnvelope(
            task="bench", round=1, device_id=f"pi-{i:05d}", base_version="1",
            num_examples=weight, compression=Compression.NONE, sent_at=1_790_000_000.0,
        )
        payloads.append(encode(tensors, envelope))
    return payloads, weights


def _decode(payload: bytes, max_elements: int) -> tuple[Arrays, int]:
    """What the cloud does with a received update: decode, check, decompress."""
    decoded = decode(payload, UpdateEnvelope)
    envelope = decoded.envelope
    delta = decompress(decoded.tensors, envelope.compression, max_elements=max_elements)
    return delta, envelope.num_examples


# -------------------------------------------------------------- contenders


def run_ours(payloads: list[bytes], global_weights: Arrays) -> Arrays:
    """Streaming FedAvg of the project, one decoded payload at a time."""
    size = sum(a.size for a in global_weights.values())
    strategy = make_strategy("fedavg")
    strategy.begin_round(global_weights)
    for payload in payloads:
        delta, weight = _decode(payload, size)
        strategy.add(delta, weight)
        del delta
    return strategy.finalize()


def run_fused(payloads: list[bytes], global_weights: Arrays) -> Arrays:
    """Decode the same way, then ``acc.add_(u, alpha=w)`` into float32 (no temporary)."""
    size = sum(a.size for a in global_weights.values())
    sums = {name: np.zeros(a.shape, dtype=np.float32) for name, a in global_weights.items()}
    accs = {name: torch.from_numpy(a) for name, a in sums.items()}
    total = 0
    with warnings.catch_warnings():  # decoded arrays are read-only views: only read here
        warnings.simplefilter("ignore", UserWarning)
        for payload in payloads:
            delta, weight = _decode(payload, size)
            for name, acc in accs.items():
                acc.add_(torch.from_numpy(delta[name]), alpha=weight)
            total += weight
            del delta
    for acc in accs.values():
        acc.div_(total)
    return sums


def decode_only(payloads: list[bytes], global_weights: Arrays) -> Arrays:
    """Decoding alone, the share of every contender's time that is not arithmetic."""
    size = sum(a.size for a in global_weights.values())
    for payload in payloads:
        _decode(payload, size)
    return {}


def _seconds(fn: Callable[[list[bytes], Arrays], Arrays], payloads: list[bytes],
             global_weights: Arrays) -> float:
    start = time.perf_counter()
    fn(payloads, global_weights)
    return time.perf_counter() - start


def _peak_extra(fn: Callable[[list[bytes], Arrays], Arrays], payloads: list[bytes],
                global_weights: Arrays) -> tuple[int, Arrays]:
    """Bytes traced at the peak of one run above what existed before it, and its result."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = fn(payloads, global_weights)
        return tracemalloc.get_traced_memory()[1] - base, result
    finally:
        tracemalloc.stop()


def _strategy_state_bytes(global_weights: Arrays) -> int:
    """Bytes the FedAvg strategy allocates at ``begin_round`` (running sum + scratch)."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        strategy = make_strategy("fedavg")
        strategy.begin_round(global_weights)
        held = tracemalloc.get_traced_memory()[0] - base
        del strategy
        return held
    finally:
        tracemalloc.stop()


def _relative_diff(result: Arrays, reference: Arrays) -> float:
    """``max|result - reference| / max|reference|`` over all tensors."""
    scale = max(float(np.max(np.abs(r))) for r in reference.values())
    worst = max(
        float(np.max(np.abs(result[n].astype(np.float64) - reference[n].astype(np.float64))))
        for n in reference
    )
    return worst / scale if scale else worst


# ----------------------------------------------------------------- flower


def _why(exc: Exception) -> str:
    stderr = getattr(exc, "stderr", None)
    tail = stderr.decode(errors="replace")[-400:].strip() if isinstance(stderr, bytes) else ""
    return f"{exc} {tail}".strip()


def _flower_python(venv: Path) -> tuple[Path | None, str]:
    """The Flower venv's python (created on first use), or None and why not."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import flwr"]
    if python.exists() and subprocess.run(probe, capture_output=True, check=False).returncode == 0:
        return python, "existing venv"
    failures = (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError)
    if not python.exists():
        try:
            subprocess.run([sys.executable, "-m", "venv", str(venv)],
                           capture_output=True, check=True, timeout=600)
        except failures as exc:
            return None, f"python -m venv failed: {_why(exc)}"
    errors = []
    for spec in (FLOWER_SPEC, "flwr"):
        try:
            subprocess.run([str(python), "-m", "pip", "install", "--quiet", spec],
                           capture_output=True, check=True, timeout=1800)
        except failures as exc:
            errors.append(f"pip install {spec}: {_why(exc)}")
            continue
        return python, f"created, pip install {spec}"
    return None, "; ".join(errors)


def run_flower(python: Path, payloads: list[bytes], global_weights: Arrays,
               repeats: int) -> tuple[dict[str, Any], Arrays, Arrays]:
    """Flower's aggregate() and aggregate_inplace() on the decoded updates, in its venv."""
    size = sum(a.size for a in global_weights.values())
    names = list(global_weights)
    with tempfile.TemporaryDirectory(prefix="bench-agg-") as tmp:
        folder = Path(tmp)
        weights = []
        for i, payload in enumerate(payloads):
            delta, weight = _decode(payload, size)
            weights.append(weight)
            for j, name in enumerate(names):
                np.save(folder / f"u{i:05d}_{j}.npy", delta[name], allow_pickle=False)
        meta = {"weights": weights, "names": names, "model_bytes": size * 4}
        (folder / "meta.json").write_text(json.dumps(meta))
        done = subprocess.run(
            [str(python), "-c", FLOWER_WORKER, str(folder), str(repeats)],
            capture_output=True, check=True, text=True, timeout=3600,
        )
        report: dict[str, Any] = json.loads(done.stdout)

        def load(prefix: str) -> Arrays:
            return {
                name: np.load(folder / f"{prefix}_{j}.npy", allow_pickle=False)
                for j, name in enumerate(names)
            }

        return report, load("flower"), load("flower_inplace")


# ------------------------------------------------------------------- main


def _ms(seconds: list[float], updates: int) -> float:
    return round(statistics.median(seconds) / updates * 1e3, 4)


def main() -> None:  # noqa: PLR0915 - one linear report
    """Run the contenders and print JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--updates", type=int, default=100)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flower-venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--skip-flower", action="store_true")
    args = parser.parse_args()
    pinned = None
    if hasattr(os, "sched_setaffinity"):
        pinned = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {pinned})
    torch.set_num_threads(1)

    n: int = args.updates
    payloads, weights = _make_updates(n, args.params, args.seed)
    # Zero global weights: finalize() then returns the weighted mean delta itself,
    # directly comparable with what Flower's aggregate returns.
    global_weights = {
        name: np.zeros(shape, dtype=np.float32) for name, shape in _shapes(args.params).items()
    }
    model_bytes: int = args.params * 4

    # Untimed runs under tracemalloc (also the warm-up), then interleaved timed repeats.
    ours_peak, ours_result = _peak_extra(run_ours, payloads, global_weights)
    fused_peak, fused_result = _peak_extra(run_fused, payloads, global_weights)
    decode_peak, _ = _peak_extra(decode_only, payloads, global_weights)
    state = _strategy_state_bytes(global_weights)
    ours_s: list[float] = []
    fused_s: list[float] = []
    decode_s: list[float] = []
    for _ in range(args.repeats):
        ours_s.append(_seconds(run_ours, payloads, global_weights))
        fused_s.append(_seconds(run_fused, payloads, global_weights))
        decode_s.append(_seconds(decode_only, payloads, global_weights))
    ours_ms = _ms(ours_s, n)
    fused_ms = _ms(fused_s, n)

    def multiple(nbytes: int) -> float:
        return round(nbytes / model_bytes, 3)

    agreement: dict[str, Any] = {
        "tolerance": TOLERANCE,
        "fused_vs_ours": _relative_diff(fused_result, ours_result),
    }
    flower: dict[str, Any]
    flower_version = None
    ratios: dict[str, Any] = {"ours_over_fused": round(ours_ms / fused_ms, 3)}
    if args.skip_flower:
        flower = {"skipped": "--skip-flower"}
    else:
        python, how = _flower_python(args.flower_venv)
        if python is None:
            flower = {"unavailable": how}
        else:
            report, flower_result, inplace_result = run_flower(
                python, payloads, global_weights, args.repeats
            )
            flower = {"venv": str(args.flower_venv), "venv_status": how, **report}
            flower_version = report["flwr"]
            agreement["flower_aggregate_vs_ours"] = _relative_diff(flower_result, ours_result)
            agreement["flower_aggregate_inplace_vs_ours"] = _relative_diff(
                inplace_result, ours_result
            )
            agg = report["aggregate"]
            ratios["flower_over_ours"] = round(agg["total_ms_per_update"] / ours_ms, 3)
            ratios["flower_aggregate_only_over_ours"] = round(
                agg["aggregate_ms_per_update"] / ours_ms, 3
            )
            ratios["flower_inplace_over_ours"] = round(
                report["aggregate_inplace"]["total_ms_per_update"] / ours_ms, 3
            )
    agreement["ok"] = all(
        value < TOLERANCE for key, value in agreement.items() if key.endswith("_vs_ours")
    )
    ours_multiple = multiple(ours_peak)
    goals: dict[str, Any] = {
        "ours_over_fused_le_1.2": ratios["ours_over_fused"] <= 1.2,
        "ours_peak_extra_le_3_models": ours_multiple <= 3.0,
    }
    if "flower_over_ours" in ratios:
        goals["flower_over_ours_ge_3"] = ratios["flower_over_ours"] >= 3.0

    result = {
        "benchmark": "aggregation",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "pinned_cpu": pinned,
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "numpy": np.__version__,
            "torch": torch.__version__,
            "flwr": flower_version,
        },
        "updates": n,
        "parameters": args.params,
        "model_bytes": model_bytes,
        "payload_bytes": len(payloads[0]),
        "weights_sum": sum(weights),
        "repeats": args.repeats,
        "ours": {
            "ms_per_update_median": ours_ms,
            "peak_extra_model_multiple": ours_multiple,
            "strategy_state_model_multiple": multiple(state),
            "runs_s": [round(s, 4) for s in ours_s],
        },
        "fused_torch_add_": {
            "ms_per_update_median": fused_ms,
            "peak_extra_model_multiple": multiple(fused_peak),
            "runs_s": [round(s, 4) for s in fused_s],
        },
        "decode_only": {
            "ms_per_update_median": _ms(decode_s, n),
            "peak_extra_model_multiple": multiple(decode_peak),
        },
        "flower": flower,
        "ratios": ratios,
        "agreement": agreement,
        "goals": goals,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
