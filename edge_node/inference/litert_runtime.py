"""TFLite models on LiteRT (``ai-edge-litert``), or ``tflite-runtime`` on numpy-1 devices."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Self

import numpy as np

from edge_node.errors import InferenceError, ModelLoadError
from edge_node.inference.runtime import (
    InferenceRuntime,
    TensorSpec,
    check_model_file,
    check_threads,
    installed_version,
)
from schemas.base import ModelFormat, RuntimeName

logger = logging.getLogger(__name__)

_ERRORS = (ValueError, RuntimeError)
"""What the LiteRT interpreter raises: ValueError (bad model, bad tensor), RuntimeError."""


def _interpreter_class() -> Any:
    """``Interpreter`` of ai_edge_litert, else of tflite_runtime.

    Raises:
        ImportError: neither package is installed.
    """
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        from tflite_runtime.interpreter import Interpreter
    return Interpreter


def _quantization(detail: dict[str, Any]) -> tuple[float, int, np.dtype[Any]] | None:
    """(scale, zero point, integer dtype) of a quantized int8/uint8 tensor, else None."""
    dtype = np.dtype(detail["dtype"])
    scale, zero_point = detail.get("quantization") or (0.0, 0)
    if dtype not in (np.dtype(np.int8), np.dtype(np.uint8)) or not scale:
        return None
    return float(scale), int(zero_point), dtype


def _spec(detail: dict[str, Any]) -> TensorSpec:
    """A TensorSpec from an interpreter tensor detail; ``-1`` in the signature is dynamic.

    A quantized int8/uint8 tensor is declared float32: the runtime quantizes inputs and
    dequantizes outputs with the model's own scale and zero point.
    """
    signature = detail.get("shape_signature")
    if signature is None or len(signature) == 0:
        signature = detail["shape"]
    shape = tuple(int(d) if d >= 0 else None for d in signature)
    dtype = "float32" if _quantization(detail) else np.dtype(detail["dtype"]).name
    return TensorSpec(str(detail["name"]), shape, dtype)


class LiteRtRuntime(InferenceRuntime):
    """A LiteRT interpreter, single input, first output.

    The input is resized (and the tensors reallocated) when the batch shape differs from
    the previous call's. Calls are serialized by a lock: an interpreter runs one batch at
    a time.
    """

    runtime = RuntimeName.LITERT
    format = ModelFormat.TFLITE

    __slots__ = ("_in_quant", "_input_index", "_input_shape", "_interpreter", "_lock",
                 "_out_quant", "_output_index")

    def __init__(self, path: Path, interpreter: Any) -> None:
        input_details = interpreter.get_input_details()
        if len(input_details) != 1:
            raise ModelLoadError(path, f"model has {len(input_details)} inputs; only "
                                 "single-input models are supported")
        output_details = interpreter.get_output_details()
        if not output_details:
            raise ModelLoadError(path, "model has no outputs")
        inputs = [_spec(input_details[0])]
        super().__init__(path, inputs, [_spec(d) for d in output_details])
        self._interpreter: Any = interpreter
        self._input_index: int = input_details[0]["index"]
        self._output_index: int = output_details[0]["index"]
        self._input_shape: tuple[int, ...] = tuple(int(d) for d in input_details[0]["shape"])
        self._in_quant = _quantization(input_details[0])
        self._out_quant = _quantization(output_details[0])
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: Path, *, threads: int = 1) -> Self:
        """Open a ``.tflite`` model in an interpreter and allocate its tensors.

        Args:
            path: the ``.tflite`` file.
            threads: interpreter threads (used by the kernels that support them).

        Returns:
            The loaded runtime.

        Raises:
            ModelLoadError: missing, empty or invalid file, or not a single-input model.
        """
        check_threads(threads)
        check_model_file(path)
        interpreter_class = _interpreter_class()
        try:
            interpreter = interpreter_class(model_path=str(path), num_threads=threads)
            interpreter.allocate_tensors()
        except _ERRORS as exc:
            raise ModelLoadError(path, str(exc)) from exc
        return cls(path, interpreter)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run the model on one batch and return its first output.

        Raises:
            InferenceError: wrong dtype or shape, the interpreter failed, or it is closed.
        """
        self._check_input(batch)
        with self._lock:
            interpreter = self._interpreter
            if interpreter is None:
                raise InferenceError("the LiteRT interpreter is closed")
            try:
                if batch.shape != self._input_shape:
                    self._resize(interpreter, batch.shape)
                interpreter.set_tensor(self._input_index, self._quantize(batch))
                interpreter.invoke()
                result: np.ndarray = interpreter.get_tensor(self._output_index)
            except _ERRORS as exc:
                raise InferenceError(f"LiteRT: {exc}") from exc
        if self._out_quant is not None:
            scale, zero_point, _ = self._out_quant
            return ((result.astype(np.float32) - zero_point) * scale).astype(np.float32)
        return result

    def _quantize(self, batch: np.ndarray) -> np.ndarray:
        """A full-integer model's input from float32: round(x / scale) + zero point."""
        if self._in_quant is None:
            return batch
        scale, zero_point, dtype = self._in_quant
        info = np.iinfo(dtype)
        quantized: np.ndarray = np.clip(np.rint(batch / scale) + zero_point, info.min,
                                        info.max).astype(dtype)
        return quantized

    def _resize(self, interpreter: Any, shape: tuple[int, ...]) -> None:
        self._input_shape = ()  # a failed resize forces a new one on the next call
        interpreter.resize_tensor_input(self._input_index, list(shape), strict=False)
        interpreter.allocate_tensors()
        self._input_shape = shape
        logger.debug("%s: input resized to %s", self.path.name, shape)

    def close(self) -> None:
        """Drop the interpreter; LiteRT frees it with the last reference."""
        with self._lock:
            self._interpreter = None

    @staticmethod
    def library_version() -> str | None:
        """Version of ai_edge_litert (or of tflite_runtime), or None when neither is installed."""
        return (installed_version("ai_edge_litert", ("ai-edge-litert", "ai-edge-litert-nightly"))
                or installed_version("tflite_runtime", ("tflite-runtime",)))
