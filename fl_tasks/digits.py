"""The digits task edgefl ships: scikit-learn's bundled 8x8 digits, MLP or small CNN.

1,797 images (no download), features scaled to [0, 1]. A fixed stratified split
(:data:`SPLIT_SEED`) sets ``test_fraction`` aside as the central test data; the
rest is partitioned across the devices (:mod:`fl_tasks.partition`), and each
device keeps ``eval_fraction`` of its share for local evaluation.

Two models, both under 10k parameters (an epoch over ~150 samples takes a few
milliseconds on a CPU):

- ``mlp``: 64-64-10 with ReLU.
- ``cnn``: conv-bn-relu-pool, conv-bn-relu, linear; its batch-norm modules are
  named ``bn1``/``bn2`` so that FedBN keeps them local.
"""

from __future__ import annotations

import functools
import logging
from typing import Final, Literal, get_args

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from fl_tasks.base import FLTask, LocalData, Partition, device_share, seeded
from fl_tasks.errors import TaskConfigError
from fl_tasks.partition import PartitionError, Scheme, partition_indices

logger = logging.getLogger(__name__)

ModelKind = Literal["mlp", "cnn"]
MODEL_KINDS: Final[tuple[str, ...]] = get_args(ModelKind)
SPLIT_SEED: Final = 0
"""Seed of the train/test split: the central test data is the same whatever the task seed."""
N_FEATURES: Final = 64
N_CLASSES: Final = 10


class DigitsMLP(nn.Module):
    """64-64-10 perceptron with a ReLU hidden layer."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(N_FEATURES, hidden)
        self.fc2 = nn.Linear(hidden, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of a ``(batch, 64)`` input."""
        return self.fc2(torch.relu(self.fc1(x)))  # type: ignore[no-any-return]


class DigitsCNN(nn.Module):
    """Two conv layers with batch norm on the 8x8 image, then a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32 * 4 * 4, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of a ``(batch, 64)`` input, read as ``(batch, 1, 8, 8)``."""
        h = x.reshape(-1, 1, 8, 8)
        h = nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(h))), 2)
        h = torch.relu(self.bn2(self.conv2(h)))
        return self.fc(h.flatten(1))  # type: ignore[no-any-return]


@functools.cache
def _digits_split(test_fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    digits = load_digits()
    x = (np.asarray(digits.data) / 16.0).astype(np.float32)
    y = np.asarray(digits.target).astype(np.int64)
    parts = train_test_split(x, y, test_size=test_fraction, random_state=SPLIT_SEED, stratify=y)
    x_train, x_test, y_train, y_test = (np.asarray(p) for p in parts)
    for array in (x_train, x_test, y_train, y_test):
        array.setflags(write=False)  # shared by every caller
    return x_train, y_train, x_test, y_test


@functools.lru_cache(maxsize=16)
def _device_indices(
    test_fraction: float, count: int, scheme: Scheme, alpha: float, shards_per_device: int,
    seed: int,
) -> tuple[np.ndarray, ...]:
    _, y_train, _, _ = _digits_split(test_fraction)
    parts = partition_indices(y_train, count, scheme, alpha, shards_per_device, seed)
    for part in parts:
        part.setflags(write=False)
    return tuple(parts)


class DigitsTask(FLTask):
    """Handwritten digits (10 classes) with an MLP or a small CNN.

    Args:
        model: ``mlp`` or ``cnn``.
        seed: model initialization seed.
        test_fraction: share of the data set aside as the central test split.
        eval_fraction: share of each device's data kept for local evaluation.
        hidden: width of the MLP's hidden layer (64: 4.8k parameters; 1500: 112k).

    Raises:
        TaskConfigError: unknown model, or a fraction outside ``(0, 1)``.
    """

    name = "digits"

    def __init__(self, model: ModelKind = "mlp", seed: int = 0, test_fraction: float = 0.2,
                 eval_fraction: float = 0.15, hidden: int = 64) -> None:
        if model not in MODEL_KINDS:
            raise TaskConfigError("model", f"unknown model {model!r}, expected {MODEL_KINDS}")
        for label, fraction in (("test_fraction", test_fraction),
                                ("eval_fraction", eval_fraction)):
            if not 0.0 < fraction < 1.0:
                raise TaskConfigError("fraction", f"{label} must be in (0, 1), got {fraction}")
        self.model: ModelKind = model
        self.seed = seed
        self.test_fraction = test_fraction
        self.eval_fraction = eval_fraction
        if hidden < 1:
            raise TaskConfigError("hidden", f"hidden must be >= 1, got {hidden}")
        self.hidden = hidden

    def __repr__(self) -> str:
        return (f"DigitsTask(model={self.model!r}, seed={self.seed}, "
                f"test_fraction={self.test_fraction}, eval_fraction={self.eval_fraction})")

    def build_model(self) -> nn.Module:
        """A new MLP or CNN, initialized from ``self.seed``."""
        with seeded(self.seed):
            return DigitsMLP(self.hidden) if self.model == "mlp" else DigitsCNN()

    def local_data(self, partition: Partition) -> LocalData:
        """Device ``partition.index``'s share of the training split, cut into train and eval.

        The eval cut is random from ``(partition.seed, partition.index)``; each side
        gets at least one example.

        Raises:
            TaskConfigError: the training split cannot be partitioned as asked, or the
                device's share has fewer than two examples.
        """
        x_all, y_all, _, _ = _digits_split(self.test_fraction)
        try:
            parts = _device_indices(self.test_fraction, partition.count, partition.scheme,
                                    partition.alpha, partition.shards_per_device, partition.seed)
        except PartitionError as exc:
            raise TaskConfigError("partition", exc.detail) from exc
        return device_share(x_all, y_all, parts[partition.index], partition,
                            self.eval_fraction)

    def server_data(self) -> tuple[np.ndarray, np.ndarray]:
        """The training split (the union of what the devices hold; copies)."""
        x_train, y_train, _, _ = _digits_split(self.test_fraction)
        return x_train.copy(), y_train.copy()

    def central_data(self) -> tuple[np.ndarray, np.ndarray]:
        """The held-out test split (copies)."""
        _, _, x_test, y_test = _digits_split(self.test_fraction)
        return x_test.copy(), y_test.copy()
