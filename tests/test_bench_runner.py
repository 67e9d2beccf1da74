"""bench/run_all: one JSON file with the machine, the commit and each benchmark's figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_run_all_writes_machine_commit_and_each_benchmark(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    done = subprocess.run([sys.executable, "bench/run_all.py", "--quick", "--only", "schemas",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert len(report["commit"]) == 40 and isinstance(report["dirty"], bool)
    assert report["machine"]["cpus"] >= 1 and report["machine"]["packages"]["numpy"]
    schemas = report["benchmarks"]["schemas"]
    assert schemas["ok"] and schemas["result"]["benchmark"] == "schemas"
    assert json.loads(done.stdout) == {"out": str(out), "ok": {"schemas": True}}


def test_run_all_refuses_an_unknown_benchmark(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "bench/run_all.py", "--only", "nosuch", "--out",
                           str(tmp_path / "x.json")], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 2 and "no such benchmark: nosuch" in done.stderr
    assert not (tmp_path / "x.json").exists()


def test_update_reruns_the_named_benchmarks_and_keeps_the_others(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    done = subprocess.run([sys.executable, "bench/run_all.py", "--quick", "--only", "schemas",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    kept = {"ok": True, "args": ["--x"], "result": {"benchmark": "kept"}, "commit": "c" * 40}
    report["benchmarks"]["inference"] = kept
    report["benchmarks"]["schemas"]["started"] = "2000-01-01T00:00:00+00:00"
    out.write_text(json.dumps(report))
    again = subprocess.run([sys.executable, "bench/run_all.py", "--quick", "--only", "schemas",
                            "--update", str(out)], cwd=REPO, capture_output=True, text=True,
                           timeout=600, check=False)
    assert again.returncode == 0, again.stderr
    updated = json.loads(out.read_text())
    assert updated["benchmarks"]["inference"] == kept
    schemas = updated["benchmarks"]["schemas"]
    assert schemas["ok"] and schemas["result"]["benchmark"] == "schemas"
    assert schemas["started"] > "2026", "the entry is from the second run"
    assert len(schemas["commit"]) == 40 and schemas["dirty"] in (True, False)
    refused = subprocess.run([sys.executable, "bench/run_all.py", "--update", str(out)],
                             cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode == 2 and "--update re-runs the benchmarks named by --only" \
        in refused.stderr
