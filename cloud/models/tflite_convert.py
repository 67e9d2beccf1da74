"""PyTorch -> LiteRT (TFLite) with litert-torch, run in the converter's own interpreter.

litert-torch's dependencies pin packages the cloud cannot share (typing-extensions
<4.13 through xdsl), so it lives in a venv of its own and the optimizer runs this
file there as a script: it imports nothing of edgefl, only torch, numpy and
litert_torch. Input: an ``ExportedProgram`` saved with ``torch.export.save`` by
the same torch version, the example input and, for full-integer int8, the
calibration examples (``.npy``). Output: the ``.tflite`` file. Any failure ends
the process with a non-zero status and the reason on stderr.

    python tflite_convert.py PROGRAM.pt2 SAMPLE.npy OUT.tflite [--calibration CAL.npy]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def convert(program: Path, sample_path: Path, out: Path, calibration_path: Path | None) -> None:
    """Convert; full-integer int8 (PT2E, per-channel symmetric) when calibration is given."""
    import litert_torch
    import numpy as np
    import torch

    module = torch.export.load(str(program)).module()
    sample = (torch.from_numpy(np.load(sample_path)),)
    if calibration_path is None:
        edge_model = litert_torch.convert(module, sample)
    else:
        from litert_torch.quantize import pt2e_quantizer, quant_config
        from torchao.quantization.pt2e import quantize_pt2e

        quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
            pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True,
                                                             is_dynamic=False))
        prepared = quantize_pt2e.prepare_pt2e(module, quantizer)
        calibration = np.load(calibration_path)
        with torch.no_grad():
            for i in range(len(calibration)):
                prepared(torch.from_numpy(calibration[i:i + 1]))
        quantized = quantize_pt2e.convert_pt2e(prepared, fold_quantize=False)
        edge_model = litert_torch.convert(
            quantized, sample, quant_config=quant_config.QuantConfig(pt2e_quantizer=quantizer))
    edge_model.export(str(out))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("program", type=Path)
    parser.add_argument("sample", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--calibration", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        convert(args.program, args.sample, args.out, args.calibration)
    except ModuleNotFoundError as exc:
        print(f"not installed: {exc.name}", file=sys.stderr)
        return 3
    except Exception as exc:  # noqa: BLE001 - the reason goes to the caller, which reports it
        print(f"{type(exc).__name__}: {' '.join(str(exc).split())[:2000]}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
