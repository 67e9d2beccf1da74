"""Shamir sharing (schemas/shamir.py) against its definition: the polynomial evaluated
independently, reconstruction from every t-subset, and secrecy with t - 1 shares."""

from __future__ import annotations

import itertools
import os
import random

import pytest

from schemas.shamir import SHARE_BYTES, P, ShamirError, Share, combine, random_elements, split


def test_the_field_is_the_mersenne_prime_m521() -> None:
    assert P == 2 ** 521 - 1
    assert pow(3, P - 1, P) == 1 and pow(7, P - 1, P) == 1  # Fermat witnesses


def test_shares_are_the_polynomial_at_1_to_n() -> None:
    # A hand-written polynomial, evaluated term by term (not by the module's Horner).
    secret = bytes(range(32))
    s = int.from_bytes(secret, "big")
    a1, a2 = 123456789, 2 ** 400 + 17
    shares = [Share(x, (s + a1 * x + a2 * x * x) % P) for x in range(1, 6)]
    for subset in itertools.combinations(shares, 3):
        assert combine(list(subset), 32) == secret
    assert combine(shares, 32) == secret  # more than t: the same polynomial


def test_random_coefficients_cover_the_field() -> None:
    """Elements below P, all different, their top bits spread (not bytes-sized values)."""
    elements = random_elements(2000)
    assert len(set(elements)) == 2000 and all(0 <= e < P for e in elements)
    top = [e >> 520 for e in elements]  # the highest bit of a uniform element: ~half set
    assert 900 < sum(top) < 1100
    assert random_elements(0) == []


@pytest.mark.parametrize(("t", "n"), [(1, 1), (2, 3), (3, 5), (4, 7)])
def test_every_t_subset_rebuilds_the_secret(t: int, n: int) -> None:
    secret = os.urandom(32)
    shares = split(secret, t, n)
    assert [s.x for s in shares] == list(range(1, n + 1))
    for subset in itertools.combinations(shares, t):
        assert combine(list(subset), 32) == secret


def _lagrange_at(points: list[tuple[int, int]], x: int) -> int:
    """The polynomial through ``points`` evaluated at ``x`` (the textbook formula)."""
    value = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (x - xj) % P
                den = den * (xi - xj) % P
        value = (value + yi * num * pow(den, -1, P)) % P
    return value


def test_t_minus_1_shares_are_consistent_with_any_secret() -> None:
    # Perfect secrecy: for ANY candidate secret, some t-th share completes the t - 1
    # known ones into a sharing of that candidate; so t - 1 shares say nothing.
    rng = random.Random(11)
    t, n = 4, 6
    known = split(os.urandom(32), t, n)[: t - 1]
    for _ in range(5):
        candidate = rng.getrandbits(256).to_bytes(32, "big")
        points = [(0, int.from_bytes(candidate, "big")), *((s.x, s.y) for s in known)]
        completing = Share(n, _lagrange_at(points, n))
        assert combine([*known, completing], 32) == candidate


def test_shares_serialize_and_bad_input_is_refused() -> None:
    shares = split(b"\x01" * 32, 2, 3)
    data = shares[0].to_bytes()
    assert len(data) == SHARE_BYTES and Share.from_bytes(data) == shares[0]
    with pytest.raises(ShamirError):
        Share.from_bytes(data[:-1])
    with pytest.raises(ShamirError):
        Share.from_bytes(b"\x00\x00" + data[2:])
    with pytest.raises(ShamirError):
        split(b"x", 3, 2)
    with pytest.raises(ShamirError):
        split(b"x" * 65, 2, 3)
    with pytest.raises(ShamirError):
        combine([shares[0], shares[0]], 32)
    with pytest.raises(ShamirError):
        combine([], 32)
