"""The systemd units in the repository: systemd accepts them, and they run commands and
options that exist (a unit is documentation an operator copies: it must not drift)."""

from __future__ import annotations

import configparser
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EDGEFL = Path(sys.executable).with_name("edgefl")
UNITS = {"node": REPO / "edge_node" / "deploy" / "edgefl-node.service",
         "cloud": REPO / "cloud" / "deploy" / "edgefl-cloud.service"}


def read_unit(path: Path) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    unit.read_string(path.read_text())
    return unit


@pytest.mark.parametrize("command", sorted(UNITS))
def test_systemd_accepts_the_unit(command: str, tmp_path: Path) -> None:
    text = UNITS[command].read_text().replace("/opt/edgefl/bin/edgefl", str(EDGEFL))
    unit = tmp_path / UNITS[command].name
    unit.write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    complaints = [line for line in done.stderr.splitlines() if unit.name in line]
    assert complaints == [], complaints  # an unknown key is only a warning to systemd


@pytest.mark.parametrize("command", sorted(UNITS))
def test_the_unit_runs_an_existing_command_with_existing_options(command: str) -> None:
    service = read_unit(UNITS[command])["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0] == "/opt/edgefl/bin/edgefl" and argv[1] == command
    options = [a for a in argv[2:] if a.startswith("--")]
    shown = subprocess.run([str(EDGEFL), command, "--help"], capture_output=True, text=True,
                           timeout=60, check=True, env={"COLUMNS": "200", "PATH": ""}).stdout
    known = set(re.findall(r"(--[a-z][a-z-]*)", shown))
    assert options and set(options) <= known, sorted(set(options) - known)
    # A configuration error exits 2 (one line): systemd must not restart it in a loop.
    assert service["RestartPreventExitStatus"] == "2"
    assert service["KillSignal"] == "SIGTERM" and service["UMask"] == "0077"
    state = service["StateDirectory"]
    assert f"/var/lib/{state}" in argv, "the state folder is the one systemd creates"
