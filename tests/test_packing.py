"""Pack/unpack: exact round trips and agreement with a bit-by-bit NumPy reference."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sinq_export.quant import packing

BITS = list(range(2, 9))
GROUPS = [16, 32, 64, 128, 256]


def reference_bitstream(codes: np.ndarray, bits: int) -> np.ndarray:
    """One block, bit by bit: code i occupies bits [i*bits, (i+1)*bits), LSB first."""
    out = np.zeros(len(codes) * bits // 8, dtype=np.uint8)
    for i, c in enumerate(codes):
        for b in range(bits):
            pos = i * bits + b
            out[pos // 8] |= ((int(c) >> b) & 1) << (pos % 8)
    return out


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", GROUPS)
def test_round_trip_all_widths_and_groups(bits, group):
    k = 2 * group + group // 2 + 3  # not a multiple of the group
    codes = torch.randint(0, 1 << bits, (5, k), dtype=torch.uint8)
    packed = packing.pack_codes(codes, bits, group)
    assert packed.shape == (5, 3, group * bits // 8)
    assert packed.dtype == torch.uint8
    assert torch.equal(packing.unpack_codes(packed, bits, group, k), codes)


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    group=st.sampled_from(GROUPS),
    n=st.integers(1, 4),
    k=st.integers(1, 600),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_matches_bitwise_reference(bits, group, n, k, seed):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 1 << bits, size=(n, k), dtype=np.uint8)
    packed = packing.pack_codes(torch.from_numpy(codes), bits, group).numpy()
    nb = packing.n_blocks(k, group)
    padded = np.zeros((n, nb * group), dtype=np.uint8)
    padded[:, :k] = codes
    for r in range(n):
        for b in range(nb):
            expected = reference_bitstream(padded[r, b * group:(b + 1) * group], bits)
            np.testing.assert_array_equal(packed[r, b], expected)
    assert np.array_equal(packing.unpack_codes(torch.from_numpy(packed), bits, group, k).numpy(), codes)


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(BITS), n=st.integers(1, 5), blocks=st.integers(1, 40),
       seed=st.integers(0, 2**31 - 1))
def test_zero_points_round_trip_and_layout(bits, n, blocks, seed):
    rng = np.random.default_rng(seed)
    zeros = rng.integers(0, 1 << bits, size=(n, blocks), dtype=np.uint8)
    packed = packing.pack_zero_points(torch.from_numpy(zeros), bits)
    assert packed.shape == (n, -(-blocks * bits // 8))
    padded = np.zeros(-(-blocks // 8) * 8, dtype=np.uint8)
    for r in range(n):
        padded[:blocks] = zeros[r]
        expected = reference_bitstream(padded, bits)[: packed.shape[1]]
        np.testing.assert_array_equal(packed[r].numpy(), expected)
    assert np.array_equal(packing.unpack_zero_points(packed, bits, blocks).numpy(), zeros)


def test_four_bit_is_matmulnbits_nibble_order():
    codes = torch.zeros(1, 16, dtype=torch.uint8)
    codes[0, 0], codes[0, 1] = 0x3, 0xA  # even k -> low nibble
    assert packing.pack_codes(codes, 4, 16)[0, 0, 0].item() == 0xA3


def test_container_bits():
    assert [packing.container_bits(b) for b in range(2, 9)] == [2, 4, 4, 8, 8, 8, 8]


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="bits=9"):
        packing.pack_codes(torch.zeros(2, 16, dtype=torch.uint8), 9, 16)
    with pytest.raises(ValueError, match="does not match"):
        packing.unpack_codes(torch.zeros(2, 1, 8, dtype=torch.uint8), 4, 16, 40)
