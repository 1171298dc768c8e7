"""sinq-export: SINQ-quantize PyTorch / Hugging Face models and ship them as onnxruntime models.

Python API (the CLI is a thin shell over these):

    from sinq_export import SinqConfig, quantize_model
    report = quantize_model(model, SinqConfig(bits=4, group_size=64))
"""

from .config import ConfigError, SinqConfig
from .nn import SinqLinear, load_quantized, quantize_model, save_quantized
from .quant import QuantizationError, QuantizedWeight, quantize_weight

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "QuantizationError",
    "QuantizedWeight",
    "SinqConfig",
    "SinqLinear",
    "load_quantized",
    "quantize_model",
    "quantize_weight",
    "save_quantized",
    "__version__",
]
