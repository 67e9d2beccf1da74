"""One valid instance of every wire message, for round-trip and fuzz tests."""

from __future__ import annotations

from pydantic import BaseModel

from schemas.alerts import Alert, CloudHealth, CloudState
from schemas.base import ModelFormat, RuntimeName, Severity
from schemas.device import (
    Command,
    CommandResult,
    CommandStatus,
    DeploymentState,
    DeploymentStatus,
    DeviceState,
    DeviceTelemetry,
    HardwareInfo,
    ModelMetrics,
)
from schemas.fl import (
    Compression,
    CompressionSpec,
    EvalResult,
    Fairness,
    GlobalModelEnvelope,
    HyperParams,
    PrivacySpec,
    Rejection,
    RoundPlan,
    SecAggSpec,
    TaskState,
    TaskStatus,
    UpdateEnvelope,
)
from schemas.release import ReleaseManifest, Requirements, Targeting
from schemas.secagg import SecAggInbox

T0 = 1_790_000_000.0

HARDWARE = HardwareInfo(platform="Linux", machine="aarch64", cpu_count=4, memory_total_mb=3800.0,
                        disk_total_mb=30000.0, gpu=False)

EXAMPLES: dict[type[BaseModel], BaseModel] = {
    DeviceState: DeviceState(
        device_id="pi-01", state="online", bd_seq=3, ts=T0, agent_version="0.1.0",
        hardware=HARDWARE, memory_available_mb=2100.5,
        runtimes={RuntimeName.ONNXRUNTIME: "1.18.0", RuntimeName.LITERT: "2.3.0"},
        model_formats=[ModelFormat.ONNX, ModelFormat.TFLITE], site="plant-a", reason="birth",
    ),
    DeviceTelemetry: DeviceTelemetry(
        device_id="pi-01", session_id="a1b2c3", seq=42, ts=T0, cpu_percent=37.5,
        memory_percent=61.0, disk_percent=12.25, temperature_c=58.3, battery_percent=None,
        battery_plugged=None, network_latency_ms=3.2, prediction_count=120, error_count=3,
        uptime_s=86400.0, interval_s=10.0, counters={"refused_validation": 2},
    ),
    ModelMetrics: ModelMetrics(
        device_id="pi-01", model="digits-mlp", version="1.2.0", runtime=RuntimeName.ONNXRUNTIME,
        session_id="a1b2c3", seq=7, ts=T0, window_s=60.0, sample_count=500,
        latency_ms_mean=0.031, latency_ms_p50=0.025, latency_ms_p95=0.06, latency_ms_p99=0.1,
        throughput_per_s=8.3, memory_mb=4.5, cpu_percent=2.0, error_count=1,
        error_rate_percent=0.2, accuracy=0.97,
    ),
    DeploymentStatus: DeploymentStatus(
        device_id="pi-01", model="digits-mlp", ts=T0, state=DeploymentState.FAILED,
        target_version="1.3.0", active_version="1.2.0", previous_version="1.1.0", slot="A",
        chunks_received=3, chunks_total=3, error="sha256 mismatch",
    ),
    Command: Command(correlation_id="c-123", ts=T0, args={"interval_s": 5}, expires_at=T0 + 60),
    CommandResult: CommandResult(
        correlation_id="c-123", device_id="pi-01", command="set_telemetry_interval", ts=T0,
        status=CommandStatus.OK, result={"interval_s": 5},
    ),
    RoundPlan: RoundPlan(
        task="digits", round=4, global_version="3", nonce="5f" * 16, selected=["pi-01", "pi-02"],
        evaluate=["pi-03"], issued_at=T0, deadline=T0 + 120, strategy="fedavg",
        hyperparams=HyperParams(local_epochs=2, batch_size=16, learning_rate=0.05, momentum=0.9,
                                weight_decay=1e-4, proximal_mu=0.01),
        compression=CompressionSpec(kind=Compression.TOPK_INT8, topk_fraction=0.1),
        privacy=PrivacySpec(clip_norm=1.0, noise_multiplier=0.8),
        secagg=SecAggSpec(threshold=2), max_update_norm=50.0,
    ),
    UpdateEnvelope: UpdateEnvelope(
        task="digits", round=4, device_id="pi-01", base_version="3", nonce="5f" * 16,
        num_examples=180,
        train_loss=0.41, train_accuracy=0.88, train_time_s=2.5, compression=Compression.FP16,
        sent_at=T0,
    ),
    GlobalModelEnvelope: GlobalModelEnvelope(task="digits", version="3", round=3, created_at=T0),
    EvalResult: EvalResult(task="digits", round=4, device_id="pi-03", global_version="3",
                           nonce="5f" * 16,
                           num_examples=60, loss=0.35, accuracy=0.9, ts=T0),
    TaskStatus: TaskStatus(
        task="digits", state=TaskState.COLLECTING, round=4, rounds_total=30, global_version="3",
        participants=["pi-01"], rejected=[Rejection(device_id="pi-02", reason="non_finite")],
        train_loss=0.4, eval_loss=0.35, eval_accuracy=0.9, central_accuracy=0.91,
        fairness=Fairness(mean=0.9, std=0.02, cv=0.022, disparity=0.05), bytes_received=1234,
        duration_s=3.2, epsilon_spent=1.5, ts=T0,
    ),
    ReleaseManifest: ReleaseManifest(
        model="digits-mlp", version="1.3.0", format=ModelFormat.ONNX, size_bytes=2_500_000,
        sha256="ab" * 32, chunk_size=1_048_576, chunk_count=3, created_at=T0,
        targeting=Targeting(stage="canary", canary=["pi-01"],
                            requirements=Requirements(formats=[ModelFormat.ONNX],
                                                      min_memory_mb=64)),
        key_id="release-2026", signature="A" * 86 + "==", input_shape=[-1, 64],
        metadata={"task": "digits", "rounds": 30},
    ),
    Alert: Alert(device_id="pi-01", rule="cpu_high", severity=Severity.MAJOR,
                 metric="telemetry.cpu_percent", value=95.0, threshold=90.0,
                 message="CPU above 90 % for 60 s", opened_at=T0, ts=T0),
    CloudState: CloudState(state="online", instance="cloud-1", ts=T0),
    CloudHealth: CloudHealth(
        instance="cloud-1", ts=T0, started_at=T0 - 60, connected=True,
        accepted={"telemetry": 120, "device_state": 3}, stored={"telemetry": 118},
        duplicates={"telemetry": 2}, rate_limited={"telemetry": 1},
        refused={"telemetry": {"validation": 4, "future_timestamp": 1}},
        errors={"dispatch_error": 0}, queues={"pending": 3, "acks": 5}),
    SecAggInbox: SecAggInbox(task="digits", round=3, attempt=0, nonce="5f" * 16, recipient="pi-01",
                             ciphertexts={"pi-02": "A" * 220 + "=="}),
}
