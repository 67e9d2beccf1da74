"""TorchScript models on torch (CPU), for devices that ship torch.

A TorchScript file does not record the shapes or dtypes of its inputs. The signature is
read, in this order of preference, from:

1. an extra file :data:`SIGNATURE_FILE` saved in the archive, JSON of the form
   ``{"inputs": [{"name": "x", "shape": [null, 64], "dtype": "float32"}], "outputs": [...]}``
   (``null`` marks a dynamic dimension), written at export with
   ``torch.jit.save(module, path, _extra_files={SIGNATURE_FILE: json_text})``;
2. a ``Sequential`` whose first layer is a ``Linear``: input ``(N, in_features)`` with the
   weight's dtype, outputs found by running one batch of zeros at load;
3. otherwise the signature is unknown (``TensorSpec.known`` is False) and ``run`` only
   checks that the batch is not empty.

``torch.jit.load`` can run code embedded in the archive: load only verified releases.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, Self

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edge_node.errors import InferenceError, ModelLoadError
from edge_node.inference.runtime import (
    UNKNOWN_DTYPE,
    InferenceRuntime,
    TensorSpec,
    check_model_file,
    check_threads,
    installed_version,
)
from schemas.base import ModelFormat, RuntimeName

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

SIGNATURE_FILE: Final = "edgefl_signature.json"
"""Name of the extra file, in a TorchScript archive, that declares the model's signature."""

_LOAD_ERRORS = (RuntimeError, ValueError, OSError)
"""What ``torch.jit.load`` raises for a missing, truncated or foreign file."""
_RUN_ERRORS = (RuntimeError, ValueError, TypeError)
"""What a forward call raises (``torch.jit.Error`` is a RuntimeError) and ``.numpy()``."""
_FLOAT_DTYPES: Final = ("float16", "float32", "float64")


class _TensorEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str = Field(min_length=1, max_length=256)
    shape: list[Annotated[int, Field(ge=0)] | None]
    dtype: str

    @field_validator("dtype")
    @classmethod
    def _numpy_dtype(cls, value: str) -> str:
        try:
            return np.dtype(value).name
        except TypeError as exc:
            raise ValueError(f"not a numpy dtype: {value!r}") from exc

    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, tuple(self.shape), self.dtype)


class _SignatureFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    inputs: list[_TensorEntry] = Field(min_length=1, max_length=1)
    outputs: list[_TensorEntry] = Field(min_length=1)


def _declared_signature(path: Path, text: bytes | str) -> tuple[TensorSpec, list[TensorSpec]]:
    try:
        signature = _SignatureFile.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise ModelLoadError(path, f"invalid {SIGNATURE_FILE}: {where}: {first['msg']}") from None
    return signature.inputs[0].spec(), [o.spec() for o in signature.outputs]


def _input_name(path: Path, module: torch.jit.ScriptModule) -> str:
    """Name of forward's single argument; refuses a forward taking more than one."""
    try:
        forward: Any = module.forward
        arguments = forward.schema.arguments[1:]  # [0] is self
    except AttributeError as exc:
        raise ModelLoadError(path, "the TorchScript module has no forward method") from exc
    required = [a for a in arguments if not a.has_default_value()]
    if not arguments or len(required) > 1:
        raise ModelLoadError(path, f"forward takes {len(required)} inputs; only single-input "
                             "models are supported")
    return str(arguments[0].name)


def _sequential_input(module: torch.jit.ScriptModule, name: str) -> TensorSpec | None:
    """``(N, in_features)`` when the module is a Sequential that starts with a Linear."""
    if getattr(module, "original_name", None) != "Sequential":
        return None
    first = next(iter(module.children()), None)
    if first is None or getattr(first, "original_name", None) != "Linear":
        return None
    weight = getattr(first, "weight", None)
    shape: tuple[int, ...] = tuple(getattr(weight, "shape", ()))
    dtype = str(getattr(weight, "dtype", "")).removeprefix("torch.")
    if len(shape) != 2 or dtype not in _FLOAT_DTYPES:
        return None
    return TensorSpec(name, (None, shape[1]), dtype)


def _first_tensor(output: object) -> torch.Tensor:
    """The first tensor of a tuple, list or dict output (nested ones included).

    Raises:
        InferenceError: the output holds no tensor first.
    """
    import torch

    while True:
        if isinstance(output, torch.Tensor):
            return output
        if isinstance(output, (tuple, list)) and output:
            output = output[0]
        elif isinstance(output, dict) and output:
            output = next(iter(output.values()))
        else:
            raise InferenceError(f"the module returned {type(output).__name__}, not a tensor")


def _summary(exc: BaseException, *, last: bool) -> str:
    """One line of a torch error: TorchScript puts the cause last, after its traceback."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if last:
        return lines[-1][:300]
    return lines[0].split(". ", 1)[0][:300]  # torch's zip errors go on with advice


class TorchScriptRuntime(InferenceRuntime):
    """A TorchScript module on the CPU in eval mode, single input, first output.

    ``run`` calls the module under ``torch.inference_mode()``. A read-only or
    non-contiguous batch is copied first (``torch.from_numpy`` shares the memory).
    """

    runtime = RuntimeName.TORCHSCRIPT
    format = ModelFormat.TORCHSCRIPT

    __slots__ = ("_from_numpy", "_inference_mode", "_module", "_tensor_type")

    def __init__(self, path: Path, module: torch.jit.ScriptModule, torch_module: Any,
                 inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
        super().__init__(path, inputs, outputs)
        self._module: torch.jit.ScriptModule | None = module
        self._from_numpy: Callable[[np.ndarray], torch.Tensor] = torch_module.from_numpy
        self._inference_mode: Callable[[], torch.inference_mode] = torch_module.inference_mode
        self._tensor_type: type[torch.Tensor] = torch_module.Tensor

    @classmethod
    def load(cls, path: Path, *, threads: int = 1) -> Self:
        """Load a TorchScript archive onto the CPU in eval mode.

        Args:
            path: the TorchScript (``torch.jit.save``) file.
            threads: validated but not applied: ``torch.set_num_threads`` is process-wide,
                so the process sets it once.

        Returns:
            The loaded runtime.

        Raises:
            ModelLoadError: missing, empty or invalid file, a forward taking more than one
                input, an invalid signature file, or the probe batch failing.
        """
        check_threads(threads)
        check_model_file(path)
        import torch

        extra_files: dict[str, Any] = {SIGNATURE_FILE: ""}
        try:
            module = torch.jit.load(  # type: ignore[no-untyped-call]
                str(path), map_location="cpu", _extra_files=extra_files
            )
        except _LOAD_ERRORS as exc:
            raise ModelLoadError(path, _summary(exc, last=False)) from exc
        module.eval()
        name = _input_name(path, module)
        declared = extra_files.get(SIGNATURE_FILE)
        if declared:
            spec, outputs = _declared_signature(path, declared)
            return cls(path, module, torch, [spec], outputs)
        spec_or_none = _sequential_input(module, name)
        if spec_or_none is None:
            logger.warning("%s declares no signature (%s): its inputs are not checked",
                           path, SIGNATURE_FILE)
            unknown = [TensorSpec("output", (), UNKNOWN_DTYPE)]
            return cls(path, module, torch, [TensorSpec(name, (), UNKNOWN_DTYPE)], unknown)
        runtime = cls(path, module, torch, [spec_or_none], [])
        runtime.outputs = [runtime._probe_output(spec_or_none)]
        return runtime

    def _probe_output(self, spec: TensorSpec) -> TensorSpec:
        """Output signature found by running one batch of zeros.

        Raises:
            ModelLoadError: the module fails on a batch of its inferred input shape.
        """
        probe = np.zeros((1, *(d or 1 for d in spec.shape[1:])), dtype=spec.dtype)
        try:
            output = self.run(probe)
        except InferenceError as exc:
            raise ModelLoadError(self.path, f"fails on a batch of zeros: {exc}") from exc
        return TensorSpec("output", (None, *output.shape[1:]), output.dtype.name)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run the module on one batch and return its first output as a numpy array.

        Raises:
            InferenceError: wrong dtype or shape, the module failed or returned no tensor,
                or the runtime is closed.
        """
        module = self._module
        if module is None:
            raise InferenceError("the TorchScript module is closed")
        self._check_input(batch)
        flags = batch.flags
        if not (flags.writeable and flags.c_contiguous):
            batch = batch.copy()
        try:
            with self._inference_mode():
                output = module(self._from_numpy(batch))
            if not isinstance(output, self._tensor_type):
                output = _first_tensor(output)
            result: np.ndarray = output.numpy()
        except _RUN_ERRORS as exc:
            raise InferenceError(f"torch: {_summary(exc, last=True)}") from exc
        return result

    def close(self) -> None:
        """Drop the module; torch frees it with the last reference."""
        self._module = None

    @staticmethod
    def library_version() -> str | None:
        """Version of torch, or None when it is not installed (found without importing it)."""
        return installed_version("torch", ("torch",))
