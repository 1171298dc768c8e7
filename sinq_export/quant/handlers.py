"""The registered methods' handlers (``rtn``, ``sinq``), joint quantization of the linears
that share one input, and the reconstruction error; the steps they share are `core`'s."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .asinq import activation_aware_scale
from .core import (
    QuantizationError,
    check_weight,
    quantize_with_scale,
    sinkhorn_applies,
    sinq_col_scale,
    tie_col_scale,
)
from .methods import MethodConfig, RTNConfig, SINQConfig, quantize, register
from .record import QuantizedWeight
from .stats import LayerStats


def _never(_config: MethodConfig, _weight: Callable[[], torch.Tensor], _calibrated: bool
           ) -> bool:
    return False


@register("rtn", RTNConfig, yields_col_scale=_never)
def quantize_rtn(weight: torch.Tensor, config: RTNConfig, *,
                 calibration: LayerStats | None = None, name: str = "weight") -> QuantizedWeight:
    """Group RTN (min/max, or the weighted range search with ``scale_search``)."""
    check_weight(weight, name)
    return quantize_with_scale(weight.detach().float().cpu(), None, config, calibration)


def sinq_yields_col_scale(config: SINQConfig, weight: Callable[[], torch.Tensor],
                          calibrated: bool) -> bool:
    """A t from Sinkhorn (`core.sinkhorn_applies`) or, calibrated, from A-SINQ's factor."""
    return (calibrated and config.awq) or sinkhorn_applies(config, weight)


@register("sinq", SINQConfig, yields_col_scale=sinq_yields_col_scale)
def quantize_sinq(weight: torch.Tensor, config: SINQConfig, *,
                  calibration: LayerStats | None = None, name: str = "weight") -> QuantizedWeight:
    """SINQ; with ``calibration`` also A-SINQ's activation-aware ``t`` and GPTQ rounding."""
    check_weight(weight, name)
    # a bfloat16 / float16 weight stays as stored: every step widens the rows or tiles it works
    # on (exactly), so a 150k-row head never exists as a whole float32 copy
    w = weight.detach().cpu()
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        w = w.float()
    t = sinq_col_scale(w, config)
    if calibration is not None and config.awq:
        t = activation_aware_scale(w, t, calibration, config)
    if t is not None and config.col_scale_tie is not None:
        t = tie_col_scale(t, *config.col_scale_tie)
    return quantize_with_scale(w, t, config, calibration)


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


def quantize_jointly(weights: Sequence[torch.Tensor], names: Sequence[str], config: MethodConfig,
                     calibration: LayerStats | None = None) -> list[QuantizedWeight]:
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
    joint = quantize(joint_w, config, calibration=calibration, name=joint_name)
    return split_rows(joint, [w.shape[0] for w in weights])


def relative_error(weight: torch.Tensor, q: QuantizedWeight) -> float:
    """Relative Frobenius reconstruction error ||W - W_hat||_F / ||W||_F."""
    w = weight.detach().float()
    return float(torch.linalg.norm(w - q.dequantize()) / torch.linalg.norm(w).clamp_min(1e-30))
