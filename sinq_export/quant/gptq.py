"""GPTQ's error-compensating rounding (arXiv 2210.17323) on the SINQ-normalised weight.

The layer computes ``y = (x * t) @ W_g^T`` with ``W_g = (Q - z) * s``, so the matrix that is
rounded is ``W / t`` and its input is ``x * t``: the Hessian of the layer's squared output error
becomes ``H' = diag(t) H diag(t)`` with ``H = E[x x^T]`` from calibration. Columns are rounded
left to right; each column's rounding error is spread over the not-yet-rounded columns through
the upper Cholesky factor of ``H'^-1``, in the paper's lazy-batch form: the errors of a block of
`LAZY_COLUMNS` columns reach the later columns in one matrix product, a group's errors reach the
rest of its block in another, and inside a group rank-1 updates only span `SUB` columns. The
working copy is column-major, so every per-column step reads contiguous memory.

Group parameters (scale, integer zero point) are chosen when the sweep reaches a group's first
column, from the already error-updated weights of that group, with the same range search as
the calibration-free path (importance = ``diag(H')``). Zero points stay integers in
``[0, 2^bits - 1]`` and there is no column permutation (no ``g_idx``), so the result is an
ordinary record that stock MatMulNBits runs at full speed.

Why hand-written: no maintained library does GPTQ on CPU without pulling in CUDA-only kernels
(auto-gptq, gptqmodel), and we need it on the Sinkhorn-normalised weight with our grid.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..workers import ordered_map
from .methods import GPTQ_DAMP, MethodConfig
from .rtn import minmax_params, search_params

SUB = 16  # columns per rank-1-update slice inside a group (see `_round_group`)
# Columns whose rounding errors reach the rest of the matrix in one product (the paper's lazy
# batch, B = 128): each such product rewrites every later column of the working copy, so after
# every group (32 columns) the updates, memory-bound, were 80% of a head's sweep.
LAZY_COLUMNS = 128
CHUNK_BYTES = 64 << 20  # rows swept together (see `gptq_chunks`)


def inverse_cholesky(h: torch.Tensor, damp: float = GPTQ_DAMP) -> torch.Tensor:
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


def gptq_chunks(w: torch.Tensor, t: torch.Tensor, hessian: torch.Tensor, config: MethodConfig,
                damp: float = GPTQ_DAMP, chunk_bytes: int = CHUNK_BYTES
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(uint8 codes, scales, zeros) of ``w / t`` by GPTQ, one chunk of rows at a time.

    ``hessian`` is ``E[x x^T]`` ``[K, K]`` of the layer's (unscaled) inputs. Rows are
    independent given the Hessian, so they are swept in chunks of at most ``chunk_bytes`` of
    working copy, on the worker threads (`workers.ordered_map`), and handed on in order as each
    is done: a 150k-row head then needs a few small copies, and its codes are packed a chunk
    at a time (`core.record`), never held whole.
    """
    n, k = w.shape
    h = hessian.double() * t.double()[:, None] * t.double()[None, :]
    dead = h.diagonal() <= 0
    if bool(dead.any()):  # channels never active: any value is exact, keep the grid honest
        h[dead, dead] = 1.0
    importance = h.diagonal().float()
    # float32 factorisation (as the paper's code): 2-3x faster than float64 at K = 1536
    u = inverse_cholesky(h.float(), damp)
    rows = max(1, chunk_bytes // (k * 4))
    return ordered_map(lambda r: _sweep(w[r:r + rows], t, u, importance, config),
                       range(0, n, rows))


def _sweep(w: torch.Tensor, t: torch.Tensor, u: torch.Tensor, importance: torch.Tensor,
           config: MethodConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`gptq_chunks` of a block of rows, given the inverse Hessian's Cholesky factor ``u``."""
    g, bits = config.group_size, config.bits
    n, k = w.shape
    # column-major working copy: column i of W / t is the contiguous row ``wt[i]`` (written in
    # place: one copy of the chunk, not a row-major quotient and then its transpose)
    wt = torch.div(w.T, t[:, None], out=torch.empty(k, n))
    nb = -(-k // g)
    scales, zeros = torch.empty(n, nb), torch.empty(n, nb)
    codes = torch.empty(k, n, dtype=torch.uint8)  # a quarter of float codes' bytes
    rounded = torch.empty(g, n)  # one group's codes, as floats for the error arithmetic
    block = max(g, LAZY_COLUMNS // g * g)  # whole groups
    for b1 in range(0, k, block):
        b2 = min(b1 + block, k)
        errs = []
        for i1 in range(b1, b2, g):
            i2, b = min(i1 + g, k), i1 // g
            group = wt[i1:i2]
            x = group.T.contiguous()  # [N, g] for the grid search, in one block of memory
            imp = importance[i1:i2].expand(n, -1)
            s, z = (search_params(x, bits, imp, config.symmetric) if config.scale_search
                    else minmax_params(x, bits, config.symmetric))
            scales[:, b], zeros[:, b] = s, z
            q = rounded[:i2 - i1]
            errs.append(_round_group(group, q, s, z, u[i1:i2, i1:i2], bits))
            codes[i1:i2] = q
            if i2 < b2:  # the group's errors reach the block's later columns now
                wt[i2:b2].addmm_(u[i1:i2, i2:b2].T, errs[-1], alpha=-1.0)
        if b2 < k:  # and every column after the block in one product
            wt[b2:].addmm_(u[b1:b2, b2:].T, torch.cat(errs), alpha=-1.0)
    return codes.T, scales, zeros


def _round_group(group: torch.Tensor, codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor,
                 u: torch.Tensor, bits: int) -> torch.Tensor:
    """Round one group's columns (rows of ``group``, updated in place) in order, spreading each
    column's error over the group's later columns; returns the scaled errors ``[g, N]``.

    Two levels of lazy updates: rank-1 updates only inside `SUB`-column slices, one product
    per slice for the rest of the group (the same arithmetic as column-by-column GPTQ). Seven
    tensor ops per column, all in place or into preallocated rows.
    """
    qmax = (1 << bits) - 1
    inv_s = 1.0 / s
    inv_d = (1.0 / u.diagonal()).tolist()
    m = group.shape[0]
    err = torch.empty_like(group)
    for j1 in range(0, m, SUB):
        j2 = min(j1 + SUB, m)
        for i in range(j1, j2):
            col, q, e = group[i], codes[i], err[i]
            torch.addcmul(z, col, inv_s, out=q).round_().clamp_(0, qmax)
            torch.addcmul(col, q - z, s, value=-1.0, out=e).mul_(inv_d[i])
            if i + 1 < j2:
                group[i + 1:j2].addr_(u[i, i + 1:j2], e, alpha=-1.0)
        if j2 < m:
            group[j2:].sub_(u[j1:j2, j2:].T @ err[j1:j2])
    return err
