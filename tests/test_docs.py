"""The operator pages in docs/: every example is checked against the code.

- each ```yaml block that starts with ``# rules file`` loads in the alert engine;
- each ```yaml block that starts with ``# task file`` passes what
  ``edgefl fl start --task-file`` checks (settings, task class, strategy, privacy);
- each ``edgefl`` command of a ```console block exists, with every option shown;
- every relative link points to a file of the repository.
"""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted((REPO / "docs").glob("*.md"))
OPTION = re.compile(r"--[a-z][a-z0-9-]*")


def blocks(language: str, marker: str = "") -> list[tuple[str, str]]:
    """(page name, block text) of every fenced block in ``language`` starting with ``marker``."""
    found = []
    for page in PAGES:
        for text in re.findall(rf"```{language}\n(.*?)```", page.read_text(), re.DOTALL):
            if text.startswith(marker):
                found.append((page.name, text))
    return found


RULES = blocks("yaml", "# rules file")
TASKS = blocks("yaml", "# task file")
COMMANDS = [(page, line.strip()) for page, text in blocks("console")
            for line in text.splitlines() if line.strip().startswith("edgefl ")]


def test_every_yaml_example_is_checked() -> None:
    assert RULES and TASKS
    assert len(RULES) + len(TASKS) == len(blocks("yaml")), "a yaml block no test reads"


@pytest.mark.parametrize(("page", "text"), RULES, ids=[p for p, _ in RULES])
def test_rules_examples_load_in_the_alert_engine(page: str, text: str) -> None:
    from cloud.alerts.rules import parse_rules

    rules = parse_rules(text, page)
    assert len(rules) == len(yaml.safe_load(text)["rules"])


@pytest.mark.parametrize(("page", "text"), TASKS, ids=[f"{p}:{t.splitlines()[0]}"
                                                        for p, t in TASKS])
def test_task_examples_pass_what_fl_start_checks(page: str, text: str) -> None:
    from cloud.fl.config import FLTaskConfig
    from cloud.fl.privacy import DPMean
    from cloud.fl.registry import make_strategy
    from fl_tasks.base import load_task

    config = FLTaskConfig.model_validate(yaml.safe_load(text))
    load_task(config.task, **config.task_kwargs)
    strategy = make_strategy(config.strategy, config.strategy_params)
    if config.privacy is not None:
        DPMean(strategy, config.privacy.mode)


@functools.cache
def help_of(path: tuple[str, ...]) -> str | None:
    """`edgefl PATH --help`, or None when PATH is not a command."""
    result = subprocess.run([sys.executable, "-m", "edgefl", *path, "--help"],
                            capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
    usage = "Usage: edgefl " + " ".join(path)
    if result.returncode != 0 or usage not in " ".join(result.stdout.split()):
        return None
    return result.stdout


@pytest.mark.parametrize(("page", "command"), COMMANDS, ids=[c for _, c in COMMANDS])
def test_every_command_exists_with_the_options_shown(page: str, command: str) -> None:
    words = shlex.split(command)[1:]
    path: tuple[str, ...] = ()
    for word in words:
        if word.startswith("-") or help_of((*path, word)) is None:
            break
        path = (*path, word)
    assert path, f"{page}: {command}: no such command"
    text = help_of(path)
    assert text is not None
    for option in {w.split("=")[0] for w in words if OPTION.fullmatch(w.split("=")[0])}:
        assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text), \
            f"{page}: `edgefl {' '.join(path)}` has no {option}"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_relative_links_point_to_files(page: Path) -> None:
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
        if "://" not in target:
            assert (page.parent / target).exists(), f"{page.name}: {target}"
