"""Statistics of a linear's input, accumulated over calibration tokens: ``H = E[x x^T]``
``[K, K]`` (or only its diagonal, the input energies ``E[x^2]``) and ``E|x|`` ``[K]``; and the
output error they measure a quantized weight by."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerStats:
    """Running ``sum x x^T`` (or only its diagonal), ``sum |x|`` and count of one linear's
    input rows.

    ``full=False`` keeps only the diagonal, the input energies ``E[x^2]`` that the
    calibration-free scale refit weighs by: ``K`` numbers instead of ``K x K`` and no matmul
    per token (A-SINQ and GPTQ need the full matrix).
    """

    k: int
    full: bool = True
    xtx: torch.Tensor = field(init=False)
    sq_sum: torch.Tensor = field(init=False)
    abs_sum: torch.Tensor = field(init=False)
    count: int = 0

    def __post_init__(self) -> None:
        self.xtx = torch.zeros(self.k, self.k) if self.full else torch.zeros(0)
        self.sq_sum = torch.zeros(self.k)
        self.abs_sum = torch.zeros(self.k)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.k).float()
        if self.full:
            self.xtx.addmm_(x.T, x)
        else:
            self.sq_sum += x.square().sum(0)
        self.abs_sum += x.abs().sum(0)
        self.count += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if not self.full:
            raise ValueError("these statistics keep only E[x^2] (LayerStats(full=False))")
        return self.xtx / max(self.count, 1)

    def diag(self) -> torch.Tensor:
        sq = self.xtx.diagonal() if self.full else self.sq_sum
        return sq / max(self.count, 1)

    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.count, 1)


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """``tr((W - W_hat) H (W - W_hat)^T)``: the layer's mean squared output error."""
    e = w - w_hat
    return float(((e @ h) * e).sum())
