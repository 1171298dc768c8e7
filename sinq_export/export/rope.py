"""Rotary cos/sin tables computed by the source model's own transformers rotary module.

The graph reads position ``p``'s angles from static tables of ``max_position_embeddings`` rows
(GroupQueryAttention's ``cos_cache`` / ``sin_cache``; the fp16 graph gathers from the same
tables). GroupQueryAttention refuses a sequence longer than the table, so that is the export's
whole context (genai_config.json's ``context_length``). mobius fills the tables from its own
copy of each rope type's formulas, which drifts from transformers (its dynamic NTK scales the
base at every position, where transformers keeps the plain base up to
``max_position_embeddings``); we overwrite them with what transformers' rotary module returns
for a sequence of that length. A static table is exact only where a position's angles do not
depend on the length of the sequence around it, which is checked on transformers' own module
(`transformers_tables`), so a rope type is refused exactly when a table cannot hold it:

* ``default``, ``linear``, ``llama3``, ``yarn``: fixed frequencies (yarn's attention factor
  scales cos and sin, as transformers does): exact at every row.
* ``dynamic`` (NTK): transformers raises the base only once the sequence is longer than
  ``max_position_embeddings``, by an amount that depends on that length; up to it, which is
  everything the export can run, it keeps the plain base, so the table is exact.
* ``longrope``: picks short or long factors for the *whole* sequence by its length (positions
  before ``original_max_position_embeddings`` change once the sequence passes it): refused
  when ``original_max_position_embeddings`` is below ``max_position_embeddings``, exact when
  they are equal (only the short factors are ever used).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .graph import ExportError


def rope_sections(config: Mapping) -> list[tuple[str, Mapping]]:
    """(field path, rope dict) for each rope setting; Gemma3 nests one per layer type."""
    key = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
    rope = config.get(key) or {}
    if not isinstance(rope, Mapping):
        return []
    nested = [(f"{key}.{k}", v) for k, v in rope.items() if isinstance(v, Mapping)]
    return nested or [(key, rope)]


def rope_type(rope: Mapping) -> str:
    return str(rope.get("rope_type", rope.get("type", "default")))


def transformers_tables(hf_config: Any) -> dict[str | None, tuple[np.ndarray, np.ndarray]]:
    """Layer type (None: one table for every layer) -> (cos, sin) ``[max_position_embeddings,
    rotary_dim / 2]`` float32, from transformers' rotary module for that many positions.

    A static table is exact only if a position's angles do not depend on the length of the
    sequence around it: the module is also run on the shorter sequences where a rope type
    may switch (one token, ``original_max_position_embeddings``) and must give the same rows;
    otherwise the config is refused (`ExportError`).
    """
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=False):  # only the rotary buffers are real
            model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    except Exception as exc:  # a rope dict transformers rejects (missing factors, ...)
        raise ExportError(f"{getattr(hf_config, '_name_or_path', '')}: transformers cannot build "
                          f"the model's rotary embedding ({exc})") from exc
    rotary = model.model.rotary_emb
    context = int(hf_config.max_position_embeddings)
    x = torch.zeros(1, dtype=torch.float32)
    out = {}
    with torch.inference_mode():
        for layer_type in sorted(getattr(rotary, "layer_types", None) or [None]):
            args = () if layer_type is None else (layer_type,)
            lengths = sorted({1, *_switch_lengths(hf_config, layer_type), context})
            tables = [rotary(x, torch.arange(n)[None], *args) for n in lengths]
            cos, sin = (t[0].numpy() for t in tables[-1])
            for n, (c, s) in zip(lengths, tables):
                if not (np.array_equal(c[0].numpy(), cos[:n]) and np.array_equal(s[0].numpy(), sin[:n])):
                    raise ExportError(_length_dependent(hf_config, layer_type, n, context))
            half = cos.shape[-1] // 2  # transformers repeats the angles: cat(freqs, freqs)
            out[layer_type] = (cos[:, :half].copy(), sin[:, :half].copy())
    return out


def _rope_dict(hf_config: Any, layer_type: str | None) -> Mapping:
    rope = getattr(hf_config, "rope_parameters", None) or {}
    return rope.get(layer_type, {}) if layer_type is not None else rope


def _switch_lengths(hf_config: Any, layer_type: str | None) -> set[int]:
    original = _rope_dict(hf_config, layer_type).get("original_max_position_embeddings")
    return {int(original)} if original else set()


def _length_dependent(hf_config: Any, layer_type: str | None, n: int, context: int) -> str:
    kind = rope_type(_rope_dict(hf_config, layer_type))
    where = f" ({layer_type})" if layer_type else ""
    return (f"{getattr(hf_config, '_name_or_path', '')}: config.json rope_type={kind!r}{where}: "
            f"a position's angles differ between a sequence of {n} tokens and one of {context} "
            "(max_position_embeddings); they depend on the sequence length, which a static "
            "rotary table cannot represent")


# mobius rope module (attribute of the decoder model) -> transformers layer type, for models
# with one table per layer type (Gemma3); the others have one ``rotary_emb``
_MOBIUS_LAYER_TYPES = {"rotary_emb": "full_attention", "rotary_emb_local": "sliding_attention"}


def use_transformers_tables(module: Any, tables: dict[str | None, tuple[np.ndarray, np.ndarray]]
                            ) -> None:
    """Replace the cos/sin tables of every mobius rope module of ``module`` (in place) by
    `transformers_tables`' ``tables``."""
    import onnx_ir as ir
    from mobius.components._rotary_embedding import BaseRope
    from onnxscript import nn

    for name, rope in module.named_modules():
        if not isinstance(rope, BaseRope):
            continue
        key = None if None in tables else _MOBIUS_LAYER_TYPES.get(name.rpartition(".")[2])
        if key not in tables and None not in tables and key in _MOBIUS_LAYER_TYPES.values():
            continue  # no layer of this type (mobius builds both tables): no node reads it
        if key not in tables:
            raise ExportError(f"no transformers rotary table for mobius' {name} "
                              f"(layer types: {sorted(map(str, tables))})")
        for attr, table in zip(("cos_cache", "sin_cache"), tables[key]):
            old = getattr(rope, attr)
            if list(old.shape) != list(table.shape):
                raise ExportError(f"{name}.{attr}: mobius' table has shape {list(old.shape)}, "
                                  f"transformers' {list(table.shape)}")
            setattr(rope, attr, nn.Parameter(list(table.shape), name=attr, data=ir.tensor(table)))
