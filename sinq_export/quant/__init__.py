"""Quantization stage: method registry, Sinkhorn normalisation, group quantizer, packing, record."""

from .core import QuantizationError, quantize_jointly, quantize_weight, relative_error
from .methods import METHODS, MethodConfig, RTNConfig, SINQConfig, make_config, quantize
from .record import QuantizedWeight

__all__ = [
    "METHODS",
    "MethodConfig",
    "QuantizationError",
    "QuantizedWeight",
    "RTNConfig",
    "SINQConfig",
    "make_config",
    "quantize",
    "quantize_jointly",
    "quantize_weight",
    "relative_error",
]
