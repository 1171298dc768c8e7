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
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from .record import QuantizedWeight
from .stats import LayerStats

GPTQ_DAMP = 0.01  # GPTQ's own damping, a fraction of mean(diag(H')) (the paper's value)


@dataclass(frozen=True)
class MethodConfig:
    """What every method needs: code width and group (block) size along K."""

    bits: int = 4
    group_size: int = 64
    symmetric: bool = False
    # Per-group range search under the integer-zero-point constraint (`rtn.search_params`).
    # Off by default: it lowers the weight error but raises perplexity (docs/quality.md):
    # clipping the extremes hurts.
    scale_search: bool = False
    # Weighted least-squares refits of each group's scale on the min/max range
    # (`rtn.refit_params`), weighted by t^2 * E[x^2] when the input energies are known (the
    # calibration-free default gets them from a random-token probe); 0 = plain min/max.
    scale_refit: int = 0

    def gptq_damping(self) -> float | None:
        """GPTQ's damping when this method rounds with GPTQ on calibration statistics, else
        None (round to nearest)."""
        return None

    def without_gptq(self) -> MethodConfig:
        """This config rounding to nearest (what A-SINQ's search scores its candidates with)."""
        return self

    def label(self, record: QuantizedWeight) -> str:
        """How a report names what this method did to ``record``."""
        return "rtn"


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
    awq: bool = True
    gptq: bool = True
    gptq_damp: float = GPTQ_DAMP
    col_scale_tie: tuple[int, int] | None = None

    def gptq_damping(self) -> float | None:
        return self.gptq_damp if self.gptq else None

    def without_gptq(self) -> SINQConfig:
        return replace(self, gptq=False)

    def label(self, record: QuantizedWeight) -> str:
        return "sinq" if record.col_scale is not None else "rtn(gated)"


Handler = Callable[..., QuantizedWeight]
# ``yields_col_scale(config, weight, calibrated)``: whether the handler will return a column
# scale t for this weight (``weight()`` loads it, for a method that decides per weight), given
# calibration statistics or not.
ColScaleRule = Callable[[MethodConfig, Callable[[], torch.Tensor], bool], bool]


@dataclass(frozen=True)
class Method:
    """One registered method: its name, its config class, the handler that quantizes and the
    rule that says, before quantizing, whether the record will carry a t (the export plans
    the graph's t inputs and folds from it)."""

    name: str
    config: type[MethodConfig]
    handler: Handler
    yields_col_scale: ColScaleRule


METHODS: dict[str, Method] = {}


def register(name: str, config_cls: type[MethodConfig], yields_col_scale: ColScaleRule
             ) -> Callable[[Handler], Handler]:
    """Register ``handler(weight, config, *, calibration, name) -> QuantizedWeight``."""

    def deco(handler: Handler) -> Handler:
        if name in METHODS:
            raise ValueError(f"quantization method {name!r} is already registered")
        METHODS[name] = Method(name, config_cls, handler, yields_col_scale)
        return handler

    return deco


def method_of(config: MethodConfig) -> Method:
    """The registered method ``config`` belongs to."""
    for method in METHODS.values():
        if type(config) is method.config:
            return method
    raise TypeError(f"{type(config).__name__} is not a registered method config")


def make_config(method: str, **kwargs: Any) -> MethodConfig:
    """The method's config from keyword arguments (None keeps a field's default); a key the
    method does not have is refused: it would be silently ignored."""
    try:
        cls = METHODS[method].config
    except KeyError:
        raise ValueError(f"unknown quantization method {method!r}; "
                         f"choose one of {sorted(METHODS)}") from None
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"method {method!r} has no setting {', '.join(map(repr, unknown))} "
                         f"(its settings: {', '.join(sorted(known))})")
    return cls(**{k: v for k, v in kwargs.items() if v is not None})


def yields_col_scale(config: MethodConfig, weight: Callable[[], torch.Tensor],
                     calibrated: bool = False) -> bool:
    """Whether quantizing ``weight()`` with ``config`` (and calibration statistics when
    ``calibrated``) gives a record with a column scale t; ``weight`` is called only by a
    method that decides per weight."""
    return method_of(config).yields_col_scale(config, weight, calibrated)


def quantize(weight: torch.Tensor, config: MethodConfig, *, calibration: LayerStats | None = None,
             name: str = "weight") -> QuantizedWeight:
    """Quantize one ``[N, K]`` weight with the method ``config`` belongs to.

    ``calibration`` (optional) is a `stats.LayerStats` of the layer's inputs; handlers
    that do not use calibration ignore it.
    """
    return method_of(config).handler(weight, config, calibration=calibration, name=name)
