"""Group-wise uniform round-to-nearest quantizer (the second half of SINQ, and the RTN baseline).

Works on the last axis: every ``[..., g]`` slice is one group with one scale and one integer
zero point. Dequantisation is ``(q - z) * s``.

Why the range always contains 0 (asymmetric mode): MatMulNBits' fast kernels want integer zero
points inside ``[0, 2^bits - 1]``. Widening ``[min, max]`` to include 0 guarantees that with
no clamping error; it only costs resolution in groups whose values all share one sign, which
real weight groups of 16+ elements essentially never do (measured in bench/quant_bench.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_SCALE = 1e-10  # an all-zero group gets a tiny positive scale, never 0 or NaN


@dataclass(frozen=True)
class GroupQuant:
    codes: torch.Tensor  # uint8 [..., g]
    scales: torch.Tensor  # float32 [...]
    zeros: torch.Tensor  # uint8 [...]


def quantize_groups(x: torch.Tensor, bits: int, symmetric: bool = False) -> GroupQuant:
    """Quantize every last-axis group of ``x`` to ``bits``-bit codes with integer zero points."""
    qmax = (1 << bits) - 1
    x = x.float()
    if symmetric:
        half = 1 << (bits - 1)
        # Cover both the negative side (half levels) and the positive side (half-1 levels).
        scales = torch.maximum(x.amin(-1).neg() / half, x.amax(-1) / (half - 1))
        scales = scales.clamp_min(MIN_SCALE)
        zeros = torch.full_like(scales, float(half))
    else:
        lo = x.amin(-1).clamp(max=0.0)
        hi = x.amax(-1).clamp(min=0.0)
        scales = ((hi - lo) / qmax).clamp_min(MIN_SCALE)
        zeros = torch.round(-lo / scales).clamp(0, qmax)
    codes = torch.round(x / scales.unsqueeze(-1) + zeros.unsqueeze(-1)).clamp(0, qmax)
    return GroupQuant(codes.to(torch.uint8), scales, zeros.to(torch.uint8))


def dequantize_groups(q: GroupQuant) -> torch.Tensor:
    return (q.codes.float() - q.zeros.float().unsqueeze(-1)) * q.scales.unsqueeze(-1)
