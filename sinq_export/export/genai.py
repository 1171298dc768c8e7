"""``genai_config.json``: lets onnxruntime-genai (``og.Model(OUT_DIR)``) run the export.

The graph is optimum's text-generation-with-past graph, not the genai model builder's, so
the config names optimum's tensors and turns off the features that need the builder's graph:

* ``past_present_share_buffer: false`` - optimum's graph concatenates past and new keys and
  returns a *longer* ``present`` tensor; genai's shared buffer needs a fixed-size cache and
  GroupQueryAttention.
* ``position_ids`` is an input (optimum computes rotary positions from it).

Everything comes from the HF config, so the file is identical for identical inputs.
"""

from __future__ import annotations

from typing import Any


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, list | tuple) and value else value


def genai_config(
    hf_config: Any,
    generation_config: Any | None = None,
    *,
    filename: str = "model.onnx",
) -> dict:
    """The genai configuration dict for an optimum-style decoder export."""
    heads = hf_config.num_attention_heads
    head_size = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    context = getattr(hf_config, "max_position_embeddings", 2048)
    gen = generation_config
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    eos = eos if eos is not None else hf_config.eos_token_id
    bos = getattr(gen, "bos_token_id", None) if gen is not None else None
    bos = bos if bos is not None else hf_config.bos_token_id
    pad = getattr(hf_config, "pad_token_id", None)
    pad = pad if pad is not None else _first(eos)
    return {
        "model": {
            "bos_token_id": bos,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": head_size,
                "hidden_size": hf_config.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": heads,
                "num_hidden_layers": hf_config.num_hidden_layers,
                "num_key_value_heads": getattr(hf_config, "num_key_value_heads", heads),
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": hf_config.model_type,
            "vocab_size": hf_config.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }
