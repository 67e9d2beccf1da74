"""Byzantine-robust aggregation: coordinate-wise median, trimmed mean, Krum, Multi-Krum.

These need every update of a round at once, so they buffer them
(``buffers = True``): memory is the number of clients times the model, as one
float32 vector per client. Statistics are computed over blocks of coordinates so
that temporaries stay small.

- Coordinate-wise median and trimmed mean (Yin et al. 2018, "Byzantine-Robust
  Distributed Learning: Towards Optimal Statistical Rates") are unweighted: a
  client's claimed number of examples does not buy it influence.
- Krum and Multi-Krum (Blanchard et al. 2017, "Machine Learning with
  Adversaries"; El Mhamdi et al. 2018): with ``n`` clients of which at most ``f``
  are Byzantine, each update is scored by the sum of squared distances to its
  ``n - f - 2`` nearest others; Krum keeps the best one, Multi-Krum averages the
  ``m`` best (example-weighted, as Flower does). The guarantee needs
  ``n >= 2f + 3``; with fewer clients a warning is logged and at least one
  neighbour is used.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar, Final

import numpy as np

from cloud.fl.strategy import FLOAT32, ParamValue, Strategy, Weights, param_float, param_int

logger = logging.getLogger(__name__)

BLOCK_ELEMENTS: Final = 1 << 20
"""Elements of the (clients x coordinates) block processed at once."""


@dataclass(frozen=True, slots=True)
class Slot:
    """Where one parameter lies in a client's flat update vector."""

    name: str
    start: int
    end: int
    shape: tuple[int, ...]


class BufferedStrategy(Strategy):
    """Keeps each update as a flat float32 vector and combines them at the end."""

    name: ClassVar[str] = "buffered"
    buffers: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()
        self._layout: list[Slot] = []
        self._size = 0
        self._updates: list[np.ndarray] = []
        self._weights: list[float] = []

    def _on_begin(self) -> None:
        self._layout = []
        offset = 0
        for name in self.shared:
            array = self.global_weights[name]
            self._layout.append(Slot(name, offset, offset + array.size, array.shape))
            offset += array.size
        self._size = offset
        self._updates = []
        self._weights = []

    def _on_end(self) -> None:
        self._updates = []
        self._weights = []

    def _accumulate(self, delta: Mapping[str, np.ndarray], weight: float) -> None:
        vector = np.empty(self._size, dtype=FLOAT32)
        for slot in self._layout:
            vector[slot.start : slot.end] = np.ravel(delta[slot.name])
        self._updates.append(vector)
        self._weights.append(weight)

    def _aggregate(self) -> Weights:
        combined = self._combine()
        return {
            slot.name: self.global_weights[slot.name]
            + combined[slot.start : slot.end].reshape(slot.shape)
            for slot in self._layout
        }

    def _column_blocks(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(start, end, block)`` with ``block[i] = update_i[start:end]`` (a copy)."""
        width = max(1, BLOCK_ELEMENTS // len(self._updates))
        for start in range(0, self._size, width):
            end = min(self._size, start + width)
            yield start, end, np.stack([u[start:end] for u in self._updates])

    @abstractmethod
    def _combine(self) -> np.ndarray:
        """The aggregated flat delta, float32, from the buffered updates."""


class CoordinateMedian(BufferedStrategy):
    """The coordinate-wise median of the deltas (unweighted)."""

    name: ClassVar[str] = "median"

    def _combine(self) -> np.ndarray:
        out = np.empty(self._size, dtype=FLOAT32)
        for start, end, block in self._column_blocks():
            out[start:end] = np.median(block, axis=0)
        return out


class TrimmedMean(BufferedStrategy):
    """Per coordinate, drop the ``floor(beta n)`` largest and smallest values, average the rest.

    Args:
        beta: share trimmed from each side, in [0, 0.5); 0 is the plain mean.
    """

    name: ClassVar[str] = "trimmed_mean"

    def __init__(self, *, beta: float = 0.1) -> None:
        super().__init__()
        self.beta = param_float(self.name, "beta", beta, ge=0.0, lt=0.5)

    def config(self) -> dict[str, ParamValue]:
        """The trimmed share."""
        return {"beta": self.beta}

    def _combine(self) -> np.ndarray:
        n = len(self._updates)
        cut = int(self.beta * n)
        out = np.empty(self._size, dtype=FLOAT32)
        for start, end, block in self._column_blocks():
            block.sort(axis=0)
            out[start:end] = block[cut : n - cut].mean(axis=0, dtype=np.float64)
        return out


class MultiKrum(BufferedStrategy):
    """Average the ``num_selected`` updates with the lowest Krum scores.

    Args:
        num_byzantine: ``f``, the most Byzantine clients tolerated.
        num_selected: ``m``, updates averaged; ``None`` means ``n - f``.

    Attributes:
        selected: after :meth:`finalize`, the indices (in order of ``add``) of the
            updates kept, best first.
        scores: after :meth:`finalize`, every update's Krum score.
    """

    name: ClassVar[str] = "multikrum"

    def __init__(self, *, num_byzantine: int = 0, num_selected: int | None = None) -> None:
        super().__init__()
        self.num_byzantine = param_int(self.name, "num_byzantine", num_byzantine)
        self.num_selected = (
            None if num_selected is None else param_int(self.name, "num_selected", num_selected,
                                                        ge=1)
        )
        self.selected: list[int] = []
        self.scores: list[float] = []

    def config(self) -> dict[str, ParamValue]:
        """``f`` and ``m``."""
        return {"num_byzantine": self.num_byzantine, "num_selected": self.num_selected}

    def _pairwise_sq_distances(self) -> np.ndarray:
        n = len(self._updates)
        distances = np.zeros((n, n), dtype=np.float64)
        for _, _, block in self._column_blocks():
            b = block.astype(np.float64)
            norms = np.einsum("ij,ij->i", b, b)
            distances += norms[:, None] + norms[None, :] - 2.0 * (b @ b.T)
        np.maximum(distances, 0.0, out=distances)
        np.fill_diagonal(distances, 0.0)
        return distances

    def krum_scores(self) -> np.ndarray:
        """Each buffered update's sum of squared distances to its nearest others."""
        n = len(self._updates)
        f = self.num_byzantine
        if n < 2 * f + 3:
            logger.warning("%s: %d updates < 2f+3 = %d, Krum's guarantee does not hold",
                           self.name, n, 2 * f + 3)
        if n == 1:
            return np.zeros(1)
        neighbours = min(n - 1, max(1, n - f - 2))
        distances = self._pairwise_sq_distances()
        others = np.sort(distances, axis=1)[:, 1:]  # drop the zero distance to itself
        return np.asarray(others[:, :neighbours].sum(axis=1))

    def _keep(self, n: int) -> int:
        wanted = self.num_selected if self.num_selected is not None else n - self.num_byzantine
        return min(n, max(1, wanted))

    def _combine(self) -> np.ndarray:
        scores = self.krum_scores()
        order = np.argsort(scores, kind="stable")[: self._keep(len(self._updates))]
        self.selected = [int(i) for i in order]
        self.scores = [float(s) for s in scores]
        logger.info("%s: kept updates %s of %d", self.name, self.selected, len(self._updates))
        weights = np.asarray([self._weights[i] for i in self.selected], dtype=np.float64)
        total = np.zeros(self._size, dtype=np.float64)
        for w, i in zip(weights / weights.sum(), self.selected, strict=True):
            total += w * self._updates[i]
        return total.astype(FLOAT32)


class Krum(MultiKrum):
    """Keep the single update with the lowest Krum score.

    Args:
        num_byzantine: ``f``, the most Byzantine clients tolerated.
    """

    name: ClassVar[str] = "krum"

    def __init__(self, *, num_byzantine: int = 0) -> None:
        super().__init__(num_byzantine=num_byzantine, num_selected=1)

    def config(self) -> dict[str, ParamValue]:
        """``f``."""
        return {"num_byzantine": self.num_byzantine}
