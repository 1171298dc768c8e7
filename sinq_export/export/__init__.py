"""ONNX export: SINQ-quantized linears as ``com.microsoft::MatMulNBits`` (or our custom op).

Public API:

    from sinq_export.export import export_causal_lm, export_module
    export_causal_lm(None, "out", SinqConfig(bits=4))          # bundled SmolLM2 -> OUT_DIR
    export_module(mlp, torch.randn(2, 64), "out", SinqConfig())  # any torch module

Modules: `graph` (find / replace linear sites), `folding` (column-scale placement), `layout`
(record -> initializers, stock containers), `rewrite` (the whole graph rewrite), `writer`
(deterministic external data + checker), `dtype` (fp16), `genai` (genai_config.json),
`manifest` (sinq_export.json), `llm` and `module` (the two routes).
"""

from .graph import ExportError
from .llm import export_causal_lm, export_float_causal_lm
from .manifest import ExportResult
from .module import export_module

__all__ = ["ExportError", "ExportResult", "export_causal_lm", "export_float_causal_lm", "export_module"]
