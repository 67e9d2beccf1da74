"""The inference runtime interface and the choice of an implementation for a model format.

Each implementation imports its library lazily (in ``load`` and ``library_version``), so a
device without torch, or without LiteRT, still imports this package and simply reports
fewer :func:`available_runtimes`.
"""

from __future__ import annotations

import importlib.util
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Final, Self

import numpy as np

from edge_node.errors import InferenceError, ModelLoadError, RuntimeUnavailableError
from schemas.base import ModelFormat, RuntimeName

if TYPE_CHECKING:
    from collections.abc import Sequence

logger = logging.getLogger(__name__)

UNKNOWN_DTYPE: Final = ""
"""``TensorSpec.dtype`` of a tensor whose signature the model file does not declare."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Name, shape and dtype of one model input or output.

    Attributes:
        name: the tensor's name in the model.
        shape: one entry per dimension, ``None`` for a dynamic one. The first dimension is
            the batch; :meth:`InferenceRuntime.run` accepts any batch size whatever it says.
            An empty shape with ``dtype == UNKNOWN_DTYPE`` means the model does not declare
            this tensor (a TorchScript file saved without a signature).
        dtype: numpy dtype name, e.g. ``"float32"``.
    """

    name: str
    shape: tuple[int | None, ...]
    dtype: str

    @property
    def known(self) -> bool:
        """Whether the model declares this tensor's dtype and rank."""
        return self.dtype != UNKNOWN_DTYPE


class InferenceRuntime(ABC):
    """A loaded model that maps one input batch to its first output.

    Instances are created by :meth:`load` (or :func:`load_runtime`), never directly.

    Attributes:
        runtime: the runtime library this implementation uses.
        format: the model file format it loads.
        path: the model file.
        inputs: the model's input signature (exactly one input).
        outputs: the model's output signature; :meth:`run` returns the first.
    """

    runtime: ClassVar[RuntimeName]
    format: ClassVar[ModelFormat]
    path: Path
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    __slots__ = ("_in_dtype", "_in_rank", "_in_tail", "_in_tail_known", "inputs", "outputs",
                 "path")

    def __init__(self, path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
        self.path = path
        self.inputs = inputs
        self.outputs = outputs
        spec = inputs[0]
        if spec.known and not spec.shape:
            raise ModelLoadError(path, f"input {spec.name!r} is a scalar: no batch dimension")
        # Precomputed once so that the per-call check is a few comparisons.
        self._in_dtype: np.dtype[np.generic] | None = np.dtype(spec.dtype) if spec.known else None
        self._in_rank: int | None = len(spec.shape) if spec.known else None
        self._in_tail: tuple[int | None, ...] = spec.shape[1:]
        self._in_tail_known = None not in self._in_tail

    @classmethod
    @abstractmethod
    def load(cls, path: Path, *, threads: int = 1) -> Self:
        """Load a model file.

        Args:
            path: the model file.
            threads: intra-op threads the runtime may use (TorchScript ignores it: torch's
                thread count is process-wide).

        Returns:
            The loaded runtime.

        Raises:
            ModelLoadError: the file is missing, empty, not a model of this format, or has
                more than one input.
        """

    @abstractmethod
    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run the model on one batch.

        Args:
            batch: the single input, batch first, any batch size (an empty batch gives an
                empty output). Its dtype must be the model's input dtype (no silent cast),
                its rank and its other known dimensions the model's.

        Returns:
            The model's first output.

        Raises:
            InferenceError: wrong dtype or shape, the runtime failed, or it is closed.
        """

    def close(self) -> None:  # noqa: B027 - optional hook, not every runtime holds resources
        """Release the session or interpreter; :meth:`run` then raises InferenceError."""

    @staticmethod
    @abstractmethod
    def library_version() -> str | None:
        """Version of the runtime library, or None when it cannot be imported."""

    def _check_input(self, batch: np.ndarray) -> None:
        """Refuse a batch whose dtype, rank or non-batch dimensions differ from the model's.

        Raises:
            InferenceError: naming the expected and the received dtype or shape.
        """
        try:
            dtype = batch.dtype
            shape = batch.shape
        except AttributeError:
            raise InferenceError(f"expected a numpy array, got {type(batch).__name__}") from None
        expected = self._in_dtype
        if expected is None:
            if not shape:
                raise InferenceError("a scalar input has no batch dimension")
            return
        if (dtype != expected or len(shape) != self._in_rank
                or (shape[1:] != self._in_tail if self._in_tail_known
                    else not self._tail_matches(shape))):
            raise self._input_error(dtype, shape)

    def _input_error(self, dtype: np.dtype[np.generic], shape: tuple[int, ...]) -> InferenceError:
        if dtype != self._in_dtype:
            return InferenceError(f"input dtype {dtype} != model input dtype {self._in_dtype}")
        return InferenceError(f"input shape {shape} does not match model input shape "
                              f"{format_shape(self.inputs[0].shape)}")

    def _tail_matches(self, shape: tuple[int, ...]) -> bool:
        """Non-batch dimensions against a tail with dynamic entries; same rank assumed."""
        return all(want is None or got == want
                   for got, want in zip(shape[1:], self._in_tail, strict=True))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(path={str(self.path)!r}, "
                f"inputs={self.inputs!r}, outputs={self.outputs!r})")


def format_shape(shape: Sequence[int | None]) -> str:
    """Render a shape with ``N`` for dynamic dimensions, e.g. ``(N, 64)``."""
    return "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")"


def check_model_file(path: Path) -> None:
    """Refuse a missing or empty model file before handing it to a runtime library.

    Raises:
        ModelLoadError: the path is not a regular file, or it is empty.
    """
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ModelLoadError(path, f"cannot read: {exc.strerror or exc}") from exc
    if not path.is_file():
        raise ModelLoadError(path, "not a regular file")
    if size == 0:
        raise ModelLoadError(path, "empty file")


def check_threads(threads: int) -> None:
    """Refuse a thread count below one.

    Raises:
        ValueError: ``threads < 1``.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")


def _implementations() -> dict[ModelFormat, type[InferenceRuntime]]:
    # Imported here: the implementation modules import this one.
    from edge_node.inference.litert_runtime import LiteRtRuntime
    from edge_node.inference.onnx_runtime import OnnxRuntime
    from edge_node.inference.torchscript_runtime import TorchScriptRuntime

    return {cls.format: cls for cls in (OnnxRuntime, LiteRtRuntime, TorchScriptRuntime)}


def installed_version(module: str, distributions: tuple[str, ...]) -> str | None:
    """Version of an installed library, found without importing it.

    Importing torch costs about a second and 200 MB; an agent that never loads a
    TorchScript model should not pay that just to declare the runtime in its birth.
    """
    try:
        if importlib.util.find_spec(module) is None:
            return None
    except (ImportError, ValueError):
        return None
    for distribution in distributions:
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def available_runtimes() -> dict[RuntimeName, str]:
    """Runtimes whose library is installed here, with the library's version.

    Nothing is imported: the library is imported when a model is loaded.
    """
    found: dict[RuntimeName, str] = {}
    for cls in _implementations().values():
        version = cls.library_version()
        if version is not None:
            found[cls.runtime] = version
    return found


def supported_formats() -> list[ModelFormat]:
    """Model formats that an available runtime can load, in :class:`ModelFormat` order."""
    available = available_runtimes()
    implementations = _implementations()
    return [fmt for fmt in ModelFormat
            if fmt in implementations and implementations[fmt].runtime in available]


def load_runtime(path: Path, fmt: ModelFormat, *, threads: int = 1) -> InferenceRuntime:
    """Load a model file with the runtime of its format.

    Args:
        path: the model file.
        fmt: its format.
        threads: intra-op threads for the runtime.

    Returns:
        The loaded runtime.

    Raises:
        RuntimeUnavailableError: the format's runtime library is not installed.
        ModelLoadError: the file is missing, empty or not a valid model of that format.
    """
    cls = _implementations().get(fmt)
    if cls is None:
        raise RuntimeUnavailableError(f"model format {fmt}")
    if cls.library_version() is None:
        raise RuntimeUnavailableError(f"{fmt} models ({cls.runtime} is not installed)")
    runtime = cls.load(path, threads=threads)
    logger.info("loaded %s model %s with %s: inputs %s, outputs %s", fmt, path, cls.runtime,
                _describe(runtime.inputs), _describe(runtime.outputs))
    return runtime


def _describe(specs: list[TensorSpec]) -> str:
    return ", ".join(f"{s.name}{format_shape(s.shape)}:{s.dtype or '?'}" for s in specs)
