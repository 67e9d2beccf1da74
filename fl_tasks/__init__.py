"""Federated-learning tasks: the interface both the edge agent and the cloud load.

A task is named by an import path, ``"package.module:Class"``, and loaded with
:func:`load_task`. edgefl ships one, ``fl_tasks.digits:DigitsTask``.
"""

from fl_tasks.base import (
    EvalResult,
    FLTask,
    LocalData,
    Partition,
    TaskConfigError,
    TaskError,
    TaskLoadError,
    TrainingError,
    TrainResult,
    Weights,
    WeightsMismatchError,
    get_weights,
    load_task,
    seeded,
    set_weights,
)
from fl_tasks.partition import PartitionError, partition_indices

__all__ = [
    "EvalResult",
    "FLTask",
    "LocalData",
    "Partition",
    "PartitionError",
    "TaskConfigError",
    "TaskError",
    "TaskLoadError",
    "TrainResult",
    "TrainingError",
    "Weights",
    "WeightsMismatchError",
    "get_weights",
    "load_task",
    "partition_indices",
    "seeded",
    "set_weights",
]
