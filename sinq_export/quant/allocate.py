"""Bit allocation to a size budget: one (width, group size) per linear, minimising the
predicted loss increase at a given number of bytes.

Options (`allocation_options`): the widest uniform width that fits the budget and the next
wider one, each at half, once and twice the configured group size. Why not every width:
below the budget's width the loss is far from quadratic (2-3 bits) and the second-order costs
underestimate it, so a DP free to pick them sends exactly those layers there (widths 2-8 at
g64 measured 27.68 at the bytes of uniform 4-bit, above uniform's 26.96). Why group sizes: a
coarser group is the cheapest way to free bytes (4-bit g128 saves 0.28 bit per weight at a
small error), which then buy 5 bits where the costs say it matters: 26.53 against uniform's
26.96 on SmolLM2 (26.93 vs 27.59 on 16 windows; docs/quality.md).

Model (the linearity result of HIGGS, arXiv 2411.17525): the loss increase of a quantized
model is close to a sum of independent per-layer terms, ``dL ~ sum_l a_l * err_l(b_l)``. Each
term is measured for the layer's actual quantization error at every width, as the
second-order term of the loss in the layer's *output*, with the empirical Fisher taken per
token (`output_fisher_costs`):
``cost_l(b) = 1/2 * sum_tokens sum_rows g_ti^2 * ((W_l - W_hat_l(b)) x_t)_i^2``, ``g`` the
gradient of the language-modelling loss w.r.t. the layer's output, ``x`` its input. Why the
output and per token: a weight-space Fisher from per-window gradients squares a sum over
hundreds of tokens (most of it cancels), so with a few windows it is mostly noise; here every
token is a sample, and ``(W - W_hat) x`` keeps the correlations between input channels that
a diagonal weight-space Fisher drops.

Solver (`allocate`): an exact multiple-choice knapsack by dynamic programming over the byte
budget in `STATES` units (2 KiB for SmolLM2 at 3 bits). Each layer's size is rounded *up* to
whole units, so the chosen widths never exceed the budget; the DP is exact on those sizes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace

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


def output_fisher_costs(model, errors: Mapping[str, Mapping[int, object]], windows  # noqa: ANN001
                        ) -> dict[str, dict[int, float]]:
    """``cost[layer][b]`` (module docstring) summed over ``windows`` (one backward each).

    ``errors[layer][b]``: a zero-argument callable giving ``W - W_hat(b)`` ``[N, K]``
    (dequantized on demand, so only one error matrix is alive at a time).
    """
    import torch

    costs = {n: dict.fromkeys(errors[n], 0.0) for n in errors}

    def capture(name: str):  # noqa: ANN202
        def hook(_module, args, output) -> None:  # noqa: ANN001
            x = args[0].detach()

            def on_grad(g: torch.Tensor) -> None:
                g2 = g.detach().float().square()
                for b, error in errors[name].items():
                    d = torch.nn.functional.linear(x.float(), error())
                    costs[name][b] += 0.5 * float((g2 * d.square()).sum())
            output.register_hook(on_grad)
        return hook

    embeddings = model.get_input_embeddings()
    handles = [model.get_submodule(n).register_forward_hook(capture(n)) for n in errors]
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.enable_grad():
            for win in windows:
                ids = torch.as_tensor(win).reshape(1, -1)
                embeds = embeddings(ids).detach().requires_grad_(True)  # the graph starts here
                loss = model(inputs_embeds=embeds, labels=ids, use_cache=False).loss
                loss.backward()
    finally:
        for h in handles:
            h.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
    return costs


def allocatable_shapes(model, config) -> dict[str, tuple[int, int]]:  # noqa: ANN001
    """``[N, K]`` of every linear the budget covers (the head keeps its own width)."""
    from ..config import is_head
    from ..nn import eligible_linears

    return {n: tuple(lin.weight.shape) for n, (lin, _) in eligible_linears(model, config).items()
            if not is_head(n)}


def fixed_by_overrides(shapes: Mapping[str, Sequence[int]], config) -> dict[str, int]:  # noqa: ANN001
    """Bytes of the layers the user's own ``overrides`` pin (the allocation leaves them be
    and gives the rest what is left of the budget)."""
    return {n: layer_bytes(s, config.bits_for(n), config.group_size_for(n))
            for n, s in shapes.items() if any(re.search(p, n) for p, _ in config.overrides)}


def quantization_costs(model, config, windows, options: Sequence[Option],  # noqa: ANN001
                       names: Sequence[str]) -> dict[str, dict[Option, float]]:
    """``cost[layer][(bits, group size)]`` for the linears ``names`` (module doc).

    Every layer is quantized once per option first (the records are kept, ~1.4x the float
    weights' bytes over six options); the Fisher pass then dequantizes one error at a time.
    """
    from .methods import quantize

    errors: dict[str, dict[Option, object]] = {}
    for name in names:
        lin = model.get_submodule(name)
        w = lin.weight.detach().float()
        records = {(b, g): quantize(w, replace(config.method_config(name, b), group_size=g),
                                    name=name) for b, g in options}
        errors[name] = {o: (lambda r=r, lin=lin: lin.weight.detach().float() - r.dequantize())
                        for o, r in records.items()}
    return output_fisher_costs(model, errors, windows)


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
