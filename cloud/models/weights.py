"""A task's weights file (safetensors) turned into the task's torch model.

Federated learning registers the global weights; a checkpoint from elsewhere is
the same kind of file. Tensors the file does not carry (the batch-norm
statistics FedBN keeps on the devices) take the task's initial values, and
:class:`LoadedWeights` says which, so that nothing is filled in silently.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors

from fl_tasks.base import FLTask, Weights, get_weights, set_weights
from fl_tasks.errors import TaskError


class WeightsError(ValueError):
    """The file does not fit the task's model."""


@dataclass(frozen=True, slots=True)
class LoadedWeights:
    """The task's full weights and what came from the task instead of the file."""

    weights: Weights
    from_task: list[str]


def task_weights(task: FLTask, data: bytes) -> LoadedWeights:
    """The task model's weights with the file's tensors laid over its initial ones.

    Raises:
        WeightsError: not safetensors, a name the model does not have, or a shape that
            differs from the model's.
    """
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError) as exc:
        raise WeightsError(f"not a safetensors file: {exc}") from None
    model = task.build_model()
    initial = get_weights(model)
    unknown = sorted(set(tensors) - set(initial))
    if unknown:
        raise WeightsError(f"the task's model has no tensor {unknown[0]!r} "
                           f"({len(unknown)} unknown)")
    if not tensors:
        raise WeightsError("the file holds no tensors")
    merged: Weights = {}
    for name, value in initial.items():
        if name in tensors:
            given = tensors[name]
            if given.shape != value.shape:
                raise WeightsError(f"{name}: shape {given.shape} != the model's {value.shape}")
            if not np.all(np.isfinite(given.astype(np.float64))):
                raise WeightsError(f"{name}: not finite")
            merged[name] = given.astype(np.float32)
        else:
            merged[name] = value
    try:
        set_weights(model, merged)
    except TaskError as exc:
        raise WeightsError(str(exc)) from None
    return LoadedWeights(merged, sorted(set(initial) - set(tensors)))
