"""The model optimizer: every recipe from real trained weights, checked in the edge runtimes.

TFLite goes through litert-torch in its own venv (``make test`` builds
``.cache/venv-convert``); the other recipes run in this interpreter.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save as save_safetensors
from typer.testing import CliRunner

from cloud.models.formats import ArtifactFormat
from cloud.models.optimizer import RECIPES, OptimizeError, Optimizer, Options, Report
from cloud.models.registry import ModelRegistry, VersionState
from cloud.storage.sqlite_store import SqliteStore
from edge_node.inference import load_runtime
from edgefl.cli import build_app
from fl_tasks.base import LocalData, Weights, get_weights
from fl_tasks.digits import DigitsTask
from schemas.base import ModelFormat
from schemas.fl import HyperParams

REPO = Path(__file__).resolve().parents[1]
CONVERTER = REPO / ".cache" / "venv-convert" / "bin" / "python"
TASK = "fl_tasks.digits:DigitsTask"

pytestmark = pytest.mark.filterwarnings(
    r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning",
    "ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning",
    "ignore::DeprecationWarning")


class NoServerData(DigitsTask):
    """Digits, but the operator holds no training examples."""

    def server_data(self) -> None:  # type: ignore[override]
        return None


def trained(task: DigitsTask, epochs: int = 15) -> Weights:
    x, y = task.server_data()
    hp = HyperParams(local_epochs=epochs, learning_rate=0.1, momentum=0.5, batch_size=32)
    return task.train(get_weights(task.build_model()), LocalData(x, y, x[:1], y[:1]), hp,
                      seed=0).weights


def runner(path: Path, fmt: ModelFormat) -> Any:
    return load_runtime(path, fmt, threads=1)


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(SqliteStore(tmp_path / "cloud" / "edgefl.sqlite3"),
                         tmp_path / "cloud" / "artifacts")


def _register(registry: ModelRegistry, version: str, weights: Weights, **task_kwargs: Any,
              ) -> None:
    registry.register("digits", version, save_safetensors(weights), ArtifactFormat.WEIGHTS,
                      task=TASK, recipe={"task_kwargs": task_kwargs} if task_kwargs else {})


def _by_recipe(report: Report) -> dict[str, Any]:
    return {o.recipe: o for o in report.outputs}


def _check_every_format(registry: ModelRegistry, report: Report) -> None:
    outputs = _by_recipe(report)
    assert set(outputs) == set(RECIPES)
    fp32 = outputs["onnx"]
    for recipe, out in outputs.items():
        assert out.state == "registered", (recipe, out.reason)
        version = registry.get("digits", out.version)
        assert version.parent_version == report.parent_version
        assert version.recipe["recipe"] == recipe
        # It loads in its runtime and gives the parent's predictions within tolerance.
        loaded = runner(version.path, version.format.deployable)  # type: ignore[arg-type]
        loaded.close()
        assert out.accuracy_delta_points >= -1.0, (recipe, out.accuracy_delta_points)
        assert out.agreement >= (0.999 if "int8" not in recipe else 0.97), (recipe, out)
        figures = {m.name for m in registry.metrics("digits", out.version)}
        assert {"accuracy", "size_bytes", "latency_ms_p50", "compression"} <= figures
    for recipe in ("onnx-int8-dynamic", "onnx-int8-static", "tflite-int8"):
        assert outputs[recipe].size_bytes < fp32.size_bytes / 2, recipe
    for recipe in ("onnx", "torchscript", "tflite"):
        assert outputs[recipe].max_abs_diff < 1e-4, (recipe, outputs[recipe].max_abs_diff)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_every_recipe_of_the_digits_model_loads_and_agrees(
    registry: ModelRegistry, kind: str,
) -> None:
    assert CONVERTER.exists(), "make test builds .cache/venv-convert (litert-torch)"
    task = DigitsTask(model=kind)  # type: ignore[arg-type]
    _register(registry, "1.0.0", trained(task), model=kind)
    optimizer = Optimizer(registry, runner, converter_python=str(CONVERTER))
    report = optimizer.optimize("digits", "1.0.0", Options())
    print(json.dumps([{k: getattr(o, k) for k in ("recipe", "size_bytes", "compression",
                                                  "accuracy", "latency_ms_p50")}
                      for o in report.outputs]))
    assert report.parent_accuracy > 0.9
    _check_every_format(registry, report)
    _check_litert_integer_io(registry.get("digits", _by_recipe(report)["tflite-int8"].version)
                             .path, task)


def _check_litert_integer_io(path: Path, task: DigitsTask) -> None:
    """The full-integer LiteRT model takes int8 in and gives int8 out; the runtime quantizes
    the float32 batch and dequantizes the result exactly as the tensors' parameters say."""
    from edge_node.inference.litert_runtime import LiteRtRuntime, _interpreter_class

    interpreter = _interpreter_class()(model_path=str(path), num_threads=1)
    interpreter.allocate_tensors()
    given, produced = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    assert given["dtype"] == produced["dtype"] == np.int8
    (in_scale, in_zero), (out_scale, out_zero) = given["quantization"], produced["quantization"]
    assert in_scale > 0 and out_scale > 0
    examples = task.server_data()[0][:16].astype(np.float32)
    runtime = LiteRtRuntime.load(path)
    try:
        assert runtime.inputs[0].dtype == "float32"  # what a caller hands it
        for example in examples:  # one at a time: the model's own batch of one
            x = example.reshape(tuple(given["shape"]))
            quantized = np.clip(np.rint(x / in_scale) + in_zero, -128, 127).astype(np.int8)
            interpreter.set_tensor(given["index"], quantized)
            interpreter.invoke()
            raw = interpreter.get_tensor(produced["index"]).astype(np.float32)
            expected = ((raw - out_zero) * np.float32(out_scale)).astype(np.float32)
            np.testing.assert_array_equal(runtime.run(x), expected)
    finally:
        runtime.close()


def test_int8_onnx_is_at_most_a_third_of_fp32_on_a_model_with_real_weight_mass(
    registry: ModelRegistry,
) -> None:
    # The default digits MLP has 4.8k parameters: the graph's fixed overhead (names,
    # scales, zero points: about 2.5 kB) keeps its int8 file at 0.37 of fp32. With 112k
    # parameters the weights dominate, as in any model worth quantizing.
    task = DigitsTask(hidden=1500)
    _register(registry, "2.0.0", trained(task, epochs=8), hidden=1500)
    report = Optimizer(registry, runner).optimize(
        "digits", "2.0.0", Options(recipes=("onnx", "onnx-int8-dynamic", "onnx-int8-static")))
    outputs = _by_recipe(report)
    for recipe in ("onnx-int8-dynamic", "onnx-int8-static"):
        out = outputs[recipe]
        assert out.state == "registered", out.reason
        assert out.size_bytes <= outputs["onnx"].size_bytes / 3, (recipe, out.compression)
        assert out.accuracy_delta_points >= -1.0, out.accuracy_delta_points


def test_calibration_needs_the_tasks_own_data(registry: ModelRegistry) -> None:
    weights = trained(DigitsTask())
    registry.register("digits", "1.0.0", save_safetensors(weights), ArtifactFormat.WEIGHTS,
                      task="tests.test_model_optimizer:NoServerData")
    report = Optimizer(registry, runner).optimize(
        "digits", "1.0.0", Options(recipes=("onnx", "onnx-int8-static")))
    outputs = _by_recipe(report)
    assert outputs["onnx"].state == "registered"
    assert outputs["onnx-int8-static"].state == "unsupported"
    assert "no training data to calibrate on" in outputs["onnx-int8-static"].reason
    with pytest.raises(OptimizeError, match="no training data to fine-tune on"):
        Optimizer(registry, runner).optimize("digits", "1.0.0", Options(prune=0.5))


def test_without_the_converter_tflite_is_unsupported_with_the_reason(
    registry: ModelRegistry,
) -> None:
    _register(registry, "1.0.0", trained(DigitsTask()))
    report = Optimizer(registry, runner, converter_python=sys.executable).optimize(
        "digits", "1.0.0", Options(recipes=("tflite",)))
    [out] = report.outputs
    assert out.state == "unsupported" and out.version is None
    assert out.reason is not None
    assert "litert-torch is not available" in out.reason and "litert_torch" in out.reason
    assert [v.version for v in registry.versions("digits")] == ["1.0.0"]


def test_pruning_keeps_the_zeros_through_the_fine_tune(registry: ModelRegistry) -> None:
    _register(registry, "1.0.0", trained(DigitsTask()))
    report = Optimizer(registry, runner).optimize(
        "digits", "1.0.0", Options(recipes=("onnx",), prune=0.5, fine_tune_epochs=3))
    [out] = report.outputs
    assert report.sparsity is not None and report.sparsity >= 0.5
    assert out.version == "1.0.0-pruned50-onnx" and out.state == "registered"
    assert out.accuracy_delta_points is not None and out.accuracy_delta_points >= -1.0
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(registry.get("digits", out.version).path))
    matrices = [numpy_helper.to_array(t) for t in model.graph.initializer if t.dims
                and len(t.dims) == 2]
    zeros = sum(int((m == 0).sum()) for m in matrices) / sum(m.size for m in matrices)
    assert zeros >= 0.5, zeros


def test_an_output_that_loses_too_much_is_registered_as_rejected(
    registry: ModelRegistry,
) -> None:
    _register(registry, "1.0.0", trained(DigitsTask()))
    report = Optimizer(registry, runner).optimize(
        "digits", "1.0.0", Options(recipes=("onnx",), prune=0.97, fine_tune_epochs=0,
                                   tolerance=1.0))
    [out] = report.outputs
    assert out.reason is not None and out.version is not None
    assert out.state == "rejected" and "accuracy points (tolerance 1)" in out.reason
    version = registry.get("digits", out.version)
    assert version.state is VersionState.REJECTED and version.note == out.reason


def test_distillation_teaches_a_small_student_from_a_registered_teacher(
    registry: ModelRegistry,
) -> None:
    teacher = DigitsTask(model="cnn")
    _register(registry, "9.0.0", trained(teacher), model="cnn")
    student = DigitsTask(hidden=16)
    registry.register("digits", "1.0.0", save_safetensors(get_weights(student.build_model())),
                      ArtifactFormat.WEIGHTS, task=TASK, recipe={
                          "task_kwargs": {"hidden": 16},
                          "hyperparams": {"learning_rate": 0.1, "momentum": 0.5,
                                          "batch_size": 32}})
    report = Optimizer(registry, runner).optimize(
        "digits", "1.0.0", Options(recipes=("onnx",), distill_from=("digits", "9.0.0"),
                                   distill_epochs=30))
    [out] = report.outputs
    assert report.source == "distilled" and out.version == "1.0.0-distilled-onnx"
    assert out.accuracy is not None and out.accuracy > 0.85, out.accuracy
    assert registry.get("digits", out.version).recipe["distill_from"] == ["digits", "9.0.0"]


def test_optimize_and_benchmark_from_the_command_line(tmp_path: Path,
                                                      registry: ModelRegistry) -> None:
    _register(registry, "1.0.0", trained(DigitsTask()))
    folder = ["--data-dir", str(tmp_path / "cloud")]

    def model(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(build_app("model"), ["model", *args, *folder],
                                    env={"COLUMNS": "240"})
        return result.exit_code, result.output

    code, out = model("optimize", "digits", "1.0.0", "--formats", "onnx,onnx-int8-dynamic")
    assert code == 0, out
    assert "1.0.0-onnx-int8-dynamic" in out and "registered" in out
    saved = json.loads((tmp_path / "cloud" / "optimizations" / "digits-1.0.0" /
                        "optimization.json").read_text())
    assert [o["recipe"] for o in saved["outputs"]] == ["onnx", "onnx-int8-dynamic"]
    code, out = model("optimize", "digits", "1.0.0", "--formats", "onnx,pickle")
    assert code == 2 and "unknown recipe pickle" in out, out
    code, out = model("optimize", "digits", "1.0.0-onnx")
    assert code == 2 and "starts from a task's weights" in out, out
    code, out = model("benchmark", "digits", "1.0.0-onnx", "--runs", "200", "--warmup", "10",
                      "--json")
    assert code == 0, out
    figures = json.loads(out)
    assert figures["runs"] == 200 and figures["runtime"] == "onnxruntime"
    assert 0 < figures["latency_ms_p50"] <= figures["latency_ms_p95"] <= figures["latency_ms_p99"]
    assert figures["throughput_per_s"] > 0 and figures["peak_rss_mb"] > 0
    stored = {m.name: m for m in registry.metrics("digits", "1.0.0-onnx")
              if m.source == "benchmark"}
    assert stored["latency_ms_p50"].value == pytest.approx(figures["latency_ms_p50"])
    assert stored["latency_ms_p50"].device_class == figures["device_class"]
    path = registry.get("digits", "1.0.0-onnx-int8-dynamic").path
    code, out = model("benchmark", str(path), "--runs", "50")
    assert code == 0 and "p99" in out, out
    code, out = model("benchmark", "digits", "1.0.0")
    assert code == 2 and "benchmark a deployable format" in out, out
    assert np.isfinite(figures["latency_ms_mean"])
