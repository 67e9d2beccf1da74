"""Inference runtimes on real models.

The ONNX and TorchScript models are exported here from a seeded torch MLP; the TFLite
model is the committed fixture built by ``tests/fixtures/make_tflite_fixture.py``, checked
against a numpy forward pass over its committed safetensors weights.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from edge_node.errors import InferenceError, ModelLoadError
from edge_node.inference import (
    SIGNATURE_FILE,
    InferenceRuntime,
    LiteRtRuntime,
    OnnxRuntime,
    TensorSpec,
    TorchScriptRuntime,
    available_runtimes,
    load_runtime,
    supported_formats,
)
from schemas.base import ModelFormat, RuntimeName

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "models"
TFLITE_MODEL = FIXTURES / "digits_mlp.tflite"
TFLITE_WEIGHTS = FIXTURES / "digits_mlp.safetensors"
RTOL = 1e-5
ATOL = 1e-6
MLP_INPUT = TensorSpec("input", (None, 64), "float32")

# torch 2.13 deprecates torch.jit.script/trace/save/load; TorchScript is still the format.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning"
)


def _mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
    ).eval()


class _Add(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class _Double(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def _export_onnx(module: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path,
                 input_names: list[str], *, dynamic_batch: bool) -> Path:
    dynamic_axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        # dynamo=False: the TorchScript-based exporter, deprecated but 100x faster here.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module, args, str(path), input_names=input_names,
                          output_names=["logits"], dynamic_axes=dynamic_axes, dynamo=False)
    return path


@dataclass(frozen=True)
class Models:
    """The eager model and the files exported from it."""

    eager: torch.nn.Sequential
    onnx: Path
    onnx_fixed_batch: Path
    torchscript: Path
    """``torch.jit.script``, saved without a signature file."""
    torchscript_signed: Path
    """``torch.jit.trace``, saved with a signature file."""


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    tmp = tmp_path_factory.mktemp("models")
    eager = _mlp()
    example = torch.zeros(1, 64)
    onnx = _export_onnx(eager, (example,), tmp / "mlp.onnx", ["input"], dynamic_batch=True)
    fixed = _export_onnx(eager, (example,), tmp / "mlp_b1.onnx", ["input"], dynamic_batch=False)
    scripted = tmp / "mlp_scripted.pt"
    torch.jit.save(torch.jit.script(eager), str(scripted))
    signed = tmp / "mlp_traced.pt"
    signature = {
        "inputs": [{"name": "input", "shape": [None, 64], "dtype": "float32"}],
        "outputs": [{"name": "logits", "shape": [None, 10], "dtype": "float32"}],
    }
    torch.jit.save(torch.jit.trace(eager, example), str(signed),  # type: ignore[no-untyped-call]
                   _extra_files={SIGNATURE_FILE: json.dumps(signature)})
    return Models(eager, onnx, fixed, scripted, signed)


@pytest.fixture(scope="module")
def loaded(models: Models) -> Iterator[dict[str, InferenceRuntime]]:
    runtimes: dict[str, InferenceRuntime] = {
        "onnx": load_runtime(models.onnx, ModelFormat.ONNX),
        "torchscript": load_runtime(models.torchscript, ModelFormat.TORCHSCRIPT),
        "torchscript_signed": load_runtime(models.torchscript_signed, ModelFormat.TORCHSCRIPT),
        "litert": load_runtime(TFLITE_MODEL, ModelFormat.TFLITE),
    }
    yield runtimes
    for runtime in runtimes.values():
        runtime.close()


def _batch(size: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((size, 64)).astype(np.float32)


def _eager(model: torch.nn.Module, batch: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        result: np.ndarray = model(torch.from_numpy(batch)).numpy()
    return result


@pytest.mark.parametrize("name", ["onnx", "torchscript", "torchscript_signed"])
@pytest.mark.parametrize("size", [1, 7])
def test_exported_models_match_the_eager_model(
    models: Models, loaded: dict[str, InferenceRuntime], name: str, size: int,
) -> None:
    batch = _batch(size)
    result = loaded[name].run(batch)
    assert result.shape == (size, 10)
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, _eager(models.eager, batch), rtol=RTOL, atol=ATOL)


def test_batch_sizes_can_alternate(models: Models, loaded: dict[str, InferenceRuntime]) -> None:
    for size in (7, 1, 3, 7):
        batch = _batch(size, seed=size)
        expected = _eager(models.eager, batch)
        for name in ("onnx", "torchscript"):
            np.testing.assert_allclose(loaded[name].run(batch), expected, rtol=RTOL, atol=ATOL)


def test_a_fixed_batch_onnx_model_runs_any_multiple_in_slices(models: Models) -> None:
    runtime = OnnxRuntime.load(models.onnx_fixed_batch)
    assert runtime.inputs == [TensorSpec("input", (1, 64), "float32")]
    for size in (1, 3):
        batch = _batch(size)
        np.testing.assert_allclose(runtime.run(batch), _eager(models.eager, batch),
                                   rtol=RTOL, atol=ATOL)
    with pytest.raises(InferenceError, match="fixed batch size 1"):
        runtime.run(np.zeros((0, 64), dtype=np.float32))


@pytest.mark.parametrize(
    ("name", "outputs"),
    [
        ("onnx", [TensorSpec("logits", (None, 10), "float32")]),
        ("torchscript", [TensorSpec("output", (None, 10), "float32")]),
        ("torchscript_signed", [TensorSpec("logits", (None, 10), "float32")]),
        ("litert", [TensorSpec("logits", (None, 10), "float32")]),
    ],
)
def test_signatures(
    loaded: dict[str, InferenceRuntime], name: str, outputs: list[TensorSpec],
) -> None:
    runtime = loaded[name]
    assert runtime.inputs == [MLP_INPUT]
    assert runtime.outputs == outputs


def test_runtime_classes_match_their_format(loaded: dict[str, InferenceRuntime]) -> None:
    assert isinstance(loaded["onnx"], OnnxRuntime)
    assert isinstance(loaded["torchscript"], TorchScriptRuntime)
    assert isinstance(loaded["litert"], LiteRtRuntime)
    assert loaded["litert"].runtime is RuntimeName.LITERT
    assert loaded["litert"].format is ModelFormat.TFLITE


@pytest.mark.parametrize("size", [1, 5])
def test_litert_matches_the_committed_weights(
    loaded: dict[str, InferenceRuntime], size: int,
) -> None:
    weights = load_file(str(TFLITE_WEIGHTS))
    assert {k: v.shape for k, v in weights.items()} == {
        "fc1.weight": (32, 64), "fc1.bias": (32,), "fc2.weight": (10, 32), "fc2.bias": (10,),
    }
    runtime = loaded["litert"]
    for _ in range(2):  # and back again after another batch size: the resize is cached
        batch = _batch(size, seed=size)
        hidden = np.maximum(batch @ weights["fc1.weight"].T + weights["fc1.bias"], 0.0)
        expected = hidden @ weights["fc2.weight"].T + weights["fc2.bias"]
        np.testing.assert_allclose(runtime.run(batch), expected, rtol=RTOL, atol=ATOL)
        runtime.run(_batch(size + 2))


BAD_BATCHES: dict[str, np.ndarray] = {
    "float64": np.zeros((2, 64), dtype=np.float64),
    "63 features": np.zeros((2, 63), dtype=np.float32),
    "rank 1": np.zeros(64, dtype=np.float32),
    "rank 3": np.zeros((2, 64, 1), dtype=np.float32),
    "int32": np.zeros((2, 64), dtype=np.int32),
    "big-endian float32": np.zeros((2, 64), dtype=">f4"),
}


@pytest.mark.parametrize("name", ["onnx", "torchscript", "torchscript_signed", "litert"])
@pytest.mark.parametrize("bad", list(BAD_BATCHES))
def test_bad_inputs_are_refused(loaded: dict[str, InferenceRuntime], name: str, bad: str) -> None:
    with pytest.raises(InferenceError, match=r"dtype|shape"):
        loaded[name].run(BAD_BATCHES[bad])


@pytest.mark.parametrize("name", ["onnx", "torchscript", "torchscript_signed", "litert"])
def test_a_list_is_refused_not_cast(loaded: dict[str, InferenceRuntime], name: str) -> None:
    with pytest.raises(InferenceError, match="numpy array"):
        loaded[name].run([[0.0] * 64])  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["onnx", "torchscript", "torchscript_signed", "litert"])
def test_an_empty_batch_gives_an_empty_output(
    loaded: dict[str, InferenceRuntime], name: str,
) -> None:
    result = loaded[name].run(np.zeros((0, 64), dtype=np.float32))
    assert result.shape == (0, 10)
    assert loaded[name].run(_batch(2)).shape == (2, 10)  # and it still runs afterwards


@pytest.mark.parametrize("name", ["onnx", "torchscript", "torchscript_signed", "litert"])
def test_read_only_and_strided_batches_are_taken(
    loaded: dict[str, InferenceRuntime], name: str,
) -> None:
    runtime = loaded[name]
    batch = _batch(4)
    expected = runtime.run(batch)
    read_only = np.frombuffer(batch.tobytes(), dtype=np.float32).reshape(4, 64)
    fortran = np.asfortranarray(batch)
    strided = np.repeat(batch[:, None, :], 2, axis=1)[:, 0, :]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns about a non-writable array
        for variant in (read_only, fortran, strided):
            np.testing.assert_allclose(runtime.run(variant), expected, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(runtime.run(batch[::-1]), expected[::-1],
                                   rtol=RTOL, atol=ATOL)


def test_a_torchscript_model_without_signature_is_not_checked(tmp_path: Path) -> None:
    path = tmp_path / "double.pt"
    torch.jit.save(torch.jit.script(_Double()), str(path))
    runtime = TorchScriptRuntime.load(path)
    assert not runtime.inputs[0].known
    assert runtime.inputs[0].name == "x"
    np.testing.assert_array_equal(runtime.run(np.arange(3, dtype=np.int64)), [0, 2, 4])
    with pytest.raises(InferenceError, match="no batch"):
        runtime.run(np.zeros((), dtype=np.float32))


def test_an_invalid_signature_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad_signature.pt"
    torch.jit.save(torch.jit.script(_Double()), str(path),
                   _extra_files={SIGNATURE_FILE: '{"inputs": [{"name": "x"}]}'})
    with pytest.raises(ModelLoadError, match=SIGNATURE_FILE):
        TorchScriptRuntime.load(path)


def test_multi_input_models_are_refused(tmp_path: Path) -> None:
    args = (torch.zeros(1, 4), torch.zeros(1, 4))
    onnx = _export_onnx(_Add(), args, tmp_path / "add.onnx", ["a", "b"], dynamic_batch=False)
    with pytest.raises(ModelLoadError, match="2 inputs"):
        OnnxRuntime.load(onnx)
    scripted = tmp_path / "add.pt"
    torch.jit.save(torch.jit.script(_Add()), str(scripted))
    with pytest.raises(ModelLoadError, match="2 inputs"):
        TorchScriptRuntime.load(scripted)


@pytest.mark.parametrize("fmt", list(ModelFormat))
@pytest.mark.parametrize(
    "content", [b"", b"this is not a model\x00\xff" * 64], ids=["empty", "garbage"],
)
def test_bad_files_raise_model_load_error(tmp_path: Path, fmt: ModelFormat, content: bytes) -> None:
    path = tmp_path / f"model.{fmt}"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError):
        load_runtime(path, fmt)


@pytest.mark.parametrize("fmt", list(ModelFormat))
def test_a_missing_file_raises_model_load_error(tmp_path: Path, fmt: ModelFormat) -> None:
    with pytest.raises(ModelLoadError):
        load_runtime(tmp_path / "absent", fmt)


def test_a_closed_runtime_refuses_to_run(models: Models) -> None:
    for runtime in (OnnxRuntime.load(models.onnx), TorchScriptRuntime.load(models.torchscript),
                    LiteRtRuntime.load(TFLITE_MODEL)):
        runtime.close()
        with pytest.raises(InferenceError, match="closed"):
            runtime.run(_batch(1))


def test_threads_must_be_positive(models: Models) -> None:
    with pytest.raises(ValueError, match="threads"):
        load_runtime(models.onnx, ModelFormat.ONNX, threads=0)


def test_every_runtime_is_available_here() -> None:
    runtimes = available_runtimes()
    assert set(runtimes) == set(RuntimeName)
    assert all(runtimes.values())
    assert set(supported_formats()) == set(ModelFormat)
