"""Bit allocation to a size budget: one (width, group size) per linear, minimising the
predicted loss increase at a given number of bytes.

Options (`allocation_options`): the widest uniform width that fits the budget and the next
wider one, each at half, once and twice the configured group size. Why not every width:
below the budget's width the loss is far from quadratic (2-3 bits) and the second-order costs
underestimate it, so a DP free to pick them sends exactly those layers there and ends above
uniform's perplexity at uniform's bytes. Why group sizes: a coarser group is the cheapest way
to free bytes (4-bit g128 saves 0.28 bit per weight at a small error), which then buy 5 bits
where the costs say it matters, below uniform's perplexity (docs/quality.md).

Model (the linearity result of HIGGS, arXiv 2411.17525): the loss increase of a quantized
model is close to a sum of independent per-layer terms, ``dL ~ sum_l a_l * err_l(b_l)``. Each
term is measured for the layer's actual quantization error at every width, as the
second-order term of the loss in the layer's *output*, with the empirical Fisher taken per
token (`calibration.sensitivity.output_fisher_costs`, which runs the model):
``cost_l(b) = 1/2 * sum_tokens sum_rows g_ti^2 * ((W_l - W_hat_l(b)) x_t)_i^2``, ``g`` the
gradient of the language-modelling loss w.r.t. the layer's output, ``x`` its input. Why the
output and per token: a weight-space Fisher from per-window gradients squares a sum over
hundreds of tokens (most of it cancels), so with a few windows it is mostly noise; here every
token is a sample, and ``(W - W_hat) x`` keeps the correlations between input channels that
a diagonal weight-space Fisher drops.

Solver (`allocate`): an exact multiple-choice knapsack by dynamic programming over the byte
budget in `STATES` units. Each layer's size is rounded *up* to
whole units, so the chosen widths never exceed the budget; the DP is exact on those sizes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

from . import packing

WIDTHS = (2, 3, 4, 5, 6, 8)
STATES = 20_000  # DP resolution: the budget is cut into this many units
Option = tuple[int, int]  # (bits, group_size) of one layer


def layer_bytes(shape: Sequence[int], bits: float, group_size: int) -> int:
    """Bytes of one quantized ``[N, K]`` linear: codes, fp32 scales, zero points, fp32 ``t``."""
    n, k = shape
    nb = packing.n_blocks(k, group_size)
    return math.ceil(n * nb * group_size * bits / 8 + n * nb * 4
                     + n * math.ceil(nb * bits / 8) + k * 4)


def budget_bytes(shapes: Mapping[str, Sequence[int]], bits: float, group_size: int) -> int:
    """The bytes of every layer at ``bits`` (fractional bits give an average-bits budget)."""
    return sum(layer_bytes(s, bits, group_size) for s in shapes.values())


def allocation_options(shapes: Mapping[str, Sequence[int]], budget: int, group_size: int
                       ) -> list[Option]:
    """The (bits, group size) choices each layer gets for ``budget`` (module docstring): the
    widest `WIDTHS` entry whose uniform bytes fit and the next wider one, at group sizes
    ``group_size / 2, group_size, 2 * group_size`` (those MatMulNBits accepts, 16-256)."""
    fitting = [b for b in WIDTHS if budget_bytes(shapes, b, group_size) <= budget]
    base = fitting[-1] if fitting else WIDTHS[0]
    bits = WIDTHS[WIDTHS.index(base): WIDTHS.index(base) + 2]
    groups = [g for g in (group_size // 2, group_size, group_size * 2) if 16 <= g <= 256]
    return [(b, g) for b in bits for g in groups]


def allocate(costs: Mapping[str, Mapping], sizes: Mapping[str, Mapping], budget: int,
             unit: int | None = None) -> dict:
    """Option per layer minimising ``sum cost[l][o]`` subject to ``sum size[l][o] <= budget``
    (options: any sortable keys, widths or (bits, group size) pairs).

    ``unit`` (bytes) defaults to ``budget / STATES``. Raises ValueError when even the
    narrowest widths do not fit.
    """
    names = list(costs)
    unit = unit or max(1, budget // STATES)
    cap = budget // unit
    inf = np.inf
    dp = np.full(cap + 1, inf)
    dp[0] = 0.0
    choice = np.zeros((len(names), cap + 1), dtype=np.int8)
    for i, name in enumerate(names):
        widths = sorted(costs[name])
        new = np.full(cap + 1, inf)
        arg = np.zeros(cap + 1, dtype=np.int8)
        for j, b in enumerate(widths):
            u = -(-sizes[name][b] // unit)
            if u > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[u:] = dp[: cap + 1 - u] + costs[name][b]
            better = cand < new
            new[better], arg[better] = cand[better], j
        dp, choice[i] = new, arg
    if not np.isfinite(dp).any():
        raise ValueError(f"no width assignment fits in {budget} bytes")
    c = int(np.argmin(dp))
    out: dict[str, int] = {}
    for i in range(len(names) - 1, -1, -1):
        name = names[i]
        b = sorted(costs[name])[int(choice[i, c])]
        out[name] = b
        c -= -(-sizes[name][b] // unit)
    return {n: out[n] for n in names}


def plan_overrides(costs: Mapping[str, Mapping[Option, float]],
                   shapes: Mapping[str, Sequence[int]], budget: int
                   ) -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, int], ...],
                              dict[str, Option]]:
    """(`SinqConfig.overrides`, `SinqConfig.group_overrides` - one anchored pattern per layer -
    and the (bits, group size) per layer) at ``budget``."""
    sizes = {n: {o: layer_bytes(shapes[n], *o) for o in costs[n]} for n in costs}
    chosen = allocate(costs, sizes, budget)
    patterns = {n: f"^{re.escape(n)}$" for n in chosen}
    return (tuple((patterns[n], b) for n, (b, _) in chosen.items()),
            tuple((patterns[n], g) for n, (_, g) in chosen.items()), chosen)
