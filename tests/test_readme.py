"""The README's commands exist and run (docs that run)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"```console\n(.*?)```", README, flags=re.DOTALL)
COMMANDS = [line.split("#")[0].strip() for block in BLOCKS for line in block.splitlines()
            if line.strip()]


def test_readme_opens_with_the_two_commands() -> None:
    first = COMMANDS[:2]
    assert [c.split()[:2] for c in first] == [["make", "demo"], ["make", "test"]]
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.MULTILINE)
    assert re.search(r"^test:", makefile, re.MULTILINE)
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci


EDGEFL_COMMANDS = sorted({tuple(w for w in c.split()[1:] if not w.startswith("-"))[:2]
                          for c in COMMANDS if c.startswith("edgefl ")})


@pytest.mark.parametrize("words", EDGEFL_COMMANDS, ids=" ".join)
def test_every_edgefl_command_in_the_readme_exists(words: tuple[str, ...]) -> None:
    # Keep only sub-command words (drop positional arguments such as a device id).
    path = [w for w in words if re.fullmatch(r"[a-z][a-z-]*", w) and not w.startswith("pi-")]
    result = subprocess.run([sys.executable, "-m", "edgefl", *path, "--help"],
                            capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_readme_shows_the_demo_charts_it_links() -> None:
    """Every image the README shows is a committed PNG, and the demo's four are there."""
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README)
    assert {Path(p).name for p in images} >= {"fl_accuracy.png", "fl_bytes.png",
                                              "fleet_accuracy.png", "alert_telemetry.png"}
    for image in images:
        assert (REPO / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", image
