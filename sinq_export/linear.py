"""`SinqLinear`: the PyTorch reference of one quantized linear, and the model-tree helpers
that find and replace linears.

`SinqLinear` is the reference the ONNX graph is checked against, so it computes exactly what
the graph computes, in the same order: ``y = (x * t) @ ((Q - z) * s).T + b``. Its buffers are
the very tensors of the `QuantizedWeight` record that the exporter writes as initializers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import SinqConfig
from .quant.record import QuantizedWeight


class SinqLinear(nn.Module):
    """A linear layer whose weight is a packed SINQ/RTN `QuantizedWeight`."""

    def __init__(self, record: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = record.in_features, record.out_features
        self.bits, self.group_size = record.bits, record.group_size
        self.register_buffer("packed", record.packed)
        self.register_buffer("scales", record.scales)
        self.register_buffer("zero_points", record.zero_points)
        self.register_buffer("col_scale", record.col_scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self._dequantized: torch.Tensor | None = None

    @property
    def record(self) -> QuantizedWeight:
        return QuantizedWeight(
            packed=self.packed,
            scales=self.scales,
            zero_points=self.zero_points,
            col_scale=self.col_scale,
            bits=self.bits,
            group_size=self.group_size,
            shape=(self.out_features, self.in_features),
        )

    def grouped_weight(self) -> torch.Tensor:
        """``(Q - z) * s`` (cached: the record is immutable once built)."""
        if self._dequantized is None:
            self._dequantized = self.record.dequantize_grouped()
        return self._dequantized

    def drop_cache(self) -> None:
        """Forget the dequantized weight (a float copy of the layer) until the next call."""
        self._dequantized = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.grouped_weight().to(x.dtype)
        if self.col_scale is not None:
            x = x * self.col_scale.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, bias)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.drop_cache()
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        t = "t" if self.col_scale is not None else "no t"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}, {t}")


def eligible_linears(model: nn.Module, config: SinqConfig) -> dict[str, tuple[nn.Linear, int]]:
    """Module name -> (linear, bits) for every nn.Linear the config quantizes."""
    return {
        name: (m, bits)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and (bits := config.bits_for(name)) is not None
    }


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


def quantized_layers(model: nn.Module) -> dict[str, SinqLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SinqLinear)}
