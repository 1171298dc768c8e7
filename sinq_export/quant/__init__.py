"""Quantization stage: Sinkhorn normalisation, group RTN, packing, and the record they produce."""

from .core import QuantizationError, quantize_jointly, quantize_weight, relative_error
from .record import QuantizedWeight

__all__ = [
    "QuantizationError",
    "QuantizedWeight",
    "quantize_jointly",
    "quantize_weight",
    "relative_error",
]
