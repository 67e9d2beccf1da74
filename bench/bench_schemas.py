"""Throughput of the wire contract: DeviceTelemetry validation and the tensor codec.

Prints one JSON object. Run on purpose (not in CI):

    .venv/bin/python bench/bench_schemas.py [--repeats 5]

Pinned to one CPU; figures are medians over the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np

from schemas.base import decode_message
from schemas.codec import decode, encode
from schemas.device import DeviceTelemetry
from schemas.fl import UpdateEnvelope

TELEMETRY = DeviceTelemetry(
    device_id="pi-0042", session_id="9f8e7d6c5b4a", seq=123456, ts=1_790_000_000.123,
    cpu_percent=37.5, memory_percent=61.2, disk_percent=12.25, temperature_c=58.3,
    battery_percent=None, battery_plugged=None, network_latency_ms=3.2,
    prediction_count=120, error_count=3, uptime_s=86400.0, interval_s=10.0,
).model_dump_json(exclude={"error_rate_percent"}).encode()


def _rate(fn: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return n / (time.perf_counter() - start)


def bench_validation(repeats: int, n: int = 100_000) -> dict[str, object]:
    """Objects per second of DeviceTelemetry decoded at the boundary."""
    rates = [_rate(lambda: decode_message(DeviceTelemetry, TELEMETRY), n)
             for _ in range(repeats)]
    raw = [_rate(lambda: DeviceTelemetry.model_validate_json(TELEMETRY), n)
           for _ in range(repeats)]
    return {
        "payload_bytes": len(TELEMETRY),
        "decode_message_objects_per_s_median": round(statistics.median(rates)),
        "model_validate_json_objects_per_s_median": round(statistics.median(raw)),
        "runs": [round(r) for r in rates],
    }


def bench_codec(repeats: int, params: int = 1_000_000, n: int = 30) -> dict[str, object]:
    """MB/s to encode and decode a 1M-parameter float32 update."""
    rng = np.random.default_rng(0)
    tensors = {
        "fc1.weight": rng.standard_normal((params // 2,), dtype=np.float32).reshape(500, 1000),
        "fc2.weight": rng.standard_normal((params // 2,), dtype=np.float32).reshape(1000, 500),
    }
    envelope = UpdateEnvelope(task="bench", round=1, device_id="pi-1", base_version="1",
                              num_examples=100, sent_at=1_790_000_000.0)
    payload = encode(tensors, envelope)
    megabytes = sum(t.nbytes for t in tensors.values()) / 1e6
    enc = [_rate(lambda: encode(tensors, envelope), n) * megabytes for _ in range(repeats)]
    dec = [_rate(lambda: decode(payload, UpdateEnvelope), n) * megabytes for _ in range(repeats)]
    src = np.frombuffer(payload, dtype=np.uint8)
    dst = np.empty_like(src)
    copy = [_rate(lambda: np.copyto(dst, src), n) * megabytes for _ in range(repeats)]
    return {
        "parameters": params,
        "payload_bytes": len(payload),
        "encode_MB_per_s_median": round(statistics.median(enc), 1),
        "decode_MB_per_s_median": round(statistics.median(dec), 1),
        "memcpy_reference_MB_per_s_median": round(statistics.median(copy), 1),
        "encode_runs": [round(x, 1) for x in enc],
        "decode_runs": [round(x, 1) for x in dec],
    }


def main() -> None:
    """Run both benchmarks and print JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    pinned = None
    if hasattr(os, "sched_setaffinity"):
        pinned = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {pinned})
    result = {
        "benchmark": "schemas",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "pinned_cpu": pinned,
        "repeats": args.repeats,
        "device_telemetry_validation": bench_validation(args.repeats),
        "codec_1m_float32": bench_codec(args.repeats),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
