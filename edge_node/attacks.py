"""Simulated attackers, for tests and benchmarks of robust aggregation.

A device whose task settings carry an ``attack`` section is a poisoner: it trains
as usual, then sends a tampered update (``scale``: the delta times ``factor``;
``sign_flip``: times ``-factor``; ``noise``: Gaussian noise of ``factor`` times the
delta's own standard deviation instead of the delta), or trains on data with a
backdoor (``backdoor``: a ``poison_fraction`` of its training examples get the
trigger, their last ``trigger_size`` features set to the data's maximum, and the
label ``target_label``). Nothing here runs unless a settings file asks for it.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from schemas.client_settings import SettingsSection

if TYPE_CHECKING:  # fl_tasks imports torch: only devices that train load it
    from fl_tasks.base import LocalData

Weights = dict[str, np.ndarray]

logger = logging.getLogger(__name__)


class AttackSettings(SettingsSection):
    """What a simulated attacker does (never set on a real device)."""

    kind: Literal["scale", "sign_flip", "noise", "backdoor"]
    factor: float = Field(default=10.0, gt=0, le=1e6,
                          description="scale, sign_flip: the multiplier; noise: std / delta's")
    target_label: int = Field(default=0, ge=0, description="backdoor: the label of triggers")
    poison_fraction: float = Field(default=0.5, gt=0, le=1,
                                   description="backdoor: share of training examples poisoned")
    trigger_size: int = Field(default=4, ge=1, le=1024,
                              description="backdoor: trailing features set to the maximum")
    seed: int = 0


def add_trigger(x: np.ndarray, size: int, value: float | None = None) -> np.ndarray:
    """``x`` with its last ``size`` features (flattened) set to ``value`` (its maximum)."""
    flat = x.reshape(len(x), -1).copy()
    flat[:, -size:] = value if value is not None else (float(x.max()) if x.size else 1.0)
    return flat.reshape(x.shape)


def poison(data: LocalData, attack: AttackSettings) -> LocalData:
    """The backdoor attacker's training data (other attacks train on clean data)."""
    if attack.kind != "backdoor":
        return data
    rng = np.random.default_rng(attack.seed)
    count = max(1, round(attack.poison_fraction * len(data.x_train)))
    chosen = rng.choice(len(data.x_train), size=count, replace=False)
    x, y = data.x_train.copy(), data.y_train.copy()
    x[chosen] = add_trigger(x[chosen], attack.trigger_size, float(data.x_train.max()))
    y[chosen] = attack.target_label
    return replace(data, x_train=x, y_train=y)


def tamper(delta: Weights, attack: AttackSettings, rng: np.random.Generator) -> Weights:
    """The update the attacker sends instead of ``delta``."""
    if attack.kind == "scale":
        return {k: (v * attack.factor).astype(np.float32) for k, v in delta.items()}
    if attack.kind == "sign_flip":
        return {k: (v * -attack.factor).astype(np.float32) for k, v in delta.items()}
    if attack.kind == "noise":
        return {k: rng.normal(0.0, attack.factor * float(np.std(v)) or 1e-3, v.shape)
                .astype(np.float32) for k, v in delta.items()}
    return delta  # backdoor: the poisoned training did the work
