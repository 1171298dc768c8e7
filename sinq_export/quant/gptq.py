"""GPTQ's error-compensating rounding (arXiv 2210.17323) on the SINQ-normalised weight.

The layer computes ``y = (x * t) @ W_g^T`` with ``W_g = (Q - z) * s``, so the matrix that is
rounded is ``W / t`` and its input is ``x * t``: the Hessian of the layer's squared output error
becomes ``H' = diag(t) H diag(t)`` with ``H = E[x x^T]`` from calibration. Columns are rounded
left to right; each column's rounding error is spread over the not-yet-rounded columns through
the upper Cholesky factor of ``H'^-1`` (the lazy-batch form of the paper, blocks of `BLOCK`).

Group parameters (scale, integer zero point) are chosen when the sweep reaches a group's first
column, from the already error-updated weights of that group, with the same range search as
the calibration-free path (importance = ``diag(H')``). Zero points stay integers in
``[0, 2^bits - 1]`` and there is no column permutation (no ``g_idx``), so the result is an
ordinary record that stock MatMulNBits runs at full speed.

Why hand-written: no maintained library does GPTQ on CPU without pulling in CUDA-only kernels
(auto-gptq, gptqmodel), and we need it on the Sinkhorn-normalised weight with our grid.
"""

from __future__ import annotations

import torch

from .methods import MethodConfig
from .rtn import minmax_params, search_params

BLOCK = 128  # columns per lazy batch update (a multiple of the group size is used)
DAMP = 0.01  # Tikhonov damping, fraction of mean(diag(H'))


def inverse_cholesky(h: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` (damping raised until PD)."""
    k = h.shape[0]
    eye = torch.eye(k, dtype=h.dtype)
    scale = float(h.diagonal().mean().clamp_min(1e-12))
    for attempt in range(6):
        hd = h + (damp * 10**attempt) * scale * eye
        chol, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return upper
    raise ValueError("GPTQ: the calibration Hessian is not positive definite even when damped")


def gptq_codes(w: torch.Tensor, t: torch.Tensor, hessian: torch.Tensor, config: MethodConfig,
               damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [N, K], scales [N, n_blocks], zeros [N, n_blocks]) of ``w / t`` by GPTQ.

    ``hessian`` is ``E[x x^T]`` ``[K, K]`` of the layer's (unscaled) inputs.
    """
    g, bits = config.group_size, config.bits
    qmax = (1 << bits) - 1
    n, k = w.shape
    wn = (w.float() / t).clone()
    h = hessian.double() * t.double()[:, None] * t.double()[None, :]
    dead = h.diagonal() <= 0
    if bool(dead.any()):  # channels never active: any value is exact, keep the grid honest
        h[dead, dead] = 1.0
    importance = h.diagonal().float()
    u = inverse_cholesky(h, damp).float()
    nb = -(-k // g)
    scales, zeros = torch.empty(n, nb), torch.empty(n, nb)
    codes = torch.empty(n, k)
    block = max(g, BLOCK // g * g)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = wn[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:
                stop = min(i + g, i2 - i1)
                x, imp = w1[:, i:stop], importance[col : col + stop - i].expand(n, -1)
                s, z = (search_params(x, bits, imp, config.symmetric) if config.scale_search
                        else minmax_params(x, bits, config.symmetric))
                scales[:, col // g], zeros[:, col // g] = s, z
            s, z = scales[:, col // g], zeros[:, col // g]
            q = torch.round(w1[:, i] / s + z).clamp(0, qmax)
            codes[:, col] = q
            e = (w1[:, i] - (q - z) * s) / u1[i, i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            err1[:, i] = e
        wn[:, i2:] -= err1 @ u[i1:i2, i2:]
    return codes, scales, zeros
