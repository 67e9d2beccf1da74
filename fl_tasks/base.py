"""The FL task interface shared by the edge agent and the cloud.

A task is user code named by an import path, ``"package.module:Class"``, that
both sides load with :func:`load_task`. It builds the model, gives each
(simulated) device its local data, trains locally and evaluates::

    task = load_task("fl_tasks.digits:DigitsTask", model="cnn")
    weights = get_weights(task.build_model())           # round-0 global weights
    data = task.local_data(Partition(index=3, count=20))
    result = task.train(weights, data, hp, seed=42)     # hp: schemas.fl.HyperParams

Weights travel as :data:`Weights`: float32 numpy arrays in the model's
``state_dict`` order, buffers included (batch-norm running statistics; the int64
``num_batches_tracked`` is carried as float32 and rounded back on load).

:meth:`FLTask.train` and :meth:`FLTask.evaluate` implement supervised
classification (cross-entropy, SGD); a task overrides :meth:`FLTask.criterion`
for another loss, or the methods themselves. Training depends only on its
inputs and ``seed``: batches are shuffled with a dedicated ``torch.Generator``,
and no global random or threading state is changed.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Final

import numpy as np
import torch
from torch import nn

from fl_tasks.errors import (
    TaskConfigError,
    TaskLoadError,
    TrainingError,
    WeightsMismatchError,
)
from fl_tasks.partition import PartitionError, Scheme, check_partition_config
from schemas.fl import HyperParams

logger = logging.getLogger(__name__)

Weights = dict[str, np.ndarray]
"""Named float32 arrays in ``state_dict`` order, buffers included."""

EVAL_BATCH: Final = 1024
_TASK_PATH: Final = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


@dataclass(frozen=True)
class Partition:
    """Which share of a task's data a device holds: device ``index`` of ``count``.

    Attributes:
        index: this device's position, ``0 <= index < count``.
        count: number of devices the data is split across.
        scheme: ``iid``, ``dirichlet`` (label skew) or ``shards`` (few labels each).
        alpha: Dirichlet concentration; small is skewed, large is near IID.
        shards_per_device: label shards per device under ``shards``.
        seed: partition seed; all devices of a fleet must use the same one.
    """

    index: int
    count: int
    scheme: Scheme = "dirichlet"
    alpha: float = 0.5
    shards_per_device: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        try:
            check_partition_config(self.count, self.scheme, self.alpha, self.shards_per_device)
        except PartitionError as exc:
            raise TaskConfigError("partition", exc.detail) from exc
        if not 0 <= self.index < self.count:
            raise TaskConfigError("partition", f"index {self.index} not in [0, {self.count})")


def _check_pair(x: np.ndarray, y: np.ndarray, what: str) -> None:
    if len(x) != len(y):
        raise TaskConfigError("data", f"{what}: {len(x)} inputs but {len(y)} labels")


@dataclass(frozen=True, eq=False)
class LocalData:
    """A device's local data: a training split and an evaluation split."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_eval: np.ndarray
    y_eval: np.ndarray

    def __post_init__(self) -> None:
        _check_pair(self.x_train, self.y_train, "train")
        _check_pair(self.x_eval, self.y_eval, "eval")


def device_share(x_all: np.ndarray, y_all: np.ndarray, mine: np.ndarray, partition: Partition,
                 eval_fraction: float) -> LocalData:
    """Device ``partition.index``'s examples (indexes ``mine``), cut into train and eval.

    The eval cut is random from ``(partition.seed, partition.index)``; each side gets at
    least one example.

    Raises:
        TaskConfigError: the share has fewer than two examples.
    """
    if len(mine) < 2:
        raise TaskConfigError("partition", f"device {partition.index} has {len(mine)} "
                              "example(s), needs 2 for a train/eval split")
    rng = np.random.default_rng([partition.seed, partition.index])
    shuffled = rng.permutation(mine)
    n_eval = min(len(mine) - 1, max(1, round(len(mine) * eval_fraction)))
    eval_idx, train_idx = shuffled[:n_eval], shuffled[n_eval:]
    return LocalData(x_train=x_all[train_idx], y_train=y_all[train_idx],
                     x_eval=x_all[eval_idx], y_eval=y_all[eval_idx])


@dataclass(frozen=True, eq=False)
class TrainResult:
    """Outcome of local training.

    Attributes:
        weights: trained weights, every ``state_dict`` entry.
        num_examples: training examples (one epoch's worth).
        loss: mean objective over the last epoch, the FedProx term included.
        accuracy: training accuracy over the last epoch (model in train mode).
        seconds: wall-clock training time.
        cpu_seconds: processor time of the training thread: what the training costs
            whatever else shares the machine (a simulated fleet's devices do).
    """

    weights: Weights
    num_examples: int
    loss: float
    accuracy: float
    seconds: float
    cpu_seconds: float = 0.0


@dataclass(frozen=True)
class EvalResult:
    """Outcome of an evaluation: mean loss and accuracy over ``num_examples``."""

    num_examples: int
    loss: float
    accuracy: float


def get_weights(model: nn.Module) -> Weights:
    """Copy a model's ``state_dict`` (parameters and buffers) to float32 arrays, in order."""
    return {
        name: tensor.detach().cpu().numpy().astype(np.float32, copy=True)
        for name, tensor in model.state_dict().items()
    }


def set_weights(model: nn.Module, weights: Weights) -> None:
    """Load :data:`Weights` into a model, strictly.

    Floating-point entries take the model's dtype; integer entries (such as
    ``num_batches_tracked``) are rounded.

    Raises:
        WeightsMismatchError: names differ from the model's ``state_dict``, a shape
            differs, or an integer entry is not finite.
    """
    state = model.state_dict()
    missing = [name for name in state if name not in weights]
    unexpected = [name for name in weights if name not in state]
    if missing or unexpected:
        raise WeightsMismatchError(
            "names", f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            f" ({len(missing)} missing, {len(unexpected)} unexpected)"
        )
    loaded: dict[str, torch.Tensor] = {}
    for name, target in state.items():
        array = np.asarray(weights[name])
        if array.shape != tuple(target.shape):
            raise WeightsMismatchError(
                "shape", f"{name}: got {array.shape}, model has {tuple(target.shape)}"
            )
        if not np.issubdtype(array.dtype, np.number):
            raise WeightsMismatchError("dtype", f"{name}: {array.dtype} is not numeric")
        if not (target.is_floating_point() or target.is_complex()):
            if not np.isfinite(array).all():
                raise WeightsMismatchError("value", f"{name}: non-finite value for an integer")
            array = np.rint(array)
        # np.array: a writable ndarray copy, 0-d included (np.rint gives a scalar for those)
        loaded[name] = torch.from_numpy(np.array(array, copy=True)).to(target.dtype)
    model.load_state_dict(loaded, strict=True)


_GLOBAL_GENERATOR = threading.RLock()
"""Held while a block uses torch's global CPU generator (see :func:`seeded`)."""


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's CPU generator seeded, restoring the global state after.

    Use it to initialize a model deterministically without disturbing other users
    of the global generator::

        with seeded(self.seed):
            model = MyNet()

    One block at a time in a process: the generator is global, and agents of a
    simulated fleet train on threads of one process. Unserialized, two blocks
    interleaved their seeds (models came out with another seed's weights), and a
    garbage collection inside ``get_rng_state`` could deadlock the process: one thread
    held the generator's mutex while waiting for the GIL, another held the GIL while
    waiting for the mutex.
    """
    with _GLOBAL_GENERATOR, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class FLTask(ABC):
    """A federated-learning task: model, per-device data, local training, evaluation.

    Subclasses set :attr:`name`, keep a ``seed`` attribute and implement
    :meth:`build_model`, :meth:`local_data` and :meth:`central_data`.

    Attributes:
        name: short task name, for logs and reports.
        seed: model initialization seed.
    """

    name: ClassVar[str]
    seed: int = 0

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A new model, initialized deterministically from ``self.seed`` (see :func:`seeded`)."""

    @abstractmethod
    def local_data(self, partition: Partition) -> LocalData:
        """The training and evaluation data of one device."""

    @abstractmethod
    def central_data(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The held-out test split for central evaluation, or None if the task has none."""

    def server_data(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Training examples the operator holds, or None when it holds none.

        The model optimizer calibrates static quantization, fine-tunes pruned models and
        distils on these (never on the test split, never on random data).
        """
        return None

    def criterion(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss of a batch; cross-entropy over class logits by default."""
        return nn.functional.cross_entropy(output, target)

    def train(
        self, weights: Weights, data: LocalData, hp: HyperParams, *, seed: int,
        correction: Mapping[str, np.ndarray] | None = None,
    ) -> TrainResult:
        """Train locally from ``weights`` on ``data.x_train``/``data.y_train``.

        ``hp.local_epochs`` epochs of mini-batch SGD (``learning_rate``, ``momentum``,
        ``weight_decay``), batches shuffled from ``seed``. When ``hp.proximal_mu`` > 0
        the FedProx term ``mu/2 * ||w - w_global||^2`` over the trainable parameters is
        added to the loss, ``w_global`` being ``weights``. ``correction`` (SCAFFOLD's
        ``c - c_i``, by parameter name) is added to every step's gradient of the
        parameters it names.

        Raises:
            WeightsMismatchError: ``weights`` do not fit the model.
            TrainingError: no training data, or the loss became non-finite.
        """
        n = len(data.y_train)
        if n == 0:
            raise TrainingError("no_data", "no training examples")
        started = time.perf_counter()
        started_cpu = time.thread_time()
        model = self.build_model()
        set_weights(model, weights)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        anchors = [p.detach().clone() for p in params] if hp.proximal_mu > 0 else []
        corrections = [(p, torch.as_tensor(np.asarray(correction[name], dtype=np.float32)))
                       for name, p in model.named_parameters()
                       if p.requires_grad and correction and name in correction]
        optimizer = torch.optim.SGD(params, lr=hp.learning_rate, momentum=hp.momentum,
                                    weight_decay=hp.weight_decay)
        x = torch.tensor(np.asarray(data.x_train), dtype=torch.float32)  # copies: arrays may
        y = torch.tensor(np.asarray(data.y_train), dtype=torch.int64)    # be read-only
        generator = torch.Generator().manual_seed(seed)
        loss_sum, correct = 0.0, 0
        for _ in range(hp.local_epochs):
            loss_sum, correct = 0.0, 0
            order = torch.randperm(n, generator=generator)
            for batch in order.split(hp.batch_size):  # type: ignore[no-untyped-call]
                optimizer.zero_grad()
                output: torch.Tensor = model(x[batch])
                loss = self.criterion(output, y[batch])
                if anchors:
                    loss = loss + hp.proximal_mu / 2 * _squared_distance(params, anchors)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise TrainingError("diverged", f"non-finite loss {value}")
                loss.backward()  # type: ignore[no-untyped-call]
                for param, term in corrections:
                    if param.grad is not None:
                        param.grad.add_(term.reshape(param.shape))
                optimizer.step()
                loss_sum += value * len(batch)
                correct += _correct(output, y[batch])
        result = TrainResult(
            weights=get_weights(model), num_examples=n, loss=loss_sum / n,
            accuracy=correct / n, seconds=time.perf_counter() - started,
            cpu_seconds=time.thread_time() - started_cpu,
        )
        logger.debug("%s: trained %d examples x %d epochs in %.3fs: loss %.4f, acc %.3f",
                     self.name, n, hp.local_epochs, result.seconds, result.loss,
                     result.accuracy)
        return result

    def evaluate(self, weights: Weights, x: np.ndarray, y: np.ndarray) -> EvalResult:
        """Mean loss and accuracy of ``weights`` on ``(x, y)``, model in eval mode.

        Raises:
            WeightsMismatchError: ``weights`` do not fit the model.
            TaskConfigError: ``x`` and ``y`` differ in length, or are empty.
        """
        _check_pair(x, y, "evaluate")
        n = len(y)
        if n == 0:
            raise TaskConfigError("data", "nothing to evaluate")
        model = self.build_model()
        set_weights(model, weights)
        model.eval()
        xs = torch.tensor(np.asarray(x), dtype=torch.float32)
        ys = torch.tensor(np.asarray(y), dtype=torch.int64)
        loss_sum, correct = 0.0, 0
        with torch.inference_mode():
            for start in range(0, n, EVAL_BATCH):
                xb, yb = xs[start:start + EVAL_BATCH], ys[start:start + EVAL_BATCH]
                output: torch.Tensor = model(xb)
                loss_sum += float(self.criterion(output, yb)) * len(yb)
                correct += _correct(output, yb)
        return EvalResult(num_examples=n, loss=loss_sum / n, accuracy=correct / n)


def momentum_steps(steps: int, momentum: float) -> float:
    """How far ``steps`` SGD steps move, in units of ``learning_rate * gradient``.

    With heavy-ball momentum ``rho`` (torch's SGD, no dampening) a constant gradient
    moves the weights ``sum_{k=1..steps} (1 - rho^k) / (1 - rho)`` times the plain step,
    not ``steps`` times: FedNova's ``||a_i||_1`` (Wang et al. 2020, eq. 7), and what
    turns a device's displacement into its mean gradient (SCAFFOLD's control variate).
    """
    if momentum <= 0:
        return float(steps)
    rho = momentum
    return (steps - rho * (1 - rho ** steps) / (1 - rho)) / (1 - rho)


def _squared_distance(params: list[nn.Parameter], anchors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([(p - a).pow(2).sum() for p, a in zip(params, anchors, strict=True)]).sum()


def _correct(output: torch.Tensor, target: torch.Tensor) -> int:
    return int((output.detach().argmax(dim=1) == target).sum())


def load_task(path: str, **kwargs: object) -> FLTask:
    """Import and instantiate the task named by ``"package.module:Class"``.

    The path comes from the operator's configuration (never from a message): it
    runs the module's import-time code.

    Args:
        path: import path of an :class:`FLTask` subclass.
        **kwargs: constructor arguments.

    Raises:
        TaskLoadError: malformed path (``bad_path``), module not importable
            (``import_failed``), no such attribute (``not_found``), not a concrete
            FLTask subclass (``not_a_task``), constructor refused the arguments
            (``bad_arguments``).
    """
    if not _TASK_PATH.match(path):
        raise TaskLoadError("bad_path", f"{path!r} is not of the form 'package.module:Class'")
    module_name, _, class_name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TaskLoadError("import_failed", f"{module_name}: {exc}") from exc
    cls = getattr(module, class_name, None)
    if cls is None:
        raise TaskLoadError("not_found", f"module {module_name} has no {class_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, FLTask)) or inspect.isabstract(cls):
        raise TaskLoadError("not_a_task", f"{path} is not a concrete FLTask subclass")
    try:
        task = cls(**kwargs)
    except TypeError as exc:
        raise TaskLoadError("bad_arguments", f"{path}({kwargs}): {exc}") from exc
    logger.info("loaded FL task %s from %s", getattr(task, "name", class_name), path)
    return task
