"""sinq-export: SINQ-quantize PyTorch / Hugging Face models and ship them as onnxruntime models.

Python API (the CLI is a thin shell over these):

    from sinq_export import SinqConfig, quantize_model
    report = quantize_model(model, SinqConfig(bits=4, group_size=64))
    export_causal_lm(None, "out/smollm2-sinq4", SinqConfig(bits=4))   # -> onnxruntime folder
    validate("out/smollm2-sinq4")                                      # parity report

Every name is imported on first use, so `import sinq_export` loads neither torch nor
onnxruntime: the console entry point (`sinq_export.console`) starts in milliseconds and can
answer a Ctrl-C during the seconds those take to import with one line.
"""

__version__ = "0.1.0"

_LAZY = {
    "export_causal_lm": "sinq_export.export",
    "export_module": "sinq_export.export",
    "validate": "sinq_export.validate",
    "ConfigError": "sinq_export.config",
    "GraphConfig": "sinq_export.config",
    "SinqConfig": "sinq_export.config",
    "SinqLinear": "sinq_export.nn",
    "load_quantized": "sinq_export.nn",
    "quantize_model": "sinq_export.nn",
    "save_quantized": "sinq_export.nn",
    "QuantizationError": "sinq_export.quant",
    "QuantizedWeight": "sinq_export.quant",
    "quantize_weight": "sinq_export.quant",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sinq_export' has no attribute {name!r}")


__all__ = [
    "export_causal_lm",
    "export_module",
    "validate",
    "ConfigError",
    "GraphConfig",
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
