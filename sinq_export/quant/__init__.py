"""Quantization: pure tensors in, `QuantizedWeight` records out.

The method registry (`methods`), its handlers (`handlers`, imported here so that every
method is registered once the package is), Sinkhorn normalisation, the group quantizer,
A-SINQ, GPTQ, the bit allocation's solver, packing and the record. Nothing here runs a model
or reads a file: the calibration layer above hands in statistics.
"""

from .core import QuantizationError
from .handlers import quantize_jointly, relative_error
from .methods import METHODS, MethodConfig, RTNConfig, SINQConfig, make_config, quantize
from .record import QuantizedWeight
from .units import quantize_unit

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
    "quantize_unit",
    "relative_error",
]
