"""Run every benchmark and write one JSON file: machine, git commit, each bench's figures.

Each benchmark runs in its own process (``bench/bench_*.py``) and prints its JSON on
stdout; this runner collects them with the machine they ran on and the commit they
measured, so results can be compared across commits. A benchmark that fails is
recorded with its exit code and the end of its stderr, and the runner exits 1.

    python bench/run_all.py --out bench-results.json            # every bench, full size
    python bench/run_all.py --quick --only schemas,inference    # small and fast
    python bench/run_all.py --only fl --update bench/results.json  # re-run some, keep the rest

Each benchmark's entry records the commit and start time it ran at (with ``--update``
the entries of one file may come from several runs; the file's own ``commit`` is the
latest). ``bench/table.py`` turns a file into the README's benchmark table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PACKAGES = ("torch", "onnxruntime", "ai-edge-litert", "paho-mqtt", "aiomqtt", "numpy",
            "pydantic", "influxdb-client", "dp-accounting")

FULL: dict[str, list[str]] = {
    "schemas": [], "inference": [], "aggregation": [], "ingest": ["--fl-params", "1000000"],
    "fleet": [], "fl": [], "models": [], "rollout": [], "sustained": ["--compare"],
    "secagg": [], "fl_seeds": ["--tasks", "digits,mnist1d"], "fl_async": [],
    "fl_vs_flower": [], "fl_scale": [], "fl_robust": [],
}
"""Every benchmark with the arguments its published figures come from."""
QUICK: dict[str, list[str]] = {
    "schemas": ["--repeats", "2"],
    "inference": ["--calls", "2000", "--repeats", "2"],
    "aggregation": ["--updates", "10", "--params", "100000", "--repeats", "2", "--skip-flower"],
    "ingest": ["--messages", "2000", "--repeats", "1"],
    "fleet": ["--sizes", "20", "--seconds", "3"],
    "fl": ["--rounds", "3", "--only", "overhead"],
    "models": ["--runs", "200", "--repeats", "1"],
    "rollout": ["--devices", "5", "--sizes-mb", "0.2", "--repeats", "1"],
    "sustained": ["--devices", "20", "--seconds", "5", "--compare"],
    "secagg": ["--devices", "3", "--rounds", "2"],
    "fl_seeds": ["--seeds", "2", "--rounds", "2"],
    "fl_async": ["--seeds", "1", "--period", "5"],
    "fl_vs_flower": ["--seeds", "1", "--rounds", "2"],
    "fl_scale": ["--sizes", "20", "--rounds", "2", "--async-s", "10"],
    "fl_robust": ["--seeds", "2", "--rounds", "2"],
}
"""The same benchmarks, small: to check that each still runs, not to compare figures."""


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    mosquitto = shutil.which("mosquitto")
    broker = None
    if mosquitto is not None:
        probe = subprocess.run([mosquitto, "-h"], capture_output=True, text=True, timeout=10,
                               check=False)
        broker = (probe.stdout or probe.stderr).splitlines()[0].strip() or None
    return {"platform": platform.platform(), "machine": platform.machine(),
            "processor": platform.processor() or None, "cpus": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "packages": versions, "mosquitto": broker}


def commit() -> dict[str, Any]:
    """The git commit measured, and whether the working tree differed from it."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                          text=True, check=False)
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                            capture_output=True, text=True, check=False)
    return {"commit": head.stdout.strip() or None,
            "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}


def run(name: str, args: list[str], timeout_s: float) -> dict[str, Any]:
    """One benchmark in its own process; its JSON, or why there is none."""
    command = [sys.executable, str(BENCH / f"bench_{name}.py"), *args]
    started = time.monotonic()
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"ok": False, "args": args, "error": f"timed out after {timeout_s:.0f} s"}
    seconds = round(time.monotonic() - started, 1)
    if done.returncode != 0:
        return {"ok": False, "args": args, "seconds": seconds, "exit_code": done.returncode,
                "stderr_tail": done.stderr[-2000:]}
    try:
        result = json.loads(done.stdout)
    except json.JSONDecodeError as exc:
        return {"ok": False, "args": args, "seconds": seconds,
                "error": f"stdout is not JSON: {exc}", "stdout_head": done.stdout[:500]}
    return {"ok": True, "args": args, "seconds": seconds, "result": result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-results.json"))
    parser.add_argument("--only", default="", help="Comma-separated names, e.g. schemas,fl")
    parser.add_argument("--quick", action="store_true", help="Small sizes (a smoke run)")
    parser.add_argument("--timeout", type=float, default=7200.0, help="Per benchmark, s")
    parser.add_argument("--update", type=Path, default=None,
                        help="Re-run the benchmarks named by --only in this results file and "
                        "write it back (the other entries are kept)")
    options = parser.parse_args(argv)
    profile = QUICK if options.quick else FULL
    names = [n.strip() for n in options.only.split(",") if n.strip()] or list(profile)
    unknown = sorted(set(names) - set(profile))
    if unknown:
        parser.error(f"no such benchmark: {', '.join(unknown)} (known: {', '.join(profile)})")
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    report: dict[str, Any] = {
        "started": started, "profile": "quick" if options.quick else "full", **commit(),
        "machine": machine(), "benchmarks": {}}
    if options.update is not None:
        if not options.only:
            parser.error("--update re-runs the benchmarks named by --only")
        previous = json.loads(options.update.read_text())
        if previous.get("profile") != report["profile"]:
            parser.error(f"{options.update} holds a {previous.get('profile')} run")
        report["benchmarks"] = previous["benchmarks"]
        options.out = options.update
    for name in names:
        print(f"bench {name} ...", file=sys.stderr, flush=True)
        outcome = run(name, profile[name], options.timeout)
        outcome |= {"commit": report["commit"], "dirty": report["dirty"], "started": started}
        report["benchmarks"][name] = outcome
        print(f"bench {name}: {'ok' if outcome['ok'] else 'FAILED'}"
              f" ({outcome.get('seconds', '?')} s)", file=sys.stderr, flush=True)
    options.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({"out": str(options.out),
                      "ok": {n: report["benchmarks"][n]["ok"] for n in names}}))
    return 0 if all(report["benchmarks"][n]["ok"] for n in names) else 1


if __name__ == "__main__":
    sys.exit(main())
