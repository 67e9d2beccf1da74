"""Split a labelled data set across simulated devices (pure numpy, deterministic from a seed).

Three schemes, the usual ones of the federated-learning literature:

- ``iid``: shuffle, then cut into ``count`` parts of (almost) equal size.
- ``dirichlet``: label skew. For each class, the shares of its samples given to
  the devices are drawn from ``Dir(alpha)`` (Hsu et al. 2019; NIID-Bench, Li et
  al. 2022): a small ``alpha`` (0.1) gives each device a few dominant classes, a
  large one (100) approaches IID. As in NIID-Bench, a device that already holds
  its fair share (``n / count``) takes no more samples, and the draw is repeated
  until every device holds at least ``min_size`` samples. Should :data:`MAX_DRAWS`
  draws fail (many devices, tiny ``alpha``), the best one is repaired by moving
  random samples from the largest devices to the smallest.
- ``shards``: pathological label skew (McMahan et al. 2017). Samples sorted by
  label are cut into ``count * shards_per_device`` contiguous shards and each
  device gets ``shards_per_device`` of them at random, hence about that many labels.

Every sample goes to exactly one device; each device's indices are sorted.
"""

from __future__ import annotations

import logging
from typing import Final, Literal, get_args

import numpy as np

logger = logging.getLogger(__name__)

Scheme = Literal["iid", "dirichlet", "shards"]
SCHEMES: Final[tuple[str, ...]] = get_args(Scheme)
DEFAULT_MIN_SIZE: Final = 10
"""Samples every device gets at least under ``dirichlet`` (lowered when data is scarce)."""
MAX_DRAWS: Final = 100
"""Dirichlet draws tried for the minimum size before topping up the best one."""


class PartitionError(ValueError):
    """The data cannot be partitioned as asked (bad parameters, too few samples)."""

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(f"cannot partition: {detail}")


def check_partition_config(count: int, scheme: str, alpha: float, shards_per_device: int) -> None:
    """Validate partition parameters that do not depend on the data.

    Raises:
        PartitionError: ``count`` < 1, unknown ``scheme``, ``alpha`` <= 0 or not
            finite, ``shards_per_device`` < 1.
    """
    if count < 1:
        raise PartitionError(f"count must be >= 1, got {count}")
    if scheme not in SCHEMES:
        raise PartitionError(f"unknown scheme {scheme!r}, expected one of {SCHEMES}")
    if not (np.isfinite(alpha) and alpha > 0):
        raise PartitionError(f"alpha must be a positive finite number, got {alpha}")
    if shards_per_device < 1:
        raise PartitionError(f"shards_per_device must be >= 1, got {shards_per_device}")


def partition_indices(
    labels: np.ndarray,
    count: int,
    scheme: Scheme,
    alpha: float = 0.5,
    shards_per_device: int = 2,
    seed: int = 0,
    *,
    min_size: int = DEFAULT_MIN_SIZE,
) -> list[np.ndarray]:
    """Assign every sample to one of ``count`` devices.

    Args:
        labels: 1-D array of class labels, one per sample.
        count: number of devices.
        scheme: ``iid``, ``dirichlet`` or ``shards``.
        alpha: Dirichlet concentration (``dirichlet`` only).
        shards_per_device: shards, hence about labels, per device (``shards`` only).
        seed: seed of the random generator; the same inputs give the same partition.
        min_size: least samples per device under ``dirichlet``; lowered to
            ``len(labels) // (2 * count)`` (at least 1) when the data is too small.

    Returns:
        ``count`` sorted int64 index arrays, disjoint, covering ``range(len(labels))``.

    Raises:
        PartitionError: bad parameters, or fewer samples than devices (or shards).
    """
    check_partition_config(count, scheme, alpha, shards_per_device)
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise PartitionError(f"labels must be 1-D, got shape {labels.shape}")
    if len(labels) < count:
        raise PartitionError(f"{len(labels)} samples for {count} devices")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(len(labels)), count)
    elif scheme == "dirichlet":
        least = max(1, min(min_size, len(labels) // (2 * count)))
        parts = _dirichlet(labels, count, alpha, least, rng)
    else:
        parts = _shards(labels, count, shards_per_device, rng)
    return [np.sort(part).astype(np.int64) for part in parts]


def _dirichlet(
    labels: np.ndarray, count: int, alpha: float, min_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    fair_share = len(labels) / count
    by_class = [np.flatnonzero(labels == k) for k in np.unique(labels)]
    best: list[np.ndarray] = []
    for draw in range(1, MAX_DRAWS + 1):
        parts = _dirichlet_draw(by_class, count, alpha, fair_share, rng)
        smallest = min(len(p) for p in parts)
        if smallest >= min_size:
            logger.debug("dirichlet partition: %d draw(s), smallest device %d", draw, smallest)
            return parts
        if not best or smallest > min(len(p) for p in best):
            best = parts
    logger.warning("no Dirichlet(alpha=%s) draw in %d gave each of %d devices >= %d samples; "
                   "topping the smallest up from the largest", alpha, MAX_DRAWS, count, min_size)
    return _top_up(best, min_size, rng)


def _dirichlet_draw(
    by_class: list[np.ndarray], count: int, alpha: float, fair_share: float,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    pieces: list[list[np.ndarray]] = [[] for _ in range(count)]
    sizes = np.zeros(count, dtype=np.int64)
    for members in by_class:
        shuffled = rng.permutation(members)
        open_devices = sizes < fair_share  # a device holding its fair share takes no more
        shares = np.where(open_devices, rng.dirichlet(np.full(count, alpha)), 0.0)
        total = shares.sum()
        if not total > 0:  # every open device drew ~0: spread evenly among them
            shares, total = open_devices.astype(np.float64), float(open_devices.sum())
        cuts = (np.cumsum(shares / total) * len(shuffled)).astype(np.int64)[:-1]
        for device, piece in enumerate(np.split(shuffled, cuts)):
            pieces[device].append(piece)
            sizes[device] += len(piece)
    return [np.concatenate(p) for p in pieces]


def _top_up(parts: list[np.ndarray], min_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Move random samples from the largest devices to those below ``min_size``."""
    parts = [rng.permutation(p) for p in parts]
    for device in np.argsort([len(p) for p in parts], kind="stable"):
        while (missing := min_size - len(parts[device])) > 0:
            donor = int(np.argmax([len(p) for p in parts]))
            moved = min(missing, len(parts[donor]) - min_size)
            parts[device] = np.concatenate([parts[device], parts[donor][:moved]])
            parts[donor] = parts[donor][moved:]
    return parts


def _shards(
    labels: np.ndarray, count: int, shards_per_device: int, rng: np.random.Generator
) -> list[np.ndarray]:
    n_shards = count * shards_per_device
    if len(labels) < n_shards:
        raise PartitionError(f"{len(labels)} samples for {n_shards} shards")
    shuffled = rng.permutation(len(labels))  # random order within each label
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = np.array_split(by_label, n_shards)
    dealt = rng.permutation(n_shards).reshape(count, shards_per_device)
    return [np.concatenate([shards[s] for s in mine]) for mine in dealt]
