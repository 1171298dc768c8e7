"""ONNX export: SINQ-quantized linears as ``com.microsoft::MatMulNBits`` (or our custom op).

Public API:

    from sinq_export.export import export_causal_lm, export_module
    export_causal_lm(None, "out", SinqConfig(bits=4))          # bundled SmolLM2 -> OUT_DIR
    export_module(mlp, torch.randn(2, 64), "out", SinqConfig())  # any torch module

Causal LMs (`decoder`): the graph is *built* from config.json with mobius-onnx (`builder`:
fused GroupQueryAttention / SkipSimplifiedLayerNorm, our quantized linears swapped in) and the
weights stream through it (`weights`: lazy tensors, quantized when written). Plain modules
(`module`): traced with ``torch.onnx.export`` and rewritten (`graph`, `folding`, `rewrite`,
`writer`, `dtype`). Shared: `layout` (record -> initializers), `genai` (genai_config.json),
`manifest` (sinq_export.json).
"""

from .decoder import export_causal_lm
from .graph import ExportError
from .manifest import ExportResult
from .module import export_module

__all__ = ["ExportError", "ExportResult", "export_causal_lm", "export_module"]
