"""``dtype='fp16'``: activations, KV cache, scales and float weights in float16.

Done after the rewrite with onnxruntime's own converter (`onnxruntime.transformers.float16`),
which knows the com.microsoft ops: MatMulNBits then takes float16 ``A`` and ``scales`` (its
CPU kernel accepts both types). The graph's inputs/outputs (logits, past/present) become
float16 too, which ``ORTModelForCausalLM`` and onnxruntime-genai read from the graph.
Ops whose float16 CPU kernels are missing or inaccurate are kept in float32 with casts
around them (the converter's default block list).
"""

from __future__ import annotations

import onnx


def convert_to_fp16(model: onnx.ModelProto) -> None:
    """Convert ``model`` in place to float16 (weights and activations)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = convert_float_to_float16(model, keep_io_types=False, disable_shape_infer=True)
    if converted is not model:
        model.CopyFrom(converted)
