"""A-SINQ: SINQ's column scale ``t`` made activation-aware.

AWQ's observation (arXiv 2306.00978) is that scaling a weight column up by ``s_k`` before
quantization (and the activation down by ``1/s_k``) cuts the relative error of the channels
that carry large activations. Here that factor folds into SINQ's column scale: ``t <- t / s``
with ``s = E|x|^alpha`` (geometric-mean normalised), ``alpha`` searched on a grid by the
layer's output error ``tr((W - W_hat) H (W - W_hat)^T)``. ``alpha = 0`` (plain SINQ) is on the
grid, so the search never does worse on the calibration data. The graph already multiplies
activations by ``t``, so the search costs nothing at run time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .core import quantize_with_scale
from .methods import MethodConfig
from .rtn import MIN_SCALE
from .stats import LayerStats, output_error

ALPHA_GRID = (0.0, 0.15, 0.3, 0.45, 0.6)
SEARCH_ROWS = 128  # rows (evenly strided) that score each alpha: the cost is N_rows * K^2


def activation_aware_scale(w: torch.Tensor, t: torch.Tensor | None, stats: LayerStats,
                           config: MethodConfig, grid: Sequence[float] = ALPHA_GRID
                           ) -> torch.Tensor:
    """A-SINQ: ``t / s`` with ``s = E|x|^alpha`` for the alpha of least output error."""
    base = torch.ones(w.shape[1]) if t is None else t
    act = stats.abs_mean().clamp_min(1e-6)
    h = stats.hessian()
    w = w[:: max(1, w.shape[0] // SEARCH_ROWS)].float()  # group parameters are per row: exact subset
    plain = config.without_gptq()
    best, best_err = base, float("inf")
    for alpha in grid:
        s = act.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        cand = (base / s).clamp_min(MIN_SCALE)
        err = output_error(w, quantize_with_scale(w, cand, plain, stats).dequantize(), h)
        if err < best_err:
            best, best_err = cand, err
    return best
