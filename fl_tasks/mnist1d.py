"""MNIST-1D (Greydanus 2020) with a small 1-D CNN.

Ten 1-D digit templates, padded, sheared, scaled, translated and noised into
length-40 signals.

The `mnist1d` package generates the data procedurally (no download, nothing
unpickled). Generation is slow (25,000 samples take about 14 s here), so the
arrays are generated once per set of arguments and kept as a ``.npz`` file in
``cache_dir`` (written atomically; loaded without pickle). ``num_samples``
(default 25,000) is split 80/20 into the training split, which is partitioned
across the devices (:mod:`fl_tasks.partition`), and the central test split
(5,000 samples: one point of accuracy is 50 of them, where the digits test set
has 360 samples in all).

Models:

- ``cnn``: three strided 1-D convolutions and a linear classifier (about 10k
  parameters);
- ``mlp``: 40-``hidden``-10 with ReLU.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Final, Literal, get_args

import numpy as np
import torch
from torch import nn

from fl_tasks.base import FLTask, LocalData, Partition, device_share, seeded
from fl_tasks.errors import TaskConfigError
from fl_tasks.partition import PartitionError, Scheme, partition_indices

logger = logging.getLogger(__name__)

ModelKind = Literal["cnn", "mlp"]
MODEL_KINDS: Final[tuple[str, ...]] = get_args(ModelKind)
LENGTH: Final = 40
N_CLASSES: Final = 10
DATA_SEED: Final = 42
"""Seed of the generator: the data (and its split) are the same whatever the task seed."""


def default_cache_dir() -> Path:
    """``$EDGEFL_CACHE_DIR``, else ``$XDG_CACHE_HOME/edgefl``, else ``~/.cache/edgefl``."""
    explicit = os.environ.get("EDGEFL_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "edgefl"


class Mnist1dCNN(nn.Module):
    """Conv1d 1->16->32->32 (kernel 5, strides 1/2/2), then linear to 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, 16, kernel_size=5, padding=2)
        self.conv2 = nn.Conv1d(16, 32, kernel_size=5, stride=2, padding=2)
        self.conv3 = nn.Conv1d(32, 32, kernel_size=5, stride=2, padding=2)
        self.fc = nn.Linear(32 * 10, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of a ``(batch, 40)`` input."""
        h = torch.relu(self.conv1(x.reshape(-1, 1, LENGTH)))
        h = torch.relu(self.conv2(h))
        h = torch.relu(self.conv3(h))
        return self.fc(h.flatten(1))  # type: ignore[no-any-return]


class Mnist1dMLP(nn.Module):
    """40-hidden-10 perceptron."""

    def __init__(self, hidden: int = 100) -> None:
        super().__init__()
        self.fc1 = nn.Linear(LENGTH, hidden)
        self.fc2 = nn.Linear(hidden, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of a ``(batch, 40)`` input."""
        return self.fc2(torch.relu(self.fc1(x)))  # type: ignore[no-any-return]


def _generate(num_samples: int) -> dict[str, np.ndarray]:
    """Run the package's generator, leaving the global RNGs it reseeds as they were."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise TaskConfigError("dependency", "fl_tasks.mnist1d needs the `mnist1d` package "
                              "(pip install 'edgefl[train]')") from exc
    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = DATA_SEED
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        made = make_dataset(args)
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    return {"x": np.asarray(made["x"], dtype=np.float32),
            "y": np.asarray(made["y"], dtype=np.int64),
            "x_test": np.asarray(made["x_test"], dtype=np.float32),
            "y_test": np.asarray(made["y_test"], dtype=np.int64)}


@functools.lru_cache(maxsize=4)
def load_arrays(num_samples: int, cache_dir: Path) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_test, y_test): from the cache, or generated and cached."""
    key = hashlib.sha256(json.dumps({"num_samples": num_samples, "seed": DATA_SEED,
                                     "generator": "mnist1d 0.0.2"}).encode()).hexdigest()[:16]
    path = cache_dir / f"mnist1d-{num_samples}-{key}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in ("x", "y", "x_test", "y_test")}
    else:
        logger.info("generating MNIST-1D (%d samples) into %s", num_samples, path)
        arrays = _generate(num_samples)
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".mnist1d-", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez(handle, x=arrays["x"], y=arrays["y"], x_test=arrays["x_test"],
                         y_test=arrays["y_test"])
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)  # another process generating the same file: either wins
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    out = tuple(arrays[name] for name in ("x", "y", "x_test", "y_test"))
    for array in out:
        array.setflags(write=False)  # shared by every caller
    return out


@functools.lru_cache(maxsize=16)
def _device_indices(num_samples: int, cache_dir: Path, count: int, scheme: Scheme,
                    alpha: float, shards_per_device: int, seed: int) -> tuple[np.ndarray, ...]:
    _, y_train, _, _ = load_arrays(num_samples, cache_dir)
    parts = partition_indices(y_train, count, scheme, alpha, shards_per_device, seed)
    for part in parts:
        part.setflags(write=False)
    return tuple(parts)


class Mnist1dTask(FLTask):
    """MNIST-1D (10 classes, length-40 signals) with a 1-D CNN or an MLP.

    Args:
        model: ``cnn`` or ``mlp``.
        seed: model initialization seed.
        num_samples: generated samples, 80 % training split and 20 % test split.
        eval_fraction: share of each device's data kept for local evaluation.
        hidden: width of the MLP's hidden layer.
        cache_dir: where the generated arrays are kept (default: see
            :func:`default_cache_dir`).

    Raises:
        TaskConfigError: unknown model, too few samples, a fraction outside ``(0, 1)``.
    """

    name = "mnist1d"

    def __init__(self, model: ModelKind = "cnn", seed: int = 0, num_samples: int = 25_000,
                 eval_fraction: float = 0.15, hidden: int = 100,
                 cache_dir: str | None = None) -> None:
        if model not in MODEL_KINDS:
            raise TaskConfigError("model", f"unknown model {model!r}, expected {MODEL_KINDS}")
        if num_samples < 100:
            raise TaskConfigError("num_samples", f"needs at least 100, got {num_samples}")
        if not 0.0 < eval_fraction < 1.0:
            raise TaskConfigError("fraction", f"eval_fraction must be in (0, 1), got "
                                  f"{eval_fraction}")
        if hidden < 1:
            raise TaskConfigError("hidden", f"hidden must be >= 1, got {hidden}")
        self.model: ModelKind = model
        self.seed = seed
        self.num_samples = num_samples
        self.eval_fraction = eval_fraction
        self.hidden = hidden
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()

    def __repr__(self) -> str:
        return (f"Mnist1dTask(model={self.model!r}, seed={self.seed}, "
                f"num_samples={self.num_samples})")

    def _arrays(self) -> tuple[np.ndarray, ...]:
        return load_arrays(self.num_samples, self.cache_dir)

    def build_model(self) -> nn.Module:
        """A new CNN or MLP, initialized from ``self.seed``."""
        with seeded(self.seed):
            return Mnist1dCNN() if self.model == "cnn" else Mnist1dMLP(self.hidden)

    def local_data(self, partition: Partition) -> LocalData:
        """Device ``partition.index``'s share of the training split, cut into train and eval.

        Raises:
            TaskConfigError: the split cannot be partitioned as asked, or the share has
                fewer than two examples.
        """
        x_all, y_all, _, _ = self._arrays()
        try:
            parts = _device_indices(self.num_samples, self.cache_dir, partition.count,
                                    partition.scheme, partition.alpha,
                                    partition.shards_per_device, partition.seed)
        except PartitionError as exc:
            raise TaskConfigError("partition", exc.detail) from exc
        return device_share(x_all, y_all, parts[partition.index], partition,
                            self.eval_fraction)

    def server_data(self) -> tuple[np.ndarray, np.ndarray]:
        """The training split (the union of what the devices hold; copies)."""
        x_train, y_train, _, _ = self._arrays()
        return x_train.copy(), y_train.copy()

    def central_data(self) -> tuple[np.ndarray, np.ndarray]:
        """The held-out test split (copies)."""
        _, _, x_test, y_test = self._arrays()
        return x_test.copy(), y_test.copy()
