"""The model optimizer: a task's weights into the formats edge runtimes load.

From a registered ``weights`` version (the FL result, or a checkpoint) the
optimizer builds the task's torch model, optionally distils a larger teacher
into it and prunes it (with a short fine-tune), then produces each recipe:

``onnx``
    ONNX fp32 with a dynamic batch axis, checked with ``onnx.checker``.
``onnx-int8-dynamic``
    onnxruntime dynamic quantization (int8 weights, activations quantized at run time).
``onnx-int8-static``
    onnxruntime static quantization (QDQ), calibrated through a
    ``CalibrationDataReader`` on the task's own training examples
    (:meth:`fl_tasks.base.FLTask.server_data`), never on random data.
``torchscript`` / ``torch-int8``
    TorchScript, plain and with torch's dynamic int8 quantization of the Linear
    layers. TorchScript and not ``torch.export``: ``torch.jit`` is deprecated in
    torch 2.13, but the devices' torch runtime loads a TorchScript archive with
    ``torch.jit.load`` and nothing else, while an ``ExportedProgram`` (.pt2) is an
    intermediate form for compilers that devices cannot run as it is.
``tflite`` / ``tflite-int8``
    LiteRT through ``litert-torch`` (the ``convert`` extra); full-integer int8
    calibrated on the same examples. Where the converter is not installed or fails
    on a model, the output is marked ``unsupported`` with the exact reason.

Every output is loaded in its runtime (the ``runner`` the caller provides: the
edge runtimes), evaluated on the task's test split, compared with the model it
was converted from, timed, and registered as a child version with its lineage
and figures; one that loses more than ``tolerance`` accuracy points against the
parent is registered as ``rejected``. int8 is not automatically faster, so the
latency is measured, never assumed.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch
from torch import nn

from cloud.models.formats import SUFFIXES, ArtifactFormat
from cloud.models.registry import ModelRegistry, ModelVersion, RegistryError, VersionState
from cloud.models.weights import task_weights
from fl_tasks.base import FLTask, LocalData, Weights, get_weights, load_task, set_weights
from schemas.base import ModelFormat
from schemas.fl import HyperParams

logger = logging.getLogger(__name__)

RECIPES: tuple[str, ...] = ("onnx", "onnx-int8-dynamic", "onnx-int8-static", "torchscript",
                            "torch-int8", "tflite", "tflite-int8")
FORMAT_OF = {"onnx": ArtifactFormat.ONNX, "onnx-int8-dynamic": ArtifactFormat.ONNX,
             "onnx-int8-static": ArtifactFormat.ONNX, "torchscript": ArtifactFormat.TORCHSCRIPT,
             "torch-int8": ArtifactFormat.TORCHSCRIPT, "tflite": ArtifactFormat.TFLITE,
             "tflite-int8": ArtifactFormat.TFLITE}
NEEDS_TRAINING_DATA = frozenset({"onnx-int8-static", "tflite-int8"})
SIGNATURE_FILE = "edgefl_signature.json"
"""The extra file the devices' TorchScript runtime reads the signature from."""
INPUT_NAME = "x"
OUTPUT_NAME = "logits"


class LoadedModel(Protocol):
    """A model loaded in its runtime (the edge runtimes satisfy this)."""

    def run(self, batch: np.ndarray) -> np.ndarray:
        """The first output for one batch."""

    def close(self) -> None:
        """Release it."""


Runner = Callable[[Path, ModelFormat], LoadedModel]
Progress = Callable[[str], None]


class OptimizeError(Exception):
    """The optimization cannot start; the message says why in one line."""


@dataclass(frozen=True, slots=True)
class Options:
    """What ``edgefl model optimize`` asks for."""

    recipes: Sequence[str] = RECIPES
    prune: float | None = None
    prune_structured: bool = False
    fine_tune_epochs: int = 3
    distill_from: tuple[str, str] | None = None
    distill_epochs: int = 20
    temperature: float = 4.0
    alpha: float = 0.7
    tolerance: float = 1.0
    """Accuracy points an output may lose against the parent before it is rejected."""
    calibration_samples: int = 256
    latency_runs: int = 200
    seed: int = 0


@dataclass(slots=True)
class Output:
    """One recipe's result."""

    recipe: str
    format: str
    state: str
    """``registered``, ``rejected``, ``unsupported`` or ``failed``."""
    version: str | None = None
    size_bytes: int | None = None
    compression: float | None = None
    """fp32 ONNX size / this size."""
    accuracy: float | None = None
    accuracy_delta_points: float | None = None
    """(accuracy - parent accuracy) x 100."""
    agreement: float | None = None
    """Share of test predictions equal to those of the torch model it came from."""
    max_abs_diff: float | None = None
    latency_ms_p50: float | None = None
    latency_ms_p99: float | None = None
    reason: str | None = None
    seconds: float = 0.0


@dataclass(slots=True)
class Report:
    """What one optimization produced (``optimization.json``)."""

    model: str
    parent_version: str
    parent_accuracy: float
    source: str
    """``weights``, or how the source was transformed (distilled, pruned)."""
    source_accuracy: float
    tolerance: float
    outputs: list[Output] = field(default_factory=list)
    sparsity: float | None = None

    def as_json(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


# -- the source model ----------------------------------------------------------------------


def _task_of(version: ModelVersion) -> FLTask:
    if version.task is None:
        raise OptimizeError(f"{version.model} {version.version} names no task: register the "
                            "weights with --task")
    kwargs = version.recipe.get("task_kwargs") or {}
    return load_task(version.task, **kwargs)


def _model(task: FLTask, weights: Weights) -> nn.Module:
    model = task.build_model()
    set_weights(model, weights)
    return model.eval()


def _logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        out: np.ndarray = model(torch.from_numpy(np.ascontiguousarray(x))).numpy()
    return out


def prune_and_fine_tune(task: FLTask, weights: Weights, amount: float, data: LocalData,
                        hp: HyperParams, *, epochs: int, structured: bool, seed: int,
                        ) -> tuple[Weights, float]:
    """Magnitude pruning of the Linear/Conv weights, then a fine-tune that keeps the zeros.

    Global unstructured L1 pruning (``torch.nn.utils.prune``), or structured L2 pruning
    of output channels per layer; each fine-tune epoch is followed by re-applying the
    masks, so pruned weights stay zero. Returns the weights and their sparsity.
    """
    from torch.nn.utils import prune

    model = _model(task, weights)
    layers = [(name, module) for name, module in model.named_modules()
              if isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d)]
    if not layers:
        raise OptimizeError("the model has no Linear or Conv layer to prune")
    if structured:
        for _, module in layers:
            prune.ln_structured(module, "weight", amount=amount, n=2, dim=0)  # type: ignore[no-untyped-call]
    else:
        prune.global_unstructured([(m, "weight") for _, m in layers],
                                  pruning_method=prune.L1Unstructured, amount=amount)
    masks = {f"{name}.weight": cast("torch.Tensor", module.weight_mask).detach().numpy()
             .astype(np.float32) for name, module in layers}
    for _, module in layers:
        prune.remove(module, "weight")  # type: ignore[no-untyped-call]
    pruned = get_weights(model)
    for epoch in range(epochs):
        pruned = task.train(pruned, data, hp.model_copy(update={"local_epochs": 1}),
                            seed=seed + epoch).weights
        for name, mask in masks.items():
            pruned[name] = pruned[name] * mask
    total = sum(m.size for m in masks.values())
    zeros = sum(int((pruned[name] == 0).sum()) for name in masks)
    return pruned, zeros / total


def distil(student_task: FLTask, teacher: nn.Module, data: LocalData, hp: HyperParams, *,
           epochs: int, temperature: float, alpha: float, seed: int) -> Weights:
    """Knowledge distillation (Hinton et al., 2015) of ``teacher`` into the task's model.

    The student learns the teacher's softened outputs (KL divergence at ``temperature``,
    scaled by its square, weight ``alpha``) and the labels (cross-entropy, 1 - alpha).
    """
    student = student_task.build_model()
    student.train()
    teacher.eval()
    x = torch.tensor(np.asarray(data.x_train), dtype=torch.float32)
    y = torch.tensor(np.asarray(data.y_train), dtype=torch.int64)
    with torch.inference_mode():
        soft_targets = torch.log_softmax(teacher(x) / temperature, dim=1)
    optimizer = torch.optim.SGD(student.parameters(), lr=hp.learning_rate,
                                momentum=hp.momentum, weight_decay=hp.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=generator).split(hp.batch_size):  # type: ignore[no-untyped-call]
            optimizer.zero_grad()
            logits = student(x[batch])
            soft = nn.functional.kl_div(torch.log_softmax(logits / temperature, dim=1),
                                        soft_targets[batch], reduction="batchmean",
                                        log_target=True) * temperature ** 2
            hard = nn.functional.cross_entropy(logits, y[batch])
            loss = alpha * soft + (1 - alpha) * hard
            if not math.isfinite(float(loss.detach())):
                raise OptimizeError("distillation diverged (non-finite loss)")
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
    return get_weights(student)


# -- the recipes -----------------------------------------------------------------------------


def export_onnx(model: nn.Module, example: np.ndarray, path: Path) -> None:
    """ONNX fp32 with a dynamic batch axis, checked with onnx.checker."""
    import onnx

    torch.onnx.export(model, (torch.from_numpy(example),), str(path),
                      input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                      dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                      dynamo=False)
    onnx.checker.check_model(str(path), full_check=True)


class _Calibration:
    """Feeds the task's training examples, one at a time, to onnxruntime's calibrator."""

    def __init__(self, x: np.ndarray) -> None:
        self._batches: Iterator[dict[str, np.ndarray]] = iter(
            [{INPUT_NAME: x[i:i + 1]} for i in range(len(x))])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def rewind(self) -> None:  # the calibrator may ask; one pass is all it needs here
        """Not used: one pass over the examples."""


def onnx_int8_dynamic(fp32: Path, path: Path) -> None:
    """Onnxruntime dynamic quantization: int8 weights."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(fp32, path, weight_type=QuantType.QInt8)


def onnx_int8_static(fp32: Path, path: Path, calibration: np.ndarray) -> None:
    """Onnxruntime static quantization (QDQ, per channel), calibrated on ``calibration``."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = path.with_name(path.stem + ".prepared.onnx")
    quant_pre_process(str(fp32), str(prepared))

    class Reader(_Calibration, CalibrationDataReader):  # type: ignore[misc]
        pass

    quantize_static(prepared, path, Reader(calibration), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    prepared.unlink(missing_ok=True)


def _signature(example: np.ndarray, output: np.ndarray) -> str:
    return json.dumps({
        "inputs": [{"name": INPUT_NAME, "shape": [None, *example.shape[1:]],
                    "dtype": str(example.dtype)}],
        "outputs": [{"name": OUTPUT_NAME, "shape": [None, *output.shape[1:]],
                     "dtype": str(output.dtype)}]})


def torchscript(model: nn.Module, example: np.ndarray, path: Path, *, int8: bool) -> None:
    """TorchScript (traced), optionally with dynamic int8 Linear layers, with its signature."""
    import warnings

    module = model
    if int8:
        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = quantize_dynamic(  # type: ignore[no-untyped-call]
                copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    inputs = torch.from_numpy(example)
    with torch.inference_mode():
        output = module(inputs).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(module, (inputs,), check_trace=False)  # type: ignore[no-untyped-call]
        torch.jit.save(traced, str(path), _extra_files={SIGNATURE_FILE: _signature(example,
                                                                                   output)})


class ConverterUnavailable(Exception):  # noqa: N818 - a state of the machine, not a bug
    """litert-torch is not installed in the converter's interpreter."""


def tflite(model: nn.Module, example: np.ndarray, path: Path, calibration: np.ndarray | None,
           *, python: str, timeout_s: float = 900.0) -> None:
    """LiteRT through litert-torch, in the converter's own interpreter (``python``).

    The model goes over as an ``ExportedProgram`` (``torch.export``; the converter's
    torch must be the same version); full-integer int8 when ``calibration`` is given.

    Raises:
        ConverterUnavailable: litert-torch is not installed there.
        RuntimeError: the conversion failed, with the converter's reason.
    """
    folder = path.parent
    program, sample = folder / f"{path.stem}.pt2", folder / f"{path.stem}.sample.npy"
    torch.export.save(torch.export.export(model.eval(), (torch.from_numpy(example),)),
                      str(program))
    np.save(sample, example)
    command = [python, str(Path(__file__).with_name("tflite_convert.py")), str(program),
               str(sample), str(path)]
    if calibration is not None:
        np.save(folder / f"{path.stem}.calibration.npy", calibration)
        command += ["--calibration", str(folder / f"{path.stem}.calibration.npy")]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                              check=False, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    except FileNotFoundError:
        raise ConverterUnavailable(f"no interpreter at {python}") from None
    reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
    if done.returncode == 3:
        raise ConverterUnavailable(f"{reason} in {python}")
    if done.returncode != 0 or not path.exists():
        raise RuntimeError(f"litert-torch: {reason}")


# -- measuring ---------------------------------------------------------------------------------


def _measure(loaded: LoadedModel, x: np.ndarray, runs: int) -> tuple[np.ndarray, float, float]:
    """Logits on ``x`` one example per call, as devices serve, and p50/p99 latency, ms.

    At least ``runs`` timed calls (cycling over ``x``) follow 20 warm-up calls.
    """
    for i in range(min(20, len(x))):
        loaded.run(x[i:i + 1])
    outputs: list[np.ndarray] = []
    times: list[float] = []
    for i in range(max(runs, len(x))):
        sample = x[i % len(x):i % len(x) + 1]
        start = time.perf_counter_ns()
        out = loaded.run(sample)
        times.append((time.perf_counter_ns() - start) / 1e6)
        if i < len(x):
            outputs.append(np.asarray(out))
    cuts = statistics.quantiles(times, n=100, method="inclusive")
    return np.concatenate(outputs), cuts[49], cuts[98]


@dataclass(frozen=True, slots=True)
class _Source:
    """The model every recipe starts from, and the data to check it on."""

    task: FLTask
    weights: Weights
    name: str
    sparsity: float | None
    parent_accuracy: float
    x_test: np.ndarray
    y_test: np.ndarray
    calibration: np.ndarray | None


class Optimizer:
    """Runs the recipes on one registered weights version."""

    def __init__(self, registry: ModelRegistry, runner: Runner, *,
                 converter_python: str | None = None) -> None:
        self.registry = registry
        self.runner = runner
        self.converter_python = converter_python or os.environ.get(
            "EDGEFL_CONVERTER_PYTHON") or sys.executable

    def optimize(self, model: str, version: str, options: Options, *,
                 progress: Progress | None = None) -> Report:
        """Produce, check, measure and register every recipe.

        Raises:
            OptimizeError: the source cannot be optimized (not weights, no task, no test
                data, unknown recipe, a teacher that does not exist).
            RegistryError: no such version.
        """
        say = progress or (lambda _message: None)
        unknown = [r for r in options.recipes if r not in RECIPES]
        if unknown:
            raise OptimizeError(f"unknown recipe {unknown[0]!r}: {', '.join(RECIPES)}")
        parent = self.registry.get(model, version)
        if parent.format is not ArtifactFormat.WEIGHTS:
            raise OptimizeError(f"{model} {version} is {parent.format.value}: the optimizer "
                                "starts from a task's weights (an FL result or a checkpoint)")
        source = self._source(parent, options, say)
        torch_model = _model(source.task, source.weights)
        reference = _logits(torch_model, source.x_test)
        report = Report(model=model, parent_version=version,
                        parent_accuracy=source.parent_accuracy, source=source.name,
                        tolerance=options.tolerance, sparsity=source.sparsity,
                        source_accuracy=float((reference.argmax(1) == source.y_test).mean()))
        with tempfile.TemporaryDirectory(prefix="edgefl-optimize-") as tmp:
            folder = Path(tmp)
            fp32 = folder / "model.onnx"
            for recipe in options.recipes:
                say(f"{recipe}: converting")
                started = time.monotonic()
                out = self._recipe(recipe, torch_model, source.x_test[:1], folder, fp32,
                                   source.calibration)
                if isinstance(out, Output):
                    report.outputs.append(out)
                    logger.info("%s: %s", recipe, out.reason)
                    continue
                result = self._check(recipe, out, source.x_test, source.y_test, reference,
                                     report, options.latency_runs)
                result.seconds = round(time.monotonic() - started, 3)
                if result.state != "failed":
                    if fp32.exists():
                        result.compression = round(fp32.stat().st_size / out.stat().st_size, 3)
                    self._register(parent, recipe, out, result, source.name, options,
                                   source.x_test[:1])
                report.outputs.append(result)
                say(f"{recipe}: {result.state}")
        return report

    def _source(self, parent: ModelVersion, options: Options, say: Progress) -> _Source:
        """The task, its data, and the weights after distillation and pruning."""
        task = _task_of(parent)
        central = task.central_data()
        if central is None:
            raise OptimizeError(f"{parent.task} has no test split to measure accuracy on")
        x_test = np.ascontiguousarray(central[0]).astype(np.float32)
        y_test = np.asarray(central[1])
        server = task.server_data()
        weights = task_weights(task, self.registry.read(parent)).weights
        parent_accuracy = task.evaluate(weights, x_test, y_test).accuracy
        hp = HyperParams.model_validate(parent.recipe.get("hyperparams") or {})
        name, sparsity = "weights", None
        train = None if server is None else LocalData(server[0], server[1], x_test[:1],
                                                      y_test[:1])
        if options.distill_from is not None:
            if train is None:
                raise OptimizeError(f"{parent.task} holds no training data to distil on")
            teacher_version = self.registry.get(*options.distill_from)
            if teacher_version.format is not ArtifactFormat.WEIGHTS:
                raise OptimizeError("the teacher must be a task's weights")
            say(f"distilling {options.distill_from[0]} {options.distill_from[1]}")
            teacher_task = _task_of(teacher_version)
            teacher = _model(teacher_task, task_weights(
                teacher_task, self.registry.read(teacher_version)).weights)
            weights = distil(task, teacher, train, hp, epochs=options.distill_epochs,
                             temperature=options.temperature, alpha=options.alpha,
                             seed=options.seed)
            name = "distilled"
        if options.prune is not None:
            if train is None:
                raise OptimizeError(f"{parent.task} holds no training data to fine-tune on")
            say(f"pruning {options.prune:.0%}, fine-tuning {options.fine_tune_epochs} epoch(s)")
            weights, sparsity = prune_and_fine_tune(
                task, weights, options.prune, train, hp, epochs=options.fine_tune_epochs,
                structured=options.prune_structured, seed=options.seed)
            pruned = f"pruned{round(options.prune * 100)}"
            name = pruned if name == "weights" else f"{name}+{pruned}"
        calibration = None
        if server is not None:
            rng = np.random.default_rng(options.seed)
            pick = rng.choice(len(server[1]), size=min(options.calibration_samples,
                                                       len(server[1])), replace=False)
            calibration = np.ascontiguousarray(server[0][np.sort(pick)]).astype(np.float32)
        return _Source(task, weights, name, sparsity, parent_accuracy, x_test, y_test,
                       calibration)

    def _recipe(self, recipe: str, model: nn.Module, example: np.ndarray, folder: Path,
                fp32: Path, calibration: np.ndarray | None) -> Path | Output:
        """The recipe's file, or an Output saying why there is none."""
        fmt = FORMAT_OF[recipe].value
        if recipe in NEEDS_TRAINING_DATA and calibration is None:
            return Output(recipe, fmt, "unsupported",
                          reason="the task holds no training data to calibrate on")
        path = folder / f"{recipe}{SUFFIXES[FORMAT_OF[recipe]]}"
        try:
            if recipe.startswith("onnx"):
                if not fp32.exists():
                    export_onnx(model, example, fp32)
                if recipe == "onnx":
                    return fp32
                if recipe == "onnx-int8-dynamic":
                    onnx_int8_dynamic(fp32, path)
                else:
                    assert calibration is not None  # noqa: S101 - checked above
                    onnx_int8_static(fp32, path, calibration)
            elif recipe in ("torchscript", "torch-int8"):
                torchscript(model, example, path, int8=recipe == "torch-int8")
            else:
                tflite(model, example, path, calibration if recipe == "tflite-int8" else None,
                       python=self.converter_python)
        except ConverterUnavailable as exc:
            return Output(recipe, fmt, "unsupported",
                          reason=f"litert-torch is not available ({exc}): install "
                                 "'edgefl[convert]' in a venv of its own and pass "
                                 "--converter-python")
        except Exception as exc:  # noqa: BLE001 - a converter failing on a model: say exactly why
            logger.debug("%s failed:\n%s", recipe, traceback.format_exc())
            return Output(recipe, fmt, "unsupported",
                          reason=f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}")
        return path

    def _check(self, recipe: str, path: Path, x: np.ndarray, y: np.ndarray,
               reference: np.ndarray, report: Report, runs: int) -> Output:
        """Load in the runtime, evaluate, compare, time."""
        fmt = FORMAT_OF[recipe]
        deployable = fmt.deployable
        assert deployable is not None  # noqa: S101 - every recipe makes a deployable file
        out = Output(recipe, fmt.value, "registered", size_bytes=path.stat().st_size)
        try:
            loaded = self.runner(path, deployable)
        except Exception as exc:  # noqa: BLE001 - the runtime refuses what the converter made
            out.state, out.reason = "failed", f"does not load: {exc}"
            return out
        try:
            logits, p50, p99 = _measure(loaded, x, runs)
        except Exception as exc:  # noqa: BLE001 - the runtime fails to run it: say why
            out.state, out.reason = "failed", f"does not run: {exc}"
            return out
        finally:
            loaded.close()
        predictions = logits.argmax(1)
        out.accuracy = float((predictions == y).mean())
        out.accuracy_delta_points = round((out.accuracy - report.parent_accuracy) * 100, 3)
        out.agreement = float((predictions == reference.argmax(1)).mean())
        out.max_abs_diff = float(np.max(np.abs(logits.astype(np.float64) - reference)))
        out.latency_ms_p50, out.latency_ms_p99 = round(p50, 4), round(p99, 4)
        if -out.accuracy_delta_points > report.tolerance:
            out.state = "rejected"
            out.reason = (f"loses {-out.accuracy_delta_points:.2f} accuracy points "
                          f"(tolerance {report.tolerance:g})")
        return out

    def _register(self, parent: ModelVersion, recipe: str, path: Path, result: Output,
                  source: str, options: Options, example: np.ndarray) -> None:
        prefix = "" if source == "weights" else source.replace("+", "-") + "-"
        version = f"{parent.version}-{prefix}{recipe}"
        figures = {k: v for k, v in (
            ("accuracy", result.accuracy), ("accuracy_delta_points", result.accuracy_delta_points),
            ("agreement", result.agreement), ("max_abs_diff", result.max_abs_diff),
            ("size_bytes", result.size_bytes), ("compression", result.compression),
            ("latency_ms_p50", result.latency_ms_p50), ("latency_ms_p99", result.latency_ms_p99),
        ) if v is not None}
        recipe_record = {"recipe": recipe, "source": source, "tolerance": options.tolerance,
                         "prune": options.prune, "prune_structured": options.prune_structured,
                         "distill_from": list(options.distill_from or []) or None,
                         "task_kwargs": parent.recipe.get("task_kwargs") or {}}
        state = VersionState.REJECTED if result.state == "rejected" else VersionState.DRAFT
        with contextlib.suppress(RegistryError):  # the recipe ran before: a distinct name
            self.registry.get(parent.model, version)
            version = f"{version}.{int(time.time())}"
        self.registry.register(
            parent.model, version, path.read_bytes(), FORMAT_OF[recipe], task=parent.task,
            parent_version=parent.version, fl_task=parent.fl_task, fl_round=parent.fl_round,
            recipe=recipe_record, input_shape=[-1, *example.shape[1:]], state=state,
            note=result.reason, metrics=figures, metrics_source="optimizer")
        result.version = version
