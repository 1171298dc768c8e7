"""Quantization methods as registered handlers (the torchao ``quantize_(model, config)`` pattern).

Each method is one frozen config dataclass plus one handler registered under the method's
name; `quantize` is the single entry point that dispatches on the config's type. Every handler
returns the same `QuantizedWeight` (integer zero points in ``[0, 2^bits - 1]``, no ``g_idx``),
so every method runs on stock ``MatMulNBits`` at full speed.

Why a registry instead of ``if method == ...`` branches: the CLI, the config and the benches
list methods by name from one table (`METHODS`), a new method is one dataclass and one
function, and a method's knobs live in its own config instead of a union of everyone's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch

from .record import QuantizedWeight

GPTQ_DAMP = 0.01  # GPTQ's own damping, a fraction of mean(diag(H')) (the paper's value)


@dataclass(frozen=True)
class MethodConfig:
    """What every method needs: code width and group (block) size along K."""

    bits: int = 4
    group_size: int = 64
    symmetric: bool = False
    # Per-group range search under the integer-zero-point constraint (`rtn.search_params`).
    # Off by default: on SmolLM2 it lowers the weight error but raises perplexity (4-bit
    # 26.96 -> 31.95, 3-bit 61.4 -> 200; docs/quality.md), i.e. clipping extremes hurts.
    scale_search: bool = False
    # Weighted least-squares refits of each group's scale on the min/max range
    # (`rtn.refit_params`), weighted by t^2 * E[x^2] when the input energies are known (the
    # calibration-free default gets them from a random-token probe); 0 = plain min/max.
    scale_refit: int = 0


@dataclass(frozen=True)
class RTNConfig(MethodConfig):
    """Plain group round-to-nearest (the baseline): min/max range, integer zero point."""


@dataclass(frozen=True)
class SINQConfig(MethodConfig):
    """Sinkhorn-normalised quantization (arXiv 2509.22944).

    Attributes:
        sinkhorn_iters: normalisation iterations per tile (the paper uses 16).
        kurtosis_gate: whole-matrix kurtosis above which the layer falls back to RTN (the
            reference's rule; None = off).
        tile_gate: per tile, keep the Sinkhorn result only where its error (in the original
            weight's units, importance-weighted when calibrated) is below plain RTN's. Off by
            default: lower weight error, higher perplexity on SmolLM2 (docs/quality.md).
        awq, gptq: with calibration statistics, search an activation-aware factor of ``t``
            (A-SINQ) and round with GPTQ's error compensation; ignored without statistics.
        gptq_damp: GPTQ's Tikhonov damping as a fraction of the mean Hessian diagonal (0.01 as
            in the GPTQ paper; `SinqConfig` raises it for decoder linears, whose compensation
            otherwise fits the calibration text, docs/quality.md).
        col_scale_tie: ``(kv_heads, heads_per_kv)``: the input channels are attention heads
            ``[kv_heads, heads_per_kv, head_dim]`` and ``t`` is tied (geometric mean) over the
            query heads that read one kv head, so it can move onto that kv head's value rows
            (`core.tie_col_scale`); None = a free t per channel.
    """

    sinkhorn_iters: int = 16
    kurtosis_gate: float | None = None
    tile_gate: bool = False
    awq: bool = True
    gptq: bool = True
    gptq_damp: float = GPTQ_DAMP
    col_scale_tie: tuple[int, int] | None = None


Handler = Callable[..., QuantizedWeight]


@dataclass(frozen=True)
class Method:
    """One registered method: its name, its config class and the handler that quantizes."""

    name: str
    config: type[MethodConfig]
    handler: Handler


METHODS: dict[str, Method] = {}


def register(name: str, config_cls: type[MethodConfig]) -> Callable[[Handler], Handler]:
    """Register ``handler(weight, config, *, calibration, name) -> QuantizedWeight``."""

    def deco(handler: Handler) -> Handler:
        if name in METHODS:
            raise ValueError(f"quantization method {name!r} is already registered")
        METHODS[name] = Method(name, config_cls, handler)
        return handler

    return deco


def method_of(config: MethodConfig) -> Method:
    """The registered method ``config`` belongs to."""
    for method in METHODS.values():
        if type(config) is method.config:
            return method
    raise TypeError(f"{type(config).__name__} is not a registered method config")


def make_config(method: str, **kwargs: Any) -> MethodConfig:
    """The method's config from keyword arguments; keys the method does not know are ignored."""
    try:
        cls = METHODS[method].config
    except KeyError:
        raise ValueError(f"unknown quantization method {method!r}; "
                         f"choose one of {sorted(METHODS)}") from None
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in kwargs.items() if k in known and v is not None})


def quantize(weight: torch.Tensor, config: MethodConfig, *, calibration: Any = None,
             name: str = "weight") -> QuantizedWeight:
    """Quantize one ``[N, K]`` weight with the method ``config`` belongs to.

    ``calibration`` (optional) is a `calibrate.LayerStats` of the layer's inputs; handlers
    that do not use calibration ignore it.
    """
    return method_of(config).handler(weight, config, calibration=calibration, name=name)
