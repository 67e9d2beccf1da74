"""ONNX models on onnxruntime's CPU execution provider."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Final, Self

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

ONNX_DTYPES: Final[dict[str, str]] = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}
"""onnxruntime type strings of the numeric tensors a numpy batch can feed."""

_ERROR_NAMES: Final = (
    "EPFail", "EngineError", "Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf",
    "ModelLoaded", "ModelRequiresCompilation", "NoModel", "NoSuchFile", "NotFound",
    "NotImplemented", "RuntimeException",
)
"""Exception classes of onnxruntime's binding (each derives from Exception directly)."""


def _onnxruntime_errors() -> tuple[type[Exception], ...]:
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    found = tuple(getattr(state, name) for name in _ERROR_NAMES if hasattr(state, name))
    # The Python layer of onnxruntime raises these two itself (e.g. unknown provider).
    return (*found, RuntimeError, ValueError)


def _dims(shape: list[Any] | None) -> tuple[int | None, ...]:
    """Symbolic (``"batch"``), unknown (None) or negative dimensions become None."""
    return tuple(d if isinstance(d, int) and d >= 0 else None for d in shape or ())


class OnnxRuntime(InferenceRuntime):
    """An onnxruntime ``InferenceSession`` on the CPU, single input, first output.

    A model exported with a fixed batch size B still accepts any multiple of B: the batch
    is run in slices of B.
    """

    runtime = RuntimeName.ONNXRUNTIME
    format = ModelFormat.ONNX

    __slots__ = ("_errors", "_fixed_batch", "_input_name", "_output_names", "_session")

    def __init__(self, path: Path, session: Any, errors: tuple[type[Exception], ...]) -> None:
        model_inputs = session.get_inputs()
        if len(model_inputs) != 1:
            raise ModelLoadError(path, f"model has {len(model_inputs)} inputs; only "
                                 "single-input models are supported")
        first = model_inputs[0]
        dtype = ONNX_DTYPES.get(first.type)
        if dtype is None:
            raise ModelLoadError(path, f"input {first.name!r} has unsupported type {first.type}")
        inputs = [TensorSpec(first.name, _dims(first.shape), dtype)]
        outputs = [TensorSpec(o.name, _dims(o.shape), ONNX_DTYPES.get(o.type, o.type))
                   for o in session.get_outputs()]
        if not outputs:
            raise ModelLoadError(path, "model has no outputs")
        super().__init__(path, inputs, outputs)
        self._session: Any = session
        self._errors = errors
        self._input_name: str = first.name
        self._output_names = [outputs[0].name]  # only the first output is fetched
        batch_dim = inputs[0].shape[0]
        self._fixed_batch: int | None = batch_dim if batch_dim else None

    @classmethod
    def load(cls, path: Path, *, threads: int = 1) -> Self:
        """Open an ONNX model in an ``InferenceSession`` with the CPU provider.

        Args:
            path: the ``.onnx`` file.
            threads: intra-op threads; inter-op parallelism is off (one thread).

        Returns:
            The loaded runtime.

        Raises:
            ModelLoadError: missing, empty or invalid file, or not a single-input model.
        """
        check_threads(threads)
        check_model_file(path)
        import onnxruntime as ort

        errors = _onnxruntime_errors()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        try:
            session = ort.InferenceSession(
                str(path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except errors as exc:
            raise ModelLoadError(path, str(exc)) from exc
        return cls(path, session, errors)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run the model on one batch and return its first output.

        Raises:
            InferenceError: wrong dtype or shape, onnxruntime failed, or the session is closed.
        """
        session = self._session
        if session is None:
            raise InferenceError("the onnxruntime session is closed")
        # Hot path: onnxruntime itself refuses a wrong dtype, rank or dimension, so only
        # the dtype (a list would be cast silently) is checked here, by identity; the full
        # check runs when that fails or onnxruntime raises, to word the error.
        try:
            dtype = batch.dtype
        except AttributeError:
            raise InferenceError(f"expected a numpy array, got {type(batch).__name__}") from None
        if dtype is not self._in_dtype or self._fixed_batch is not None:
            return self._run_checked(batch)
        try:
            result: np.ndarray = session.run(self._output_names, {self._input_name: batch})[0]
        except self._errors as exc:
            self._check_input(batch)
            raise InferenceError(f"onnxruntime: {exc}") from exc
        return result

    def _run_checked(self, batch: np.ndarray) -> np.ndarray:
        """Check the batch in full, then run it (in slices for a fixed-batch model)."""
        self._check_input(batch)
        count = batch.shape[0]
        size = self._fixed_batch
        if size is None or count == size:
            starts = [0]
            size = count
        elif count and count % size == 0:
            starts = list(range(0, count, size))
        else:
            raise InferenceError(f"batch of {count} is not a multiple of the model's fixed "
                                 f"batch size {size}")
        run = self._session.run
        try:
            parts = [run(self._output_names, {self._input_name: batch[start:start + size]})[0]
                     for start in starts]
        except self._errors as exc:
            raise InferenceError(f"onnxruntime: {exc}") from exc
        result: np.ndarray = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return result

    def close(self) -> None:
        """Drop the session; onnxruntime frees it with the last reference."""
        self._session = None

    @staticmethod
    def library_version() -> str | None:
        """Version of onnxruntime, or None when it is not installed."""
        return installed_version("onnxruntime", ("onnxruntime", "onnxruntime-gpu",
                                                 "onnxruntime-openvino", "onnxruntime-qnn"))
