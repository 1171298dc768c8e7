"""Group-wise uniform quantizer (the second half of SINQ, and the RTN baseline).

Works on the last axis: every ``[..., g]`` slice is one group with one scale and one integer
zero point. Dequantisation is ``(q - z) * s``.

Why the min/max range always contains 0 (asymmetric mode): MatMulNBits' fast kernels want
integer zero points inside ``[0, 2^bits - 1]``. Widening ``[min, max]`` to include 0 guarantees
that with no clamping error; it only costs resolution in groups whose values all share one
sign, which real weight groups of 16+ elements essentially never do (bench/quant_bench.py).

`search_params` improves on min/max under the same integer-zero-point constraint: it tries a
small grid of shrunken ranges per group (clipping the extremes buys resolution for the bulk)
and, for the best candidate, refits the scale by weighted least squares with codes and zero
point fixed. It minimises an importance-weighted squared error, so the same kernel serves the
calibration-free case (weights = t^2: the error in the original weight's units) and the
calibrated one (weights = t^2 * E[x^2], the diagonal of the layer's input Hessian).

`refit_params` keeps the min/max range (no clipping) and only refits each group's scale by
weighted least squares, re-rounding the codes each time (a few Lloyd-style steps, integer zero
point fixed). With the input energies as weights it is the calibration-free default's rounding
step: it makes the scale fit the weights that multiply loud input channels. Unlike the range
search it never clips, which is what made the search hurt on Qwen2.5-0.5B (docs/quality.md).
"""

from __future__ import annotations

import torch

MIN_SCALE = 1e-10  # an all-zero group gets a tiny positive scale, never 0 or NaN
# Range shrink factors tried by `search_params` (1.0 = plain min/max, always included).
SHRINK_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def _codes(x: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, qmax: int) -> torch.Tensor:
    return torch.round(x / scales.unsqueeze(-1) + zeros.unsqueeze(-1)).clamp(0, qmax)


def minmax_params(x: torch.Tensor, bits: int, symmetric: bool = False, shrink: float = 1.0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, integer zeros as float) of the min/max range of each group, shrunk by ``shrink``."""
    qmax = (1 << bits) - 1
    if symmetric:
        half = 1 << (bits - 1)
        # Cover both the negative side (half levels) and the positive side (half-1 levels).
        scales = torch.maximum(x.amin(-1).neg() / half, x.amax(-1) / (half - 1)) * shrink
        scales = scales.clamp_min(MIN_SCALE)
        return scales, torch.full_like(scales, float(half))
    lo = x.amin(-1).clamp(max=0.0) * shrink
    hi = x.amax(-1).clamp(min=0.0) * shrink
    scales = ((hi - lo) / qmax).clamp_min(MIN_SCALE)
    return scales, torch.round(-lo / scales).clamp(0, qmax)


def _offsets(x: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int
             ) -> torch.Tensor:
    """``q - z``: each element's rounded code relative to its group's zero point."""
    return _codes(x, scales, zeros, (1 << bits) - 1) - zeros.unsqueeze(-1)


def _weighted_error(x: torch.Tensor, importance: torch.Tensor, d: torch.Tensor,
                    scales: torch.Tensor) -> torch.Tensor:
    """``sum importance * (x - d s)^2`` of each group, for offsets ``d`` (`_offsets`)."""
    return (importance * (x - d * scales.unsqueeze(-1)).square()).sum(-1)


def group_error(x: torch.Tensor, importance: torch.Tensor, scales: torch.Tensor,
                zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Weighted squared error ``sum importance * (x - (q - z) s)^2`` of each group."""
    return _weighted_error(x, importance, _offsets(x, scales, zeros, bits), scales)


def refit_scales(x: torch.Tensor, importance: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Weighted least-squares scale for the codes and zero point of the current ``scales``."""
    d = _offsets(x, scales, zeros, bits)
    num = (importance * x * d).sum(-1)
    den = (importance * d.square()).sum(-1)
    fitted = torch.where(den > 0, num / den.clamp_min(1e-30), scales)
    return torch.where(fitted > MIN_SCALE, fitted, scales)


def search_params(x: torch.Tensor, bits: int, importance: torch.Tensor | None = None,
                  symmetric: bool = False, grid: tuple[float, ...] = SHRINK_GRID
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, zeros) minimising each group's weighted error over shrunken min/max ranges.

    The zero point stays an integer in ``[0, 2^bits - 1]``; the refit only moves the scale and
    is kept only where it lowers the error, so the result is never worse than min/max.
    """
    x = x.float()
    imp = torch.ones_like(x) if importance is None else importance.float().expand_as(x)
    best_s, best_z = minmax_params(x, bits, symmetric)
    best_e = group_error(x, imp, best_s, best_z, bits)
    for shrink in grid:
        if shrink == 1.0:
            continue
        s, z = minmax_params(x, bits, symmetric, shrink)
        e = group_error(x, imp, s, z, bits)
        better = e < best_e
        best_s, best_z, best_e = (torch.where(better, s, best_s), torch.where(better, z, best_z),
                                  torch.minimum(e, best_e))
    s = refit_scales(x, imp, best_s, best_z, bits)
    better = group_error(x, imp, s, best_z, bits) < best_e
    return torch.where(better, s, best_s), best_z


def refit_params(x: torch.Tensor, bits: int, importance: torch.Tensor, iters: int,
                 symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, zeros): min/max, then ``iters`` weighted least-squares refits of the scale.

    Each step rounds the codes on the current scale and solves ``min_s sum imp (x - d s)^2``
    for those codes (``d = q - z``); a group keeps the scale of least weighted error seen, so
    the result is never worse than min/max. The zero point stays the min/max integer.

    Why scratch tensors written in place: the steps are ~15 elementwise passes over
    ``x`` each, and fresh outputs for every pass made the refit twice as slow (it is most of
    a calibration-free export's quantization time).
    """
    x = x.float()
    imp = importance.float().expand_as(x)
    scales, zeros = minmax_params(x, bits, symmetric)
    z = zeros.unsqueeze(-1)
    d, wd, tmp = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)
    best_s, best_e, cur = scales, None, scales
    for step in range(iters + 1):  # one rounding per step serves its error and its refit
        s = cur.unsqueeze(-1)
        torch.div(x, s, out=d).add_(z).round_().clamp_(0, (1 << bits) - 1).sub_(z)
        err = torch.mul(d, s, out=tmp).neg_().add_(x).square_().mul_(imp).sum(-1)
        if best_e is None:
            best_e = err
        else:
            better = err < best_e
            best_s, best_e = torch.where(better, cur, best_s), torch.minimum(err, best_e)
        if step == iters:
            break
        torch.mul(imp, d, out=wd)
        num = torch.mul(wd, x, out=tmp).sum(-1)
        den = torch.mul(wd, d, out=tmp).sum(-1)
        fitted = torch.where(den > 0, num / den.clamp_min(1e-30), cur)
        cur = torch.where(fitted > MIN_SCALE, fitted, cur)
    return best_s, zeros
