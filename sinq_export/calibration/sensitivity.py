"""Per-layer sensitivity for the bit allocation (`quant.allocate`): the second-order loss
increase of each layer's quantization error at every option, measured by running the float
model with gradients (module docstring of `quant.allocate`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import torch
from torch import nn

from ..config import SinqConfig, is_head
from ..linear import eligible_linears
from ..quant.allocate import Option
from ..quant.methods import quantize

Error = Callable[[], torch.Tensor]  # W - W_hat of one layer at one option, made on demand


def output_fisher_costs(model: nn.Module, errors: Mapping[str, Mapping[Option, Error]],
                        windows: torch.Tensor) -> dict[str, dict[Option, float]]:
    """``cost[layer][b]`` (module docstring) summed over ``windows`` (one backward each).

    ``errors[layer][b]``: a zero-argument callable giving ``W - W_hat(b)`` ``[N, K]``
    (dequantized on demand, so only one error matrix is alive at a time).
    """
    costs = {n: dict.fromkeys(errors[n], 0.0) for n in errors}

    def capture(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
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


def allocatable_shapes(model: nn.Module, config: SinqConfig) -> dict[str, tuple[int, int]]:
    """``[N, K]`` of every linear the budget covers (the head keeps its own width)."""
    return {n: tuple(lin.weight.shape) for n, (lin, _) in eligible_linears(model, config).items()
            if not is_head(n)}


def quantization_costs(model: nn.Module, config: SinqConfig, windows: torch.Tensor,
                       options: Sequence[Option],
                       names: Sequence[str]) -> dict[str, dict[Option, float]]:
    """``cost[layer][(bits, group size)]`` for the linears ``names`` (module doc).

    Every layer is quantized once per option first (the records are kept, ~1.4x the float
    weights' bytes over six options); the Fisher pass then dequantizes one error at a time.
    """

    errors: dict[str, dict[Option, Error]] = {}
    for name in names:
        lin = model.get_submodule(name)
        w = lin.weight.detach().float()
        records = {(b, g): quantize(w, replace(config.method_config(name, b), group_size=g),
                                    name=name) for b, g in options}
        errors[name] = {o: (lambda r=r, lin=lin: lin.weight.detach().float() - r.dequantize())
                        for o, r in records.items()}
    return output_fisher_costs(model, errors, windows)
