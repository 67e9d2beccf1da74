"""The README's benchmark table is generated from bench/results.json (bench/table.py), and
that file holds a full run of every benchmark bench/run_all.py knows."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]


def _module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_all = _module("run_all")
table = _module("table")

RESULTS = REPO / "bench" / "results.json"


def test_the_readme_table_is_what_the_results_give() -> None:
    done = subprocess.run([sys.executable, "bench/table.py", str(RESULTS), "--check",
                           "README.md"], cwd=REPO, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr


def test_the_results_are_a_full_run_of_every_benchmark_from_a_clean_tree() -> None:
    report = json.loads(RESULTS.read_text())
    assert report["profile"] == "full"
    assert set(report["benchmarks"]) == set(run_all.FULL)
    for name, entry in report["benchmarks"].items():
        assert entry["ok"], (name, entry.get("stderr_tail") or entry.get("error"))
        assert entry["args"] == run_all.FULL[name], name
        assert len(entry["commit"]) == 40 and entry["dirty"] is False, name
    rendered = table.render(report)
    assert "not measured" not in rendered


def test_a_benchmark_that_failed_or_did_not_run_says_so() -> None:
    report = json.loads(RESULTS.read_text())
    report["benchmarks"]["fl"] = {"ok": False, "args": [], "exit_code": 1}
    del report["benchmarks"]["secagg"]
    rendered = table.render(report)
    assert "| fl | not measured: exit code 1 | | | |" in rendered
    assert "| secagg | not measured: not run | | | |" in rendered
    assert "| rollout |" in rendered


def test_the_table_goes_between_its_markers_only() -> None:
    text = f"intro\n{table.BEGIN}\nold\n{table.END}\nafter\n"
    assert table.replace_block(text, "new\n") == f"intro\n{table.BEGIN}\nnew\n{table.END}\nafter\n"
    with pytest.raises(ValueError, match="markers"):
        table.replace_block("no markers here", "new\n")
