"""Weight matrix -> `QuantizedWeight`: the steps the ``rtn`` and ``sinq`` handlers share.

Every method (`handlers`) is the same three steps on an ``[N, K]`` weight ``W``:

1. a per-input-channel scale ``t`` [K] (all ones for RTN; Sinkhorn's column scale per tile for
   SINQ, times the activation-aware factor when calibrated, see `asinq`);
2. group parameters (scale ``s``, integer zero point ``z``) of ``W / t`` per ``1 x g`` group,
   by min/max, by the weighted range search of `rtn.search_params`, or by min/max with the
   weighted scale refits of `rtn.refit_params` (the default when input energies are known);
3. integer codes: round to nearest, or GPTQ's error-compensating rounding (`gptq`) when a
   Hessian of the layer's inputs is known.

Why SINQ needs no row scale here: Sinkhorn returns a row and a column scale per tile, but a
per-row factor inside one group is absorbed by that group's own scale (min/max, the shrink
search and the least-squares refit are all invariant to it), so only the column scale ``t``
changes the result. A tile is the ``N x g`` column slab one group spans; all tiles of a matrix
go through Sinkhorn in one batch, a last partial tile (K not a multiple of g) in its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from ..checkpoint import all_finite
from ..workers import ordered_map
from . import packing
from .gptq import gptq_chunks
from .methods import MethodConfig, SINQConfig
from .record import QuantizedWeight
from .rtn import minmax_params, refit_params, search_params
from .sinkhorn import sinkhorn_scales
from .stats import LayerStats


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
    if not all_finite(weight):
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


# ------------------------------------------------------------------------------ groups


def to_groups(x: torch.Tensor, g: int) -> list[torch.Tensor]:
    """``[..., K]`` -> ``[..., K // g, g]`` full groups, plus ``[..., 1, K % g]`` for a tail."""
    k = x.shape[-1]
    full = k // g
    out = []
    if full:
        out.append(x[..., : full * g].reshape(*x.shape[:-1], full, g))
    if k % g:
        out.append(x[..., full * g :].unsqueeze(-2))
    return out


def from_groups(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inverse of `to_groups`: ``[..., B, w]`` pieces -> ``[..., K]``."""
    flat = [p.reshape(*p.shape[:-2], -1) for p in parts]
    return flat[0] if len(flat) == 1 else torch.cat(flat, dim=-1)


# float32 bytes of the rows one group-parameter / rounding call takes: its [rows, K] temporaries
# stay in cache-sized pieces, whatever the layer (a 150k-row head, a 19k-input down_proj); the
# energy refit's passes over them then hit the cache (17,920 x 1536, 3 refits, 2 workers: 0.56 s
# in 1 MB chunks, 1.17 s in 16 MB; below ~256 KB the per-op overhead wins)
ROW_CHUNK_BYTES = 1 << 20


def chunk_rows(k: int) -> int:
    """Rows of a ``[N, k]`` weight per `ROW_CHUNK_BYTES` chunk."""
    return max(1, ROW_CHUNK_BYTES // (4 * k))


def group_params(w: torch.Tensor, bits: int, g: int, importance: torch.Tensor | None,
                 symmetric: bool, search: bool, refit: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, zeros) ``[N, n_blocks]`` of ``w [N, K]``; ``importance`` ``[N, K]`` or ``[1, K]``
    (broadcast, never materialised per row: the writer quantizes several layers at once).

    ``search``: the range search (`rtn.search_params`); else ``refit`` > 0: min/max with that
    many weighted scale refits (`rtn.refit_params`); else plain min/max.
    """
    imp = torch.ones(1, w.shape[-1]) if importance is None else importance
    out = []
    for x, i in zip(to_groups(w, g), to_groups(imp, g)):
        if search:
            out.append(search_params(x, bits, i, symmetric))
        elif refit:  # in row chunks: its [N, K] temporaries would be 1 GB each for a big head
            step = chunk_rows(w.shape[-1])
            rows = x.split(step)
            weights = i.split(step) if i.shape[0] > 1 else [i] * len(rows)
            parts = [refit_params(xs, bits, is_, refit, symmetric)
                     for xs, is_ in zip(rows, weights)]
            out.append((torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])))
        else:
            out.append(minmax_params(x, bits, symmetric))
    return torch.cat([s for s, _ in out], -1), torch.cat([z for _, z in out], -1)


def expand_groups(p: torch.Tensor, g: int, k: int) -> torch.Tensor:
    """``[N, n_blocks]`` per-group values -> ``[N, K]`` per element."""
    return p.repeat_interleave(g, dim=-1)[..., :k]


def round_codes(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                g: int) -> torch.Tensor:
    """Round-to-nearest integer codes ``[N, K]`` of ``w`` on the given group grid (group by
    group: the per-group scales broadcast, never expanded to ``[N, K]``)."""
    codes, start = [], 0
    for x in to_groups(w, g):
        cols = slice(start, start + x.shape[-2])
        codes.append((x / scales[..., cols, None]).add_(zeros[..., cols, None]).round_()
                     .clamp_(0, (1 << bits) - 1))
        start = cols.stop
    return from_groups(codes)


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     g: int) -> torch.Tensor:
    """``(q - z) * s`` per element, ``[N, K]``."""
    k = codes.shape[-1]
    return (codes - expand_groups(zeros, g, k)) * expand_groups(scales, g, k)


def per_group_sum(x: torch.Tensor, g: int) -> torch.Tensor:
    """``[N, K]`` -> ``[N, n_blocks]`` sums over each group."""
    return torch.cat([p.sum(-1) for p in to_groups(x, g)], -1)


def record(chunks: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
           shape: tuple[int, int], col_scale: torch.Tensor | None, bits: int, g: int
           ) -> QuantizedWeight:
    """The record of a ``shape`` weight from its (codes, scales, zeros) a chunk of rows at a
    time, in row order.

    Each chunk is packed into the record's tensors as it comes (packing is per row), so the
    integer codes of a 150k-row head never exist whole: at 152,064 x 3584 they would be
    0.5 GB of uint8, and packing them at once as much again in temporaries.
    """
    n, k = shape
    nb = packing.n_blocks(k, g)
    packed = torch.empty(n, nb, packing.packed_block_bytes(g, bits), dtype=torch.uint8)
    scales = torch.empty(n, nb)
    zero_points = torch.empty(n, packing.packed_zero_point_bytes(nb, bits), dtype=torch.uint8)
    start = 0
    for codes, s, z in chunks:
        rows = slice(start, start + codes.shape[0])
        packed[rows] = packing.pack_codes(codes, bits, g)
        scales[rows] = s
        zero_points[rows] = packing.pack_zero_points(z, bits)
        start = rows.stop
    if start != n:
        raise ValueError(f"record: the chunks hold {start} rows, the weight has {n}")
    return QuantizedWeight(
        packed=packed,
        scales=scales,
        zero_points=zero_points,
        col_scale=None if col_scale is None else col_scale.float().contiguous(),
        bits=bits,
        group_size=g,
        shape=(n, k),
    )


# ------------------------------------------------------------------------------ column scale


def sinkhorn_col_scale(w: torch.Tensor, g: int, iters: int) -> torch.Tensor:
    """Sinkhorn's column scale of every ``N x g`` tile, concatenated to ``t [K]``."""
    cols = []
    for tiles in to_groups(w, g):  # [N, T, w]
        tiles = tiles.permute(1, 0, 2)
        if tiles.shape[-1] >= 2 and iters > 0:
            cols.append(sinkhorn_scales(tiles, iters).col.reshape(-1))
        else:
            cols.append(torch.ones(tiles.shape[0] * tiles.shape[-1]))
    return torch.cat(cols)


def grid_for(x: torch.Tensor, t: torch.Tensor, h: torch.Tensor | None, config: MethodConfig
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, zeros) of ``x = W / t``, each weight weighted by ``t^2 h`` (the error in the
    original weight's units).

    The scale refit needs the input energies ``h``: weighted by ``t^2`` alone it fits the bulk
    of the weights, which is what the range search showed to hurt (docs/quality.md).
    """
    importance = (t.square() if h is None else t.square() * h).reshape(1, -1)  # broadcasts
    return group_params(x, config.bits, config.group_size, importance, config.symmetric,
                        config.scale_search, 0 if h is None else config.scale_refit)


def sinkhorn_applies(config: SINQConfig, weight: Callable[[], torch.Tensor]) -> bool:
    """Whether Sinkhorn gives ``weight()`` a t: it iterates at all, and the (whole-matrix)
    kurtosis gate, if set, does not send the weight to plain RTN (only the gate loads it)."""
    if config.sinkhorn_iters == 0:
        return False
    return config.kurtosis_gate is None or kurtosis(weight()) <= config.kurtosis_gate


def sinq_col_scale(w: torch.Tensor, config: SINQConfig) -> torch.Tensor | None:
    """SINQ's ``t`` for ``w``, or None where Sinkhorn does not apply (`sinkhorn_applies`)."""
    if not sinkhorn_applies(config, lambda: w):
        return None
    return sinkhorn_col_scale(w, config.group_size, config.sinkhorn_iters)


def tie_col_scale(t: torch.Tensor, kv_heads: int, heads_per_kv: int) -> torch.Tensor:
    """``t [K]`` over attention-head channels ``[kv_heads, heads_per_kv, head_dim]`` with every
    query head of a group given the group's geometric mean, channel by channel.

    Why: o_proj reads ``softmax(q k^T) v`` per query head; scaling a kv head's value rows by a
    vector scales the output of every query head that reads it by that vector, so o_proj's t
    can fold into v_proj's rows (no Mul) only if it is the same for all of them. The
    geometric mean keeps the group's overall scale (a small perplexity cost for one Mul less
    per layer, docs/quality.md).
    """
    k = t.shape[0]
    if kv_heads < 1 or heads_per_kv < 1 or k % (kv_heads * heads_per_kv):
        raise ValueError(f"col_scale_tie ({kv_heads}, {heads_per_kv}) does not divide the "
                         f"{k} input channels into heads")
    heads = t.reshape(kv_heads, heads_per_kv, -1)
    tied = heads.clamp_min(1e-30).log().mean(1, keepdim=True).exp()
    return tied.expand_as(heads).reshape(k).contiguous()


def tied_rows(t: torch.Tensor, kv_heads: int, n_rows: int) -> torch.Tensor:
    """The ``[n_rows]`` row factors of the linear whose output ``t`` scales: ``t`` itself for a
    plain fold (``n_rows == K``, ``kv_heads == 1``), one query head's slice per kv head for a t
    tied by `tie_col_scale` (v_proj's rows ``[kv_heads, head_dim]``)."""
    if n_rows % kv_heads or t.shape[0] % n_rows:
        raise ValueError(f"a t of {t.shape[0]} channels cannot scale {n_rows} rows in "
                         f"{kv_heads} heads")
    return t.reshape(kv_heads, -1, n_rows // kv_heads)[:, 0].reshape(n_rows)


# ------------------------------------------------------------------------------ handlers


def quantize_with_scale(w: torch.Tensor, t: torch.Tensor | None, config: MethodConfig,
                        calibration: LayerStats | None = None) -> QuantizedWeight:
    """Steps 2 and 3 of the module docstring for a fixed column scale ``t`` (None = ones)."""
    ones = torch.ones(w.shape[1])
    tt = ones if t is None else t
    h = None if calibration is None else calibration.diag()
    damp = config.gptq_damping()
    if calibration is not None and damp is not None:
        chunks = gptq_chunks(w, tt, calibration.hessian(), config, damp=damp)
    else:
        chunks = rounded_chunks(w, tt, h, config)
    return record(chunks, tuple(w.shape), t, config.bits, config.group_size)


def rounded_chunks(w: torch.Tensor, t: torch.Tensor, h: torch.Tensor | None,
                   config: MethodConfig
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(uint8 codes, scales, zeros) of ``W / t`` rounded to nearest on `grid_for`'s grid, one
    chunk of rows at a time.

    Rows are independent, so they go `chunk_rows` at a time, on the worker threads
    (`workers.ordered_map`): every ``[N, K]`` float
    temporary (``W / t``, the expanded scales and zero points) is then a chunk's, not a 150k-row
    head's or table's (~1 GB each at 151,936 x 1536). ``w`` may be stored narrower than float32
    (a bfloat16 head): each chunk is widened exactly where it is divided by ``t``.
    """
    return ordered_map(lambda rows: _rounded_rows(rows, t, h, config),
                       w.split(chunk_rows(w.shape[1])))


def _rounded_rows(w: torch.Tensor, t: torch.Tensor, h: torch.Tensor | None, config: MethodConfig
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = w / t
    s, z = grid_for(x, t, h, config)
    return round_codes(x, s, z, config.bits, config.group_size).to(torch.uint8), s, z
