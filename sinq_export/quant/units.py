"""Quantization units: the linears quantized in one call, sharing one column scale ``t``.

Linears that read the same input tensor (q/k/v, gate/up) may be quantized jointly: Sinkhorn
then runs on their row-concatenation and gives them one ``t``, which folds into the norm they
all read (`handlers.quantize_jointly`). A joint unit is one quantization call with one code width
and one group size, so only linears whose settings agree form one; a linear whose width or
group size differs (a bit allocation's choice, a user's override) is its own unit.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence

import torch

from .handlers import quantize_jointly
from .methods import MethodConfig, quantize
from .record import QuantizedWeight
from .stats import LayerStats

# Linears that read the same input tensor, by the `SinqConfig.shared_col_scale` value that
# makes them share one t.
SHARED_INPUT_GROUPS: dict[str, tuple[tuple[str, ...], ...]] = {
    "none": (),
    "mlp": (("gate_proj", "up_proj"),),
    "all": (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")),
}


def joint_groups(names: Iterable[str], settings: Mapping[str, Hashable], shared: str
                 ) -> list[list[str]]:
    """Names that read one input and share a t under ``shared``: same parent, leaves in
    ``SHARED_INPUT_GROUPS[shared]``, equal ``settings`` (each linear's (bits, group size))."""
    present = set(names)
    groups = []
    for name in sorted(present):
        parent, _, leaf = name.rpartition(".")
        for members in SHARED_INPUT_GROUPS[shared]:
            if leaf != members[0]:
                continue
            full = [f"{parent}.{m}" if parent else m for m in members]
            if all(f in present for f in full) and len({settings[f] for f in full}) == 1:
                groups.append(full)
    return groups


def quantize_unit(weights: Sequence[torch.Tensor], names: Sequence[str], config: MethodConfig,
                  calibration: LayerStats | None = None) -> list[QuantizedWeight]:
    """The records of one unit (in ``names`` order): a lone linear through its method, a
    joint unit with one shared t. ``calibration``: the statistics of the unit's one input."""
    if len(names) > 1:
        return quantize_jointly(weights, names, config, calibration)
    return [quantize(weights[0], config, calibration=calibration, name=names[0])]
