"""The demo's model: trained with federated learning across the simulated fleet.

Each device holds a non-IID (Dirichlet) partition of scikit-learn's bundled
digits; the cloud's coordinator runs FedAvg rounds over MQTT. This module holds
the pieces the demo needs around that: the centralized baseline (the same model
and epochs budget on the union of the same training data) and the ONNX export
of the final global weights for the signed rollout.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch

from fl_tasks.base import FLTask, LocalData, Partition, Weights, set_weights
from fl_tasks.digits import DigitsTask
from schemas.fl import HyperParams


@dataclass(frozen=True)
class Baseline:
    """Centralized training on the union of the devices' training data."""

    accuracy: float
    epochs: int


def centralized_baseline(task: FLTask, partitions: list[Partition], hp: HyperParams,
                         epochs: int, seed: int = 0) -> Baseline:
    """Train the task's model centrally for ``epochs`` on the union of the devices' data."""
    shares = [task.local_data(p) for p in partitions]
    x = np.concatenate([s.x_train for s in shares])
    y = np.concatenate([s.y_train for s in shares])
    central = task.central_data()
    if central is None:
        raise ValueError(f"{type(task).__name__} has no central test split to measure on")
    data = LocalData(x, y, central[0][:1], central[1][:1])
    initial = {k: v.detach().numpy().astype(np.float32).copy()
               for k, v in task.build_model().state_dict().items()}
    result = task.train(initial, data, hp.model_copy(update={"local_epochs": max(1, epochs)}),
                        seed=seed)
    evaluation = task.evaluate(result.weights, central[0], central[1])
    return Baseline(evaluation.accuracy, max(1, epochs))


def export_onnx(task: DigitsTask, weights: Weights) -> bytes:
    """The global model as ONNX with a dynamic batch axis."""
    model = task.build_model()
    set_weights(model, weights)
    model.eval()
    buffer = io.BytesIO()
    torch.onnx.export(model, (torch.zeros(1, 64),), buffer,  # type: ignore[arg-type]
                      input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    return buffer.getvalue()
