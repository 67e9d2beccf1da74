"""The demo's charts (`edgefl demo --plot DIR`), drawn with matplotlib from its summary.

Each chart is drawn on its own ``Figure`` with the Agg canvas (no pyplot, no global
state, no display needed) and written as PNG:

- ``fl_accuracy.png``: central test accuracy and training loss per round, with the
  centralized baseline trained on the union of the same data;
- ``fl_bytes.png``: bytes of model updates received per round;
- ``fleet_accuracy.png``: accuracy of the deployed model on each device (fairness);
- ``alert_telemetry.png``: the alerting device's error rate from its telemetry, with
  the rule's threshold and the moments the alert opened and cleared.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

DPI = 110


def write_plots(summary: Mapping[str, Any], folder: Path) -> list[Path]:
    """Write the charts for ``summary`` (the demo's JSON summary) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [
        _fl_accuracy(summary["fl"], folder / "fl_accuracy.png"),
        _fl_bytes(summary["fl"], folder / "fl_bytes.png"),
        _fleet_accuracy(summary["fleet"], folder / "fleet_accuracy.png"),
        _alert_telemetry(summary["alert"], folder / "alert_telemetry.png"),
    ]
    logger.info("demo charts written to %s", folder)
    return written


def _save(figure: Figure, path: Path) -> Path:
    FigureCanvasAgg(figure)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=DPI)
    return path


def _fl_accuracy(fl: Mapping[str, Any], path: Path) -> Path:
    rounds: Sequence[Mapping[str, Any]] = fl["rounds"]
    x = [r["round"] for r in rounds]
    figure = Figure(figsize=(6.4, 3.8))
    accuracy = figure.add_subplot()
    accuracy.plot(x, [r["central_accuracy"] for r in rounds], marker="o", color="tab:blue",
                  label="federated (central test set)")
    accuracy.axhline(fl["centralized_baseline_accuracy"], color="tab:green", linestyle="--",
                     label=f"centralized baseline ({fl['centralized_epochs']} epochs)")
    accuracy.set_xlabel("round")
    accuracy.set_ylabel("accuracy")
    accuracy.set_ylim(0.0, 1.0)
    losses = [(r["round"], r["train_loss"]) for r in rounds if r.get("train_loss") is not None]
    if losses:
        loss = accuracy.twinx()
        loss.plot([p[0] for p in losses], [p[1] for p in losses], color="tab:red",
                  marker=".", linestyle=":", label="training loss (devices)")
        loss.set_ylabel("loss")
        handles = accuracy.get_legend_handles_labels()
        extra = loss.get_legend_handles_labels()
        accuracy.legend(handles[0] + extra[0], handles[1] + extra[1], loc="center right")
    else:
        accuracy.legend(loc="lower right")
    accuracy.set_title("Federated training")
    return _save(figure, path)


def _fl_bytes(fl: Mapping[str, Any], path: Path) -> Path:
    rounds: Sequence[Mapping[str, Any]] = fl["rounds"]
    figure = Figure(figsize=(6.4, 3.2))
    axes = figure.add_subplot()
    axes.bar([r["round"] for r in rounds], [r["bytes_received"] / 1024 for r in rounds],
             color="tab:purple")
    axes.set_xlabel("round")
    axes.set_ylabel("update bytes received (KiB)")
    axes.set_title(f"Bytes on the wire: {fl['bytes_on_wire'] / 1024:.0f} KiB in all")
    return _save(figure, path)


def _fleet_accuracy(fleet: Sequence[Mapping[str, Any]], path: Path) -> Path:
    served = [d for d in fleet if d.get("accuracy") is not None]
    figure = Figure(figsize=(6.4, 3.2))
    axes = figure.add_subplot()
    axes.bar([d["device_id"] for d in served], [d["accuracy"] for d in served],
             color="tab:blue")
    axes.set_ylim(0.0, 1.0)
    axes.set_ylabel("accuracy on the device")
    axes.tick_params(axis="x", labelrotation=45)
    axes.set_title("The deployed model on each device (labelled feedback)")
    return _save(figure, path)


def _alert_telemetry(alert: Mapping[str, Any], path: Path) -> Path:
    series: Sequence[Mapping[str, float]] = alert.get("telemetry", [])
    start = series[0]["ts"] if series else 0.0
    figure = Figure(figsize=(6.4, 3.2))
    axes = figure.add_subplot()
    axes.plot([p["ts"] - start for p in series], [p["error_rate_percent"] for p in series],
              marker=".", color="tab:orange", label="error rate (telemetry)")
    if alert.get("threshold") is not None:
        axes.axhline(alert["threshold"], color="grey", linestyle="--", label="threshold")
    for key, colour, label in (("opened_at", "tab:red", "alert opened"),
                               ("cleared_at", "tab:green", "alert cleared")):
        if alert.get(key) is not None:
            axes.axvline(alert[key] - start, color=colour, label=label)
    axes.set_xlabel("seconds")
    axes.set_ylabel("failed inferences (%)")
    axes.set_title(f"{alert.get('rule', 'alert')} on {alert.get('device', '-')}")
    axes.legend(loc="center left", fontsize="small")
    return _save(figure, path)
