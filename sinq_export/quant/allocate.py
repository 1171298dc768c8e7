"""Bit allocation to a size budget: one width per linear from `WIDTHS`, minimising the
predicted loss increase at a given number of bytes.

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

import numpy as np

from . import packing

WIDTHS = (2, 3, 4, 5, 6, 8)
STATES = 20_000  # DP resolution: the budget is cut into this many units


def layer_bytes(shape: Sequence[int], bits: float, group_size: int) -> int:
    """Bytes of one quantized ``[N, K]`` linear: codes, fp32 scales, zero points, fp32 ``t``."""
    n, k = shape
    nb = packing.n_blocks(k, group_size)
    return math.ceil(n * nb * group_size * bits / 8 + n * nb * 4
                     + n * math.ceil(nb * bits / 8) + k * 4)


def budget_bytes(shapes: Mapping[str, Sequence[int]], bits: float, group_size: int) -> int:
    """The bytes of every layer at ``bits`` (fractional bits give an average-bits budget)."""
    return sum(layer_bytes(s, bits, group_size) for s in shapes.values())


def allocate(costs: Mapping[str, Mapping[int, float]], sizes: Mapping[str, Mapping[int, int]],
             budget: int, unit: int | None = None) -> dict[str, int]:
    """Width per layer minimising ``sum cost[l][b]`` subject to ``sum size[l][b] <= budget``.

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


def quantization_costs(model, config, windows, widths: Sequence[int] = WIDTHS  # noqa: ANN001
                       ) -> tuple[dict[str, dict[int, float]], dict[str, tuple[int, int]]]:
    """(cost[layer][bits], shape[layer]) for every linear ``config`` quantizes (see module doc).

    Every layer is quantized once per width first (the records are kept, ~0.9x the float
    weights' bytes over all widths); the Fisher pass then dequantizes one error at a time.
    """
    from ..config import is_head
    from ..nn import eligible_linears
    from .methods import quantize

    linears = {n: v for n, v in eligible_linears(model, config).items()
               if not is_head(n)}  # the head keeps its own width
    errors: dict[str, dict[int, object]] = {}
    for name, (lin, _) in linears.items():
        w = lin.weight.detach().float()
        records = {b: quantize(w, config.method_config(name, b), name=name) for b in widths}
        errors[name] = {b: (lambda r=r, lin=lin: lin.weight.detach().float() - r.dequantize())
                        for b, r in records.items()}
    costs = output_fisher_costs(model, errors, windows)
    return costs, {n: tuple(lin.weight.shape) for n, (lin, _) in linears.items()}


def plan_overrides(costs: Mapping[str, Mapping[int, float]], shapes: Mapping[str, Sequence[int]],
                   group_size: int, budget: int
                   ) -> tuple[tuple[tuple[str, int], ...], dict[str, int]]:
    """(`SinqConfig.overrides`, one anchored pattern per layer; width per layer) at ``budget``."""

    sizes = {n: {b: layer_bytes(shapes[n], b, group_size) for b in costs[n]} for n in costs}
    widths = allocate(costs, sizes, budget)
    return tuple((f"^{re.escape(n)}$", b) for n, b in widths.items()), widths
