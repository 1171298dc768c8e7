"""The PyTorch stage's public names, in one import: `SinqLinear`, `quantize_model(model,
config)`, the planning of a quantization, and the saved format.

Each lives in the module named for what it does: `linear` (the quantized layer and the model
tree helpers), `quantize` (the driver), `planning` (calibration windows, bit allocation),
`saved` (safetensors + JSON); the calibration that runs the float model is `calibration`.
"""

from .linear import SinqLinear, eligible_linears, quantized_layers
from .planning import QuantizationPlan, plan_quantization, quantize_planned
from .quantize import LayerReport, QuantizationReport, quantize_model
from .saved import (
    QUANTIZED_MARKER,
    QUANTIZED_META_FILE,
    QUANTIZED_WEIGHTS_FILE,
    load_quantized,
    save_quantized,
    write_quantized,
)

__all__ = [
    "QUANTIZED_MARKER",
    "QUANTIZED_META_FILE",
    "QUANTIZED_WEIGHTS_FILE",
    "LayerReport",
    "QuantizationPlan",
    "QuantizationReport",
    "SinqLinear",
    "eligible_linears",
    "load_quantized",
    "plan_quantization",
    "quantize_model",
    "quantize_planned",
    "quantized_layers",
    "save_quantized",
    "write_quantized",
]
