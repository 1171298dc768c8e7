"""Weight matrix -> `QuantizedWeight`: Sinkhorn normalisation per tile, then group RTN, then packing.

A tile is the ``N x g`` column slab that one quantization group spans, so the tile's row scale
folds straight into that group's scales and its column scale becomes ``t`` for those ``g``
input channels. All tiles of a matrix are processed in one batch (no Python loop per group);
a last partial tile (K not a multiple of g) is processed as a batch of its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import packing
from .record import QuantizedWeight
from .rtn import quantize_groups
from .sinkhorn import sinkhorn_scales


class QuantizationError(ValueError):
    """A weight cannot be quantized; the message names the layer and the problem."""


def check_weight(weight: torch.Tensor, name: str = "weight") -> None:
    if weight.dim() != 2:
        raise QuantizationError(f"{name}: expected a 2-D weight, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if n == 0 or k == 0:
        raise QuantizationError(f"{name}: weight is empty (shape {n}x{k})")
    if n < 2:
        raise QuantizationError(
            f"{name}: weight has a single output row (shape {n}x{k}); row/column normalisation "
            "and group statistics need at least 2 rows - exclude this layer"
        )
    if not bool(torch.isfinite(weight).all()):
        bad = int((~torch.isfinite(weight)).sum())
        raise QuantizationError(f"{name}: weight contains {bad} NaN/Inf value(s)")


def kurtosis(weight: torch.Tensor) -> float:
    """Whole-matrix (non-excess) kurtosis E[(w-mu)^4] / E[(w-mu)^2]^2, as the reference gate uses."""
    # float32 centred moments: as accurate as float64 here (3e-7 relative) at a third of the cost.
    c = weight.float().flatten()
    c = c - c.mean()
    c2 = c.square()
    var = c2.mean().clamp_min(1e-12)
    return float(c2.square().mean() / var.square())


def _tiles(weight: torch.Tensor, g: int) -> list[torch.Tensor]:
    """``[N, K]`` -> batches ``[T, N, g]`` of full tiles, plus ``[1, N, K % g]`` for a tail."""
    n, k = weight.shape
    full = k // g
    out = []
    if full:
        out.append(weight[:, : full * g].reshape(n, full, g).permute(1, 0, 2))
    if k % g:
        out.append(weight[:, full * g :].unsqueeze(0))
    return out


def _quantize_tiles(
    tiles: torch.Tensor, bits: int, symmetric: bool, normalise: bool, iters: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch of tiles -> (codes [N, T*w], scales [N, T], zeros [N, T], col_scale [T*w])."""
    t, n, w = tiles.shape
    if normalise and w >= 2 and iters > 0:
        s = sinkhorn_scales(tiles, iters)
        row, col = s.row, s.col
        normalised = tiles / (row.unsqueeze(-1) * col.unsqueeze(1))
    else:
        row, col = torch.ones(t, n), torch.ones(t, w)
        normalised = tiles
    q = quantize_groups(normalised, bits, symmetric)
    codes = q.codes.permute(1, 0, 2).reshape(n, t * w)
    scales = (q.scales * row).T
    zeros = q.zeros.T
    return codes, scales, zeros, col.reshape(t * w)


def quantize_weight(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    method: str = "sinq",
    symmetric: bool = False,
    sinkhorn_iters: int = 16,
    kurtosis_gate: float | None = None,
    name: str = "weight",
) -> QuantizedWeight:
    """Quantize one ``[N, K]`` weight with SINQ (``method="sinq"``) or plain RTN (``"rtn"``)."""
    check_weight(weight, name)
    w = weight.detach().to(torch.float32).cpu()
    normalise = method == "sinq"
    if normalise and kurtosis_gate is not None and kurtosis(w) > kurtosis_gate:
        normalise = False
    parts = [_quantize_tiles(t, bits, symmetric, normalise, sinkhorn_iters)
             for t in _tiles(w, group_size)]
    codes, scales, zeros, col = (torch.cat(x, dim=-1) for x in zip(*parts))
    return QuantizedWeight(
        packed=packing.pack_codes(codes, bits, group_size),
        scales=scales.contiguous(),
        zero_points=packing.pack_zero_points(zeros, bits),
        col_scale=col.contiguous() if normalise else None,
        bits=bits,
        group_size=group_size,
        shape=(w.shape[0], w.shape[1]),
    )


def split_rows(q: QuantizedWeight, sizes: Sequence[int]) -> list[QuantizedWeight]:
    """Split a record quantized from row-concatenated weights back into one record per weight.

    Every piece gets its own storage (clones, not views): records are saved with safetensors,
    which refuses tensors that share memory.
    """
    out, start = [], 0
    for size in sizes:
        rows = slice(start, start + size)
        out.append(
            QuantizedWeight(
                packed=q.packed[rows].clone(),
                scales=q.scales[rows].clone(),
                zero_points=q.zero_points[rows].clone(),
                col_scale=None if q.col_scale is None else q.col_scale.clone(),
                bits=q.bits,
                group_size=q.group_size,
                shape=(size, q.in_features),
            )
        )
        start += size
    return out


def quantize_jointly(
    weights: Sequence[torch.Tensor], names: Sequence[str], **kwargs
) -> list[QuantizedWeight]:
    """Quantize weights that read the same input with one shared column scale ``t``.

    Sinkhorn runs on the row-concatenation ``[sum N_i, K]``: rows stay independent (their
    scales fold into each layer's group scales) while the columns - the shared input
    channels - get one ``t``, which can then be folded into the preceding norm weight exactly.
    """
    for w, name in zip(weights, names):
        check_weight(w, name)
    if len({w.shape[1] for w in weights}) != 1:
        raise QuantizationError(f"{', '.join(names)}: joint quantization needs one common K")
    joint = quantize_weight(torch.cat([w.float() for w in weights]), name="+".join(names), **kwargs)
    return split_rows(joint, [w.shape[0] for w in weights])


def relative_error(weight: torch.Tensor, q: QuantizedWeight) -> float:
    """Relative Frobenius reconstruction error ||W - W_hat||_F / ||W||_F."""
    w = weight.detach().float()
    return float(torch.linalg.norm(w - q.dequantize()) / torch.linalg.norm(w).clamp_min(1e-30))
