"""The only module that knows the packed byte layout.

Layout (onnxruntime ``com.microsoft::MatMulNBits`` and our ``sinq.ops::SinqMatMulNBits``):

* codes ``B``: uint8 ``[N, n_blocks, block_size * bits / 8]`` where
  ``n_blocks = ceil(K / block_size)``. Inside one block the codes form one continuous
  LSB-first bitstream along K: code ``i`` occupies bits ``[i*bits, (i+1)*bits)``. For
  bits 2/4/8 this is exactly MatMulNBits' "low bits first" byte packing (4-bit: even k in
  the low nibble); for 3/5/6 it is the custom-op format. Columns past K in the last block
  are padded with code 0.
* zero points: uint8 ``[N, ceil(n_blocks * bits / 8)]``, one LSB-first bitstream per row.
* scales: ``[N, n_blocks]`` (not packed; handled by the record).

Everything is vectorised torch integer arithmetic: codes are gathered eight at a time
(8 codes x bits <= 64 bits) into one integer word, which is then split into ``bits`` bytes.
"""

from __future__ import annotations

import math

import torch

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)
STOCK_BITS = (2, 4, 8)  # what stock MatMulNBits runs


def n_blocks(k: int, block_size: int) -> int:
    return math.ceil(k / block_size)


def packed_block_bytes(block_size: int, bits: int) -> int:
    return block_size * bits // 8


def packed_zero_point_bytes(blocks: int, bits: int) -> int:
    return math.ceil(blocks * bits / 8)


def container_bits(bits: int) -> int:
    """Smallest width stock MatMulNBits runs that holds ``bits``-bit codes (3 -> 4, 5/6/7 -> 8)."""
    for b in STOCK_BITS:
        if bits <= b:
            return b
    raise ValueError(f"bits={bits} exceeds 8")


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; choose one of {SUPPORTED_BITS}")


def _word_dtype(bits: int) -> torch.dtype:
    # 8 codes of `bits` bits: int32 holds up to 3-bit words (24 bits) without touching the sign.
    return torch.int32 if bits <= 3 else torch.int64


def _pack_stream(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``[..., L]`` codes (L a multiple of 8) into ``[..., L*bits/8]`` bytes, LSB first."""
    *lead, length = codes.shape
    assert length % 8 == 0
    words = codes.reshape(*lead, length // 8, 8).to(_word_dtype(bits))
    word = words[..., 0].clone()
    for i in range(1, 8):  # OR the 8 code slices into one word: no [..., 8] temporaries
        word |= words[..., i] << (i * bits)
    out = torch.empty(*lead, length // 8, bits, dtype=torch.uint8)
    for j in range(bits):
        out[..., j] = ((word >> (8 * j)) & 0xFF).to(torch.uint8)
    return out.reshape(*lead, length // 8 * bits)


def _unpack_stream(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of `_pack_stream`: ``[..., length*bits/8]`` bytes -> ``[..., length]`` codes."""
    *lead, nbytes = packed.shape
    assert length % 8 == 0 and nbytes == length // 8 * bits
    chunks = packed.reshape(*lead, length // 8, bits).to(_word_dtype(bits))
    word = chunks[..., 0].clone()
    for j in range(1, bits):
        word |= chunks[..., j] << (8 * j)
    mask = (1 << bits) - 1
    out = torch.empty(*lead, length // 8, 8, dtype=torch.uint8)
    for i in range(8):
        out[..., i] = ((word >> (i * bits)) & mask).to(torch.uint8)
    return out.reshape(*lead, length)


def pack_codes(codes: torch.Tensor, bits: int, block_size: int) -> torch.Tensor:
    """``[N, K]`` integer codes in ``[0, 2^bits)`` -> uint8 ``[N, n_blocks, block_size*bits/8]``."""
    _check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [N, K], got shape {tuple(codes.shape)}")
    if block_size % 8:
        raise ValueError(f"block_size={block_size} must be a multiple of 8")
    n, k = codes.shape
    nb = n_blocks(k, block_size)
    padded = torch.zeros(n, nb * block_size, dtype=torch.uint8)
    padded[:, :k] = codes.to(torch.uint8)
    if bits == 8:
        return padded.reshape(n, nb, block_size)
    if bits == 4:  # fast path, same layout as the generic stream
        p = padded.reshape(n, nb, block_size // 2, 2)
        return (p[..., 0] | (p[..., 1] << 4)).contiguous()
    return _pack_stream(padded.reshape(n, nb, block_size), bits)


def unpack_codes(packed: torch.Tensor, bits: int, block_size: int, k: int) -> torch.Tensor:
    """uint8 ``[N, n_blocks, block_size*bits/8]`` -> uint8 codes ``[N, K]``."""
    _check_bits(bits)
    n, nb, nbytes = packed.shape
    if nbytes != packed_block_bytes(block_size, bits) or nb != n_blocks(k, block_size):
        raise ValueError(
            f"packed shape {tuple(packed.shape)} does not match K={k}, bits={bits}, "
            f"block_size={block_size}"
        )
    if bits == 8:
        codes = packed
    elif bits == 4:
        codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1)
    else:
        codes = _unpack_stream(packed, bits, block_size)
    return codes.reshape(n, nb * block_size)[:, :k].contiguous()


def pack_zero_points(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """``[N, n_blocks]`` integer zero points -> uint8 ``[N, ceil(n_blocks*bits/8)]``."""
    _check_bits(bits)
    n, nb = zeros.shape
    padded_len = math.ceil(nb / 8) * 8
    padded = torch.zeros(n, padded_len, dtype=torch.uint8)
    padded[:, :nb] = zeros.to(torch.uint8)
    stream = padded if bits == 8 else _pack_stream(padded, bits)
    return stream[:, : packed_zero_point_bytes(nb, bits)].contiguous()


def unpack_zero_points(packed: torch.Tensor, bits: int, blocks: int) -> torch.Tensor:
    """uint8 ``[N, ceil(n_blocks*bits/8)]`` -> uint8 zero points ``[N, n_blocks]``."""
    _check_bits(bits)
    n, nbytes = packed.shape
    if nbytes != packed_zero_point_bytes(blocks, bits):
        raise ValueError(
            f"packed zero points have {nbytes} bytes per row, expected "
            f"{packed_zero_point_bytes(blocks, bits)} for {blocks} blocks at {bits} bits"
        )
    if bits == 8:
        return packed.clone()
    padded_len = math.ceil(blocks / 8) * 8
    full = torch.zeros(n, padded_len * bits // 8, dtype=torch.uint8)
    full[:, :nbytes] = packed
    return _unpack_stream(full, bits, padded_len)[:, :blocks].contiguous()


def default_zero_point(bits: int) -> int:
    """What MatMulNBits assumes when the zero_points input is absent."""
    return 1 << (bits - 1)
