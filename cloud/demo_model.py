"""The demo's model: an MLP trained on scikit-learn's bundled digits, exported to ONNX.

Real data (no download): 1,797 8x8 digit images, 80/20 split with a fixed seed.
The federated-learning issue replaces this central training with FL rounds.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


@dataclass(frozen=True)
class DigitsModel:
    """A trained model, its ONNX bytes and the held-out split."""

    onnx: bytes
    test_x: np.ndarray
    test_y: np.ndarray
    test_accuracy: float


def train_digits_mlp(*, epochs: int = 40, seed: int = 0) -> DigitsModel:
    """Train a 64-32-10 MLP with Adam on the digits training split (a second or two)."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=seed,
                                                        stratify=y)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=generator)
        for idx in order.split(64):  # type: ignore[no-untyped-call]
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
    buffer = io.BytesIO()
    torch.onnx.export(model, (torch.zeros(1, 64),), buffer,  # type: ignore[arg-type]
                      input_names=["x"],
                      output_names=["logits"],
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    return DigitsModel(buffer.getvalue(), x_test, y_test, accuracy)
