"""Inference runtimes for ONNX (onnxruntime), TFLite (LiteRT) and TorchScript (torch) models.

The runtime libraries are imported only when a model is loaded or a version is asked for.
"""

from edge_node.inference.litert_runtime import LiteRtRuntime
from edge_node.inference.onnx_runtime import OnnxRuntime
from edge_node.inference.runtime import (
    UNKNOWN_DTYPE,
    InferenceRuntime,
    TensorSpec,
    available_runtimes,
    load_runtime,
    supported_formats,
)
from edge_node.inference.torchscript_runtime import SIGNATURE_FILE, TorchScriptRuntime

__all__ = [
    "SIGNATURE_FILE",
    "UNKNOWN_DTYPE",
    "InferenceRuntime",
    "LiteRtRuntime",
    "OnnxRuntime",
    "TensorSpec",
    "TorchScriptRuntime",
    "available_runtimes",
    "load_runtime",
    "supported_formats",
]
