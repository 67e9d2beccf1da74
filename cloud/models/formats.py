"""What a model file is, told from its bytes (``edgefl model register --format auto``).

Each format has a signature a reader can check without a runtime: a TFLite
flatbuffer carries the identifier ``TFL3`` at offset 4; TorchScript is a zip
archive holding ``code/`` and ``constants.pkl``; a weights file is safetensors
(an 8-byte little-endian header length and a JSON header); ONNX is a protobuf
``ModelProto`` that the ``onnx`` package parses. That only tells what a file
claims to be: whether it loads is checked by the runtime of its format.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
from enum import StrEnum

from schemas.base import ModelFormat


class ArtifactFormat(StrEnum):
    """Formats the registry stores: the deployable ones, and a task's weights."""

    ONNX = "onnx"
    TFLITE = "tflite"
    TORCHSCRIPT = "torchscript"
    WEIGHTS = "weights"
    """A task's state dict as safetensors (what federated learning produces): the source of
    optimisation, never released to devices as such."""

    @property
    def deployable(self) -> ModelFormat | None:
        """The wire format devices load, or None for weights."""
        return None if self is ArtifactFormat.WEIGHTS else ModelFormat(self.value)


SUFFIXES = {ArtifactFormat.ONNX: ".onnx", ArtifactFormat.TFLITE: ".tflite",
            ArtifactFormat.TORCHSCRIPT: ".pt", ArtifactFormat.WEIGHTS: ".safetensors"}

_SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024


class FormatError(ValueError):
    """A file is not (or not only) what it is said to be."""


def _is_tflite(data: bytes) -> bool:
    return len(data) >= 8 and data[4:8] == b"TFL3"


def _is_torchscript(data: bytes) -> bool:
    if not data.startswith(b"PK\x03\x04"):
        return False
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        return False
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def _is_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    (length,) = struct.unpack("<Q", data[:8])
    if not 2 <= length <= min(_SAFETENSORS_MAX_HEADER, len(data) - 8):
        return False
    try:
        header = json.loads(data[8:8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(header, dict)


def _is_onnx(data: bytes) -> bool:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError):
        return False
    # Almost any bytes parse as *some* protobuf: a model has a graph and an opset.
    return bool(model.graph.node) and bool(model.opset_import)


def detect_format(data: bytes) -> ArtifactFormat:
    """The format of a model file's bytes.

    Raises:
        FormatError: none of the formats recognises the bytes.
    """
    if _is_tflite(data):
        return ArtifactFormat.TFLITE
    if _is_torchscript(data):
        return ArtifactFormat.TORCHSCRIPT
    if _is_safetensors(data):
        return ArtifactFormat.WEIGHTS
    if _is_onnx(data):
        return ArtifactFormat.ONNX
    raise FormatError("not an ONNX, TFLite, TorchScript or safetensors weights file")


def check_claim(data: bytes, claimed: ArtifactFormat) -> None:
    """Refuse a file whose bytes are not the format it is registered as.

    Raises:
        FormatError: naming what the bytes are instead.
    """
    actual = detect_format(data)
    if actual is not claimed:
        raise FormatError(f"the file is {actual.value}, not {claimed.value}")
