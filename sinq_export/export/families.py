"""Per-family fixes applied to a mobius decoder module before the build (docs/export-format.md,
"Architectures").

mobius-onnx 0.1.0 builds Llama, Mistral, Qwen2 and Qwen3 as the transformers classes compute
them. For two families its module differs from transformers, so we adjust the module tree
(no weights are involved; mobius still emits every node):

* **Gemma3 text.** mobius' `Gemma3TextModel` never takes its fused-attention path: on the CPU
  EP, ``RotaryAttentionToGQA`` rewrites each layer's ``Attention`` to ``GroupQueryAttention``
  afterwards, but reuses the *first* layer's rope tables for every layer (so full-attention
  layers get the sliding layers' theta) and drops the sliding-window mask. It also scales
  attention by ``head_dim**-0.5`` instead of ``query_pre_attn_scalar**-0.5`` and rounds the
  embedding scale ``sqrt(hidden)`` to float16. `Gemma3GQATextModel` emits one GQA context per
  layer type (its own rope tables; ``local_window_size`` for sliding layers) the way mobius'
  `TextModel` does for uniform models, with transformers' scale and embedding factor.
* **Phi3.** transformers keeps ``qkv_proj`` fused; mobius splits it into q/k/v at weight-load
  time. We keep it fused: one ``qkv_proj`` linear (one quantization unit, one t, the HF name
  the manifest and validator use) whose output rows are sliced for q, k and v. Quantizing the
  fused weight, not its row blocks, is what the transformers reference does (its
  `SinqLinear` replaces the fused ``nn.Linear``), so the two stay bit-identical.
  ``gate_up_proj`` is already fused in mobius (`FusedGateUpMLP`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir
from mobius.models.gemma3_text import Gemma3TextModel
from onnxscript import OpBuilder, nn

from .graph import ExportError


def check_family_config(config: Mapping, folder: object) -> None:
    """Refuse config fields a family's builder cannot honour (one line naming the field)."""
    model_type = config.get("model_type")
    if model_type == "gemma3_text":
        for key in ("final_logit_softcapping", "attn_logit_softcapping"):
            if config.get(key) is not None:
                raise ExportError(f"{folder}: config.json {key}={config[key]!r} is not supported "
                                  "for gemma3_text (only null)")
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        local = rope.get("sliding_attention") if isinstance(rope, Mapping) else None
        if isinstance(local, Mapping) and local.get("rope_type", "default") != "default":
            raise ExportError(f"{folder}: config.json rope_parameters.sliding_attention.rope_type="
                              f"{local['rope_type']!r} is not supported (only 'default')")


def check_window(hf_config: Any, dtype: ir.DataType) -> None:
    """Refuse a sliding window the graph would not apply (it diverges past the window).

    mobius applies a window through GroupQueryAttention's ``local_window_size``, only when
    every layer slides (Mistral, Phi3) and only where it emits GQA (float32 on CPU; fp16 gets
    plain ``Attention`` without one). Gemma3's per-layer-type windows are ours
    (`Gemma3GQATextModel`) or mobius' masks on the fp16 path; other mixed patterns (Qwen2
    with ``use_sliding_window``) have no window in mobius at all.
    """
    from mobius._execution_providers import get_ep

    window = getattr(hf_config, "sliding_window", None)
    if not window or window >= getattr(hf_config, "max_position_embeddings", window + 1):
        return
    if hf_config.model_type == "gemma3_text":
        return
    folder = getattr(hf_config, "_name_or_path", "")
    sliding = [t == "sliding_attention" for t in getattr(hf_config, "layer_types", None) or []]
    if sliding and not any(sliding):
        return  # the window is declared but no layer uses it
    if sliding and not all(sliding):
        raise ExportError(f"{folder}: config.json layer_types mixes sliding and full attention "
                          f"(sliding_window={window}), which is not supported for "
                          f"{hf_config.model_type}")
    if dtype not in get_ep("cpu").gqa_dtypes:
        raise ExportError(f"{folder}: config.json sliding_window={window} cannot be honoured "
                          f"with dtype {dtype.name} (only float32 graphs apply it); use fp32")


def adapt(module: nn.Module, cfg: Any, hf_config: Any) -> nn.Module:
    """The module with the family's fixes applied (in place where possible)."""
    model_type = hf_config.model_type
    if model_type == "gemma3_text":
        module.model = Gemma3GQATextModel(cfg, hf_config)
    elif model_type == "phi3":
        for layer in module.model.layers:
            _fuse_qkv(layer.self_attn)
    return module


# ------------------------------------------------------------------------------ Gemma3


class Gemma3GQATextModel(Gemma3TextModel):
    """mobius' Gemma3 text model with per-layer-type GroupQueryAttention (see module doc)."""

    def __init__(self, config: Any, hf_config: Any) -> None:
        super().__init__(config)
        # transformers: hidden_size**0.5 in the weight dtype (mobius rounds it to float16)
        self.embed_tokens.embed_scale = float(np.float32(config.hidden_size ** 0.5))
        scale = float(getattr(hf_config, "query_pre_attn_scalar", None) or config.head_dim) ** -0.5
        for layer in self.layers:
            layer.self_attn.scaling = scale

    def _gqa_contexts(self, op: OpBuilder, attention_mask: ir.Value,
                      position_ids: ir.Value) -> dict[str, Any] | None:
        from mobius._build_context import ep_capabilities, get_build_dtype
        from mobius.components._attention import GQAContext

        if attention_mask is None or get_build_dtype() not in ep_capabilities().gqa_dtypes:
            return None
        one = op.Constant(value_int=1)
        seqlens_k = op.Cast(op.Sub(op.ReduceSum(attention_mask, [1], keepdims=0), one),
                            to=ir.DataType.INT32)
        total = op.Cast(op.Gather(op.Shape(attention_mask), 1), to=ir.DataType.INT32)
        ropes = {"full_attention": (self.rotary_emb, -1),
                 "sliding_attention": (self.rotary_emb_local, int(self.sliding_window or -1))}
        contexts = {}
        for layer_type in dict.fromkeys(self.layer_types):
            rope, window = ropes[layer_type]
            rope(op, position_ids)  # registers its cos/sin tables as initializers
            contexts[layer_type] = GQAContext(seqlens_k, total, rope.cos_cache, rope.sin_cache,
                                              local_window_size=window)
        return contexts

    def forward(self, op: OpBuilder, input_ids: ir.Value, attention_mask: ir.Value,
                position_ids: ir.Value, past_key_values: list | None = None,
                inputs_embeds: ir.Value | None = None):
        contexts = self._gqa_contexts(op, attention_mask, position_ids)
        if contexts is None:  # no fused attention for this EP / dtype: mobius' own path
            return super().forward(op, input_ids, attention_mask, position_ids,
                                   past_key_values, inputs_embeds)
        hidden = inputs_embeds if inputs_embeds is not None else self.embed_tokens(op, input_ids)
        presents = []
        past_kvs = past_key_values or [None] * len(self.layers)
        for layer, layer_type, past_kv in zip(self.layers, self.layer_types, past_kvs):
            hidden, present = layer(op, hidden_states=hidden, attention_bias=contexts[layer_type],
                                    position_embeddings=None, past_key_value=past_kv)
            presents.append(present)
        return self.norm(op, hidden), presents


# ------------------------------------------------------------------------------ Phi3


class _FusedOutput:
    """Calls ``owner.<attr>`` once per input value and hands its output to each row slice.

    A plain object (not an ``nn.Module``), so the fused linear's parameters stay named under
    ``owner`` only (``...self_attn.qkv_proj.*``), and the linear is looked up at call time, so
    `builder.replace_linears` can swap it after this wiring.
    """

    def __init__(self, owner: nn.Module, attr: str) -> None:
        self._owner, self._attr = owner, attr
        self._last: tuple[ir.Value, ir.Value] | None = None

    def __call__(self, op: OpBuilder, x: ir.Value) -> ir.Value:
        if self._last is None or self._last[0] is not x:
            self._last = (x, getattr(self._owner, self._attr)(op, x))
        return self._last[1]


class RowSlice(nn.Module):
    """Rows ``[start, stop)`` of a fused projection's output (q, k or v of ``qkv_proj``)."""

    def __init__(self, fused: _FusedOutput, start: int, stop: int) -> None:
        super().__init__()
        self._fused, self._start, self._stop = fused, start, stop

    def forward(self, op: OpBuilder, x: ir.Value) -> ir.Value:
        # Call the fused linear in the attention's scope, not this slice's, so its
        # initializers are named ``...self_attn.qkv_proj.*`` (the checkpoint's names).
        op.builder.pop_module()
        try:
            y = self._fused(op, x)
        finally:
            op.builder.push_module(self._name or "", type(self).__qualname__)
        return op.Slice(y, op.Constant(value_ints=[self._start]),
                        op.Constant(value_ints=[self._stop]), op.Constant(value_ints=[-1]))


def _fuse_qkv(attn: nn.Module) -> None:
    """q/k/v_proj -> one ``qkv_proj`` linear of the HF layout plus three row slices."""
    from mobius.components import Linear

    hidden = int(attn.q_proj.weight.shape[1])
    widths = [int(getattr(attn, p).weight.shape[0]) for p in ("q_proj", "k_proj", "v_proj")]
    attn.qkv_proj = Linear(hidden, sum(widths), bias=attn.q_proj.bias is not None)
    fused = _FusedOutput(attn, "qkv_proj")
    start = 0
    for proj, width in zip(("q_proj", "k_proj", "v_proj"), widths):
        setattr(attn, proj, RowSlice(fused, start, start + width))
        start += width
