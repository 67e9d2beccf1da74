"""Shamir's t-of-n secret sharing over the prime field GF(2^521 - 1).

The building block of secure aggregation (Bonawitz et al. 2017): a device shares
its self-mask seed and its mask key among the round's devices, so that any ``t`` of
them can rebuild what a dropped device would have removed, while ``t - 1`` learn
nothing (every secret is equally consistent with ``t - 1`` shares). Written here
because no maintained library of the field offers it for arbitrary byte strings;
it is small, and ``tests/test_shamir.py`` checks it against the defining formulas.

A secret is up to 64 bytes (an X25519 private key or a 32-byte seed fit), read as a
big-endian integer below the Mersenne prime ``P = 2^521 - 1``. The polynomial's
coefficients come from :mod:`secrets`. Share ``i`` is ``(i, f(i))`` for
``i = 1..n``, serialized as 2 bytes of ``i`` and 66 bytes of ``f(i)``.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

P = (1 << 521) - 1
"""The field's prime (a Mersenne prime: 2^521 - 1)."""
MAX_SECRET_BYTES = 64
MAX_SHARES = 65_535
Y_BYTES = 66
SHARE_BYTES = 2 + Y_BYTES


class ShamirError(ValueError):
    """Bad parameters, or shares that cannot rebuild a secret."""


@dataclass(frozen=True, slots=True)
class Share:
    """One point ``(x, f(x))`` of the sharing polynomial."""

    x: int
    y: int

    def to_bytes(self) -> bytes:
        """2 bytes of ``x``, 66 of ``y`` (big-endian)."""
        return self.x.to_bytes(2, "big") + self.y.to_bytes(Y_BYTES, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        """The share of :meth:`to_bytes`.

        Raises:
            ShamirError: wrong length, ``x`` zero, or ``y`` outside the field.
        """
        if len(data) != SHARE_BYTES:
            raise ShamirError(f"a share is {SHARE_BYTES} bytes, got {len(data)}")
        x, y = int.from_bytes(data[:2], "big"), int.from_bytes(data[2:], "big")
        if x == 0 or y >= P:
            raise ShamirError("share out of range")
        return cls(x, y)


def split(secret: bytes, threshold: int, count: int) -> list[Share]:
    """``count`` shares of ``secret`` (at x = 1..count), any ``threshold`` of which rebuild it.

    Raises:
        ShamirError: ``1 <= threshold <= count <= 65535`` does not hold, or the
            secret is longer than 64 bytes.
    """
    if not 1 <= count <= MAX_SHARES:
        raise ShamirError(f"need 1 <= count ({count}) <= {MAX_SHARES}")
    return split_at(secret, threshold, range(1, count + 1))


def split_at(secret: bytes, threshold: int, xs: Sequence[int]) -> list[Share]:
    """Shares of ``secret`` at the points ``xs`` (in that order), any ``threshold`` rebuild it.

    Secure aggregation with a sparse neighbour graph gives shares to a device's
    neighbours only, each at its place in the roster.

    Raises:
        ShamirError: ``1 <= threshold <= len(xs)`` does not hold, a point repeats or is
            outside 1..65535, or the secret is longer than 64 bytes.
    """
    if not 1 <= threshold <= len(xs):
        raise ShamirError(f"need 1 <= threshold ({threshold}) <= count ({len(xs)})")
    if len(set(xs)) != len(xs) or not all(1 <= x <= MAX_SHARES for x in xs):
        raise ShamirError(f"share points must be distinct and within 1..{MAX_SHARES}")
    if len(secret) > MAX_SECRET_BYTES:
        raise ShamirError(f"secrets are at most {MAX_SECRET_BYTES} bytes")
    coefficients = [int.from_bytes(secret, "big"), *random_elements(threshold - 1)]
    return [Share(x, evaluate(coefficients, x)) for x in xs]


_ELEMENT_BYTES = (P.bit_length() + 64 + 7) // 8
"""Random bytes per field element: 64 bits more than ``P``, so that reducing them modulo
``P`` is uniform within 2^-64 (FIPS 186's extra-random-bits method)."""


def random_elements(count: int) -> list[int]:
    """``count`` uniformly random elements of the field, from one read of the OS's generator.

    A read per element (``secrets.randbelow``) released and took back the interpreter
    lock each time: in a simulated fleet every one of those waited behind the other
    devices' threads.
    """
    pool = secrets.token_bytes(count * _ELEMENT_BYTES)
    return [int.from_bytes(pool[i:i + _ELEMENT_BYTES], "big") % P
            for i in range(0, len(pool), _ELEMENT_BYTES)]


def evaluate(coefficients: Sequence[int], x: int) -> int:
    """``f(x) mod P`` for ``f = c0 + c1 x + ...`` (Horner)."""
    value = 0
    for c in reversed(coefficients):
        value = (value * x + c) % P
    return value


def weights(xs: Sequence[int], at: int) -> list[int]:
    """Lagrange weights: ``f(at) = sum(w_i * f(xs[i]))``, ``f`` of degree ``len(xs) - 1``.

    They depend on the points only, so one set serves every secret shared among the
    same holders.

    Raises:
        ShamirError: no points, or a repeated one.
    """
    if not xs:
        raise ShamirError("no shares")
    if len(set(xs)) != len(xs):
        raise ShamirError("shares repeat an x")
    out = []
    for i, xi in enumerate(xs):
        numerator, denominator = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                numerator = numerator * (at - xj) % P
                denominator = denominator * (xi - xj) % P
        out.append(numerator * pow(denominator, -1, P) % P)
    return out


def interpolate(shares: Sequence[Share], x: int, lagrange: Sequence[int] | None = None) -> int:
    """``f(x)`` of the polynomial of degree ``len(shares) - 1`` through ``shares``.

    ``lagrange``: the :func:`weights` of the shares' points at ``x``, when known.

    Raises:
        ShamirError: no shares, or repeated ``x``.
    """
    if lagrange is None:
        lagrange = weights([s.x for s in shares], x)
    return sum(s.y * w for s, w in zip(shares, lagrange, strict=True)) % P


def combine(shares: Sequence[Share], length: int,
            lagrange: Sequence[int] | None = None) -> bytes:
    """The secret of ``length`` bytes from at least ``threshold`` distinct shares.

    With fewer than the threshold the result is a field element unrelated to the
    secret (this cannot be detected: that is the point of the scheme). ``lagrange``:
    the shares' :func:`weights` at 0, when known.

    Raises:
        ShamirError: no shares, repeated ``x``, or a result longer than ``length``.
    """
    secret = interpolate(shares, 0, lagrange)
    if secret >= 1 << (8 * length):
        raise ShamirError("the shares do not rebuild a secret of that length")
    return secret.to_bytes(length, "big")


def consistent(shares: Sequence[Share], threshold: int,
               lagrange: Sequence[Sequence[int]] | None = None) -> bool:
    """Whether every share lies on the polynomial the first ``threshold`` define.

    A share altered in transit or by a dishonest holder shows up when there are more.
    ``lagrange``: for each further share, the first shares' :func:`weights` at its x.
    """
    base = list(shares[:threshold])
    extra = shares[threshold:]
    if lagrange is None:
        lagrange = [weights([b.x for b in base], s.x) for s in extra]
    return all(interpolate(base, s.x, w) == s.y for s, w in zip(extra, lagrange, strict=True))
