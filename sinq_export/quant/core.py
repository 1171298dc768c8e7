"""Weight matrix -> `QuantizedWeight`: the ``rtn`` and ``sinq`` handlers and their shared steps.

Every method here is the same three steps on an ``[N, K]`` weight ``W``:

1. a per-input-channel scale ``t`` [K] (all ones for RTN; Sinkhorn's column scale per tile for
   SINQ, times the activation-aware factor when calibrated, see `calibrate`);
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

from collections.abc import Sequence

import torch

from . import packing
from .calibrate import activation_aware_scale
from .gptq import gptq_codes
from .methods import (
    MethodConfig,
    RTNConfig,
    SINQConfig,
    make_config,
    method_name,
    quantize,
    register,
)
from .record import QuantizedWeight
from .rtn import minmax_params, refit_params, search_params
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
    return torch.cat([p.reshape(*p.shape[:-2], -1) for p in parts], dim=-1)


REFIT_ROWS = 4096  # rows per `rtn.refit_params` call (bounds its temporaries)


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
            rows = x.split(REFIT_ROWS)
            weights = i.split(REFIT_ROWS) if i.shape[0] > 1 else [i] * len(rows)
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
    """Round-to-nearest integer codes ``[N, K]`` of ``w`` on the given group grid."""
    k = w.shape[-1]
    s, z = expand_groups(scales, g, k), expand_groups(zeros, g, k)
    return torch.round(w / s + z).clamp(0, (1 << bits) - 1)


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     g: int) -> torch.Tensor:
    """``(q - z) * s`` per element, ``[N, K]``."""
    k = codes.shape[-1]
    return (codes - expand_groups(zeros, g, k)) * expand_groups(scales, g, k)


def per_group_sum(x: torch.Tensor, g: int) -> torch.Tensor:
    """``[N, K]`` -> ``[N, n_blocks]`` sums over each group."""
    return torch.cat([p.sum(-1) for p in to_groups(x, g)], -1)


def record(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
           col_scale: torch.Tensor | None, bits: int, g: int) -> QuantizedWeight:
    n, k = codes.shape
    return QuantizedWeight(
        packed=packing.pack_codes(codes, bits, g),
        scales=scales.float().contiguous(),
        zero_points=packing.pack_zero_points(zeros, bits),
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


def grid_for(w: torch.Tensor, t: torch.Tensor, h: torch.Tensor | None, config: MethodConfig
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scales, zeros, importance) of ``W / t``; importance = ``t^2 h`` (the original units).

    The scale refit needs the input energies ``h``: weighted by ``t^2`` alone it fits the bulk
    of the weights, which is what the range search showed to hurt (docs/quality.md).
    """
    importance = (t.square() if h is None else t.square() * h).reshape(1, -1)  # broadcasts
    s, z = group_params(w / t, config.bits, config.group_size, importance, config.symmetric,
                        config.scale_search, 0 if h is None else config.scale_refit)
    return s, z, importance


def rtn_error(w: torch.Tensor, t: torch.Tensor, h: torch.Tensor | None, config: MethodConfig
              ) -> torch.Tensor:
    """Per-group weighted RTN error ``[N, n_blocks]`` of ``W`` quantized with column scale ``t``."""
    g = config.group_size
    s, z, imp = grid_for(w, t, h, config)
    wn = w / t
    codes = round_codes(wn, s, z, config.bits, g)
    return per_group_sum(imp * (wn - dequantize_codes(codes, s, z, g)).square(), g)


def gate_tiles(w: torch.Tensor, t: torch.Tensor, h: torch.Tensor | None, config: MethodConfig
               ) -> torch.Tensor:
    """``t`` with tiles reset to 1 where plain RTN's error is lower (per-tile gate)."""
    g = config.group_size
    ones = torch.ones_like(t)
    keep = rtn_error(w, t, h, config).sum(0) <= rtn_error(w, ones, h, config).sum(0)
    return torch.where(expand_groups(keep[None], g, t.shape[0])[0], t, ones)


def sinq_col_scale(w: torch.Tensor, config: SINQConfig, h: torch.Tensor | None) -> torch.Tensor | None:
    """SINQ's ``t`` for ``w``, or None when the (whole-matrix) kurtosis gate says RTN."""
    if config.kurtosis_gate is not None and kurtosis(w) > config.kurtosis_gate:
        return None
    t = sinkhorn_col_scale(w, config.group_size, config.sinkhorn_iters)
    return gate_tiles(w, t, h, config) if config.tile_gate else t


def tie_col_scale(t: torch.Tensor, kv_heads: int, heads_per_kv: int) -> torch.Tensor:
    """``t [K]`` over attention-head channels ``[kv_heads, heads_per_kv, head_dim]`` with every
    query head of a group given the group's geometric mean, channel by channel.

    Why: o_proj reads ``softmax(q k^T) v`` per query head; scaling a kv head's value rows by a
    vector scales the output of every query head that reads it by that vector, so o_proj's t
    can fold into v_proj's rows (no Mul) only if it is the same for all of them. The
    geometric mean keeps the group's overall scale (measured +0.16 perplexity on SmolLM2 for
    one Mul less per layer, docs/quality.md).
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
                        calibration=None) -> QuantizedWeight:  # noqa: ANN001
    """Steps 2 and 3 of the module docstring for a fixed column scale ``t`` (None = ones)."""
    g, bits = config.group_size, config.bits
    ones = torch.ones(w.shape[1])
    tt = ones if t is None else t
    h = None if calibration is None else calibration.diag()
    if calibration is not None and getattr(config, "gptq", False):
        codes, s, z = gptq_codes(w, tt, calibration.hessian(), config, damp=config.gptq_damp)
    else:
        s, z, _ = grid_for(w, tt, h, config)
        codes = round_codes(w / tt, s, z, bits, g)
    return record(codes, s, z, t, bits, g)


@register("rtn", RTNConfig)
def quantize_rtn(weight: torch.Tensor, config: RTNConfig, *, calibration=None,  # noqa: ANN001
                 name: str = "weight") -> QuantizedWeight:
    """Group RTN (min/max, or the weighted range search with ``scale_search``)."""
    check_weight(weight, name)
    return quantize_with_scale(weight.detach().float().cpu(), None, config, calibration)


@register("sinq", SINQConfig)
def quantize_sinq(weight: torch.Tensor, config: SINQConfig, *, calibration=None,  # noqa: ANN001
                  name: str = "weight") -> QuantizedWeight:
    """SINQ; with ``calibration`` also A-SINQ's activation-aware ``t`` and GPTQ rounding."""
    check_weight(weight, name)
    w = weight.detach().float().cpu()
    h = None if calibration is None else calibration.diag()
    t = sinq_col_scale(w, config, h)
    if calibration is not None and config.awq:
        t = activation_aware_scale(w, t, calibration, config)
    return quantize_with_scale(w, tied_col_scale(t, config), config, calibration)


def tied_col_scale(t: torch.Tensor | None, config: MethodConfig) -> torch.Tensor | None:
    """``t`` tied across GQA groups when the config asks (`tie_col_scale`), else as is."""
    tie = getattr(config, "col_scale_tie", None)
    return t if t is None or tie is None else tie_col_scale(t, *tie)


def weight_only_col_scale(w: torch.Tensor, config: MethodConfig,
                          energies: torch.Tensor | None = None) -> torch.Tensor | None:
    """The ``t`` the quantizer gives ``w`` [N, K] (a joint unit's row-concatenation) without
    full calibration statistics: SINQ's Sinkhorn t (gated, tied as configured), None for RTN.
    What the accuracy-level probe scales each linear's input by before emulating int8."""
    if method_name(config) != "sinq":
        return None
    return tied_col_scale(sinq_col_scale(w.float(), config, energies), config)


def quantize_weight(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    method: str = "sinq",
    symmetric: bool = False,
    sinkhorn_iters: int = 16,
    kurtosis_gate: float | None = None,
    name: str = "weight",
    *,
    calibration=None,  # noqa: ANN001
    **options,  # noqa: ANN003
) -> QuantizedWeight:
    """Quantize one ``[N, K]`` weight with the registered ``method`` (``"sinq"``, ``"rtn"``, ...).

    A thin wrapper over `methods.quantize` kept for callers that pass loose arguments;
    ``options`` are further fields of the method's config (e.g. ``scale_search=False``).
    """
    config = make_config(method, bits=bits, group_size=group_size, symmetric=symmetric,
                         sinkhorn_iters=sinkhorn_iters, kurtosis_gate=kurtosis_gate, **options)
    return quantize(weight, config, calibration=calibration, name=name)


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
    weights: Sequence[torch.Tensor], names: Sequence[str], *, config: MethodConfig | None = None,
    calibration=None, **kwargs,  # noqa: ANN001, ANN003
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
    joint_w, joint_name = torch.cat([w.float() for w in weights]), "+".join(names)
    if config is None:
        config = make_config(kwargs.pop("method", "sinq"), **kwargs)
    joint = quantize(joint_w, config, calibration=calibration, name=joint_name)
    return split_rows(joint, [w.shape[0] for w in weights])


def relative_error(weight: torch.Tensor, q: QuantizedWeight) -> float:
    """Relative Frobenius reconstruction error ||W - W_hat||_F / ||W||_F."""
    w = weight.detach().float()
    return float(torch.linalg.norm(w - q.dequantize()) / torch.linalg.norm(w).clamp_min(1e-30))



