"""Philox4x32-10 of the masking spec: Random123 known answers and the token-key layout."""

from __future__ import annotations

import pytest
import torch

from pyimputmae.reference.philox import philox4x32, split_u64, token_keys

U32 = 0xFFFFFFFF

# Random123's known-answer vectors for philox4x32_10 (counter, key, expected output)
KNOWN_ANSWERS = {
    "zeros": ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    "all_ones": ((U32, U32, U32, U32), (U32, U32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    "pi_digits": ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
                  (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
}


def _philox_python(ctr: tuple[int, ...], key: tuple[int, int]) -> tuple[int, int, int, int]:
    """Philox4x32-10 on Python integers, written from the paper, to check the tensor version."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0, p1 & U32, (p0 >> 32) ^ c3 ^ k1, p0 & U32)
        k0, k1 = (k0 + 0x9E3779B9) & U32, (k1 + 0xBB67AE85) & U32
    return c0, c1, c2, c3


def _as_unsigned(v: int) -> int:
    return v & 0xFFFFFFFFFFFFFFFF


@pytest.mark.parametrize("name", KNOWN_ANSWERS)
def test_philox4x32_matches_random123_known_answers(name: str) -> None:
    ctr, key, expected = KNOWN_ANSWERS[name]
    words = philox4x32(*(torch.tensor(c, dtype=torch.int64) for c in ctr),
                       *(torch.tensor(k, dtype=torch.int64) for k in key))
    got = tuple(int(w) for w in words)
    assert got == expected, f"{name}: got {[hex(w) for w in got]}, want {[hex(w) for w in expected]}"


def test_python_twin_matches_known_answers() -> None:
    """The test's own twin must agree with Random123 before it is used as an oracle below."""
    for ctr, key, expected in KNOWN_ANSWERS.values():
        assert _philox_python(ctr, key) == expected


def test_philox4x32_broadcasts_and_stays_in_uint32_range() -> None:
    ctr = torch.randint(0, 2**32, (4, 64), dtype=torch.int64)
    key = torch.randint(0, 2**32, (2,), dtype=torch.int64)
    words = philox4x32(ctr[0], ctr[1], ctr[2], ctr[3], key[0], key[1])
    for w in words:
        assert w.shape == (64,) and w.dtype == torch.int64
        assert int(w.min()) >= 0 and int(w.max()) <= U32
    for i in (0, 17, 63):
        expected = _philox_python(tuple(int(c) for c in ctr[:, i]), (int(key[0]), int(key[1])))
        assert tuple(int(w[i]) for w in words) == expected


@pytest.mark.parametrize("value", [0, 5, 2**32 + 7, 2**63 - 1, -1, -2, -(2**32), -(2**63)],
                         ids=lambda v: f"{v:+d}")
def test_split_u64_reads_int64_as_unsigned(value: int) -> None:
    lo, hi = split_u64(torch.tensor(value, dtype=torch.int64))
    u = _as_unsigned(value)
    assert (int(lo), int(hi)) == (u & U32, u >> 32)


@pytest.mark.parametrize("seed, offset", [(0, 0), (42, 3), (2**40 + 9, 2**33 + 1), (-1, -1), (-123456789, 77),
                                          (2**63 - 1, -(2**63))],
                         ids=["zero", "small", "big", "minus_one", "negative_seed", "extremes"])
def test_token_keys_follow_the_documented_counter_layout(seed: int, offset: int) -> None:
    """counter = (token, row, offset_lo, offset_hi), key = (seed_lo, seed_hi); negative int64 as unsigned."""
    rows, tokens = 3, 11
    keys = token_keys(torch.tensor([seed, offset], dtype=torch.int64), rows, tokens)
    assert keys.shape == (rows, tokens) and keys.dtype == torch.int64
    s, o = _as_unsigned(seed), _as_unsigned(offset)
    for row in range(rows):
        for token in range(tokens):
            expected = _philox_python((token, row, o & U32, o >> 32), (s & U32, s >> 32))[0]
            assert int(keys[row, token]) == expected, f"row {row}, token {token}"


def test_negative_seed_is_not_the_same_as_its_absolute_value() -> None:
    a = token_keys(torch.tensor([-5, 0]), 2, 8)
    b = token_keys(torch.tensor([5, 0]), 2, 8)
    assert not torch.equal(a, b)


@pytest.mark.gpu
def test_token_keys_are_identical_on_cuda() -> None:
    rng = torch.tensor([-987654321, 2**35 + 3], dtype=torch.int64)
    assert torch.equal(token_keys(rng.cuda(), 5, 40).cpu(), token_keys(rng, 5, 40))
