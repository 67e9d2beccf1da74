"""Overhead of the agent's inference path over calling onnxruntime directly.

Same digits MLP (64 -> 32 -> 10, ONNX, one intra-op thread), same input, same
process, rounds interleaved. Prints JSON with medians and ratios:

    .venv/bin/python bench/bench_inference.py [--calls 20000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from edge_node.inference import load_runtime
from edge_node.inference_service import InferenceService
from edge_node.model_store import InstalledModel
from schemas.base import ModelFormat


def _per_call_us(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    """Run and print JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mlp.onnx"
        torch.onnx.export(net.eval(), (torch.zeros(1, 64),), str(path), input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}},
                          dynamo=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        runtime = load_runtime(path, ModelFormat.ONNX, threads=1)
        service = InferenceService()
        service.activate("mlp", InstalledModel("1", ModelFormat.ONNX, "0" * 64, 1, "A",
                                               str(path)), load_runtime(path, ModelFormat.ONNX),
                         None)
        x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
        feeds = {"x": x}
        paths: dict[str, Callable[[], object]] = {
            "onnxruntime_direct": lambda: session.run(["y"], feeds),
            "runtime_wrapper": lambda: runtime.run(x),
            "agent_inference_service": lambda: service.infer("mlp", x),
        }
        for fn in paths.values():
            _per_call_us(fn, 2000)  # warm-up
        runs: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(args.repeats):
            for name, fn in paths.items():
                runs[name].append(_per_call_us(fn, args.calls))
    medians = {name: statistics.median(values) for name, values in runs.items()}
    direct = medians["onnxruntime_direct"]
    print(json.dumps({
        "benchmark": "inference_overhead",
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "model": "digits MLP 64-32-10, batch 1, 1 thread",
        "calls_per_run": args.calls,
        "repeats": args.repeats,
        "median_us_per_call": {k: round(v, 3) for k, v in medians.items()},
        "ratio_runtime_wrapper_over_direct": round(medians["runtime_wrapper"] / direct, 3),
        "ratio_agent_service_over_direct": round(medians["agent_inference_service"] / direct, 3),
        "runs_us": {k: [round(v, 3) for v in vs] for k, vs in runs.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
