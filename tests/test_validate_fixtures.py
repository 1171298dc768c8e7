"""Tiny export folders for the validator / eval unit tests, written by the real exporter.

A 2-layer random Llama (hidden 64, SmolLM2's tokenizer) is saved as a source folder next to
the export and exported with `export_causal_lm` (4-bit SINQ, group 16), so `validate`
rebuilds its reference from that source + the ONNX tensors, as it does for users.
`corrupt_copy` damages one packed byte or one scale of a layer inside the copy's external
data. Also imported by the other test modules (``from test_validate_fixtures import ...``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest


def tokenizer_dir() -> Path:
    """The converted SmolLM2 folder (converted from the bundled GGUF on first use)."""
    from sinq_export.models import default_model_dir

    return default_model_dir()


def tiny_float_model(seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the default init: non-trivial logits
        for p in model.parameters():
            p.mul_(3.0)
    return model


def build_tiny_export(out: Path, bits: int = 4, group_size: int = 16, method: str = "sinq",
                      with_reference: bool = False, col_scale: str = "mul",
                      shared_col_scale: bool = False) -> Path:
    """Source folder ``<out>-src`` (the tiny model + tokenizer) and its export at ``out``."""
    from transformers import AutoTokenizer

    from sinq_export.config import GraphConfig, SinqConfig
    from sinq_export.export import export_causal_lm

    out = Path(out)
    src = out.with_name(out.name + "-src")
    shutil.rmtree(src, ignore_errors=True)
    tiny_float_model().save_pretrained(src)
    AutoTokenizer.from_pretrained(str(tokenizer_dir()), local_files_only=True).save_pretrained(src)
    config = SinqConfig(bits=bits, group_size=group_size, method=method,
                        shared_col_scale=shared_col_scale)
    export_causal_lm(src, out, config,
                     GraphConfig(col_scale=col_scale), overwrite=True, progress=False,
                     with_reference=with_reference)
    return out


def corrupt_copy(src: Path, dst: Path, layer: str, what: str = "byte") -> Path:
    """Copy an export folder and corrupt one packed byte (``byte``) or one group scale
    (``scale``, x8) of ``layer``'s quantized node, in place in the copy's data file."""
    import onnx
    from onnx import helper, numpy_helper

    from sinq_export.validate.rebuild import layer_node_name

    shutil.copytree(src, dst)
    meta = json.loads((dst / "sinq_export.json").read_text())
    graph_file = dst / (meta.get("onnx") or {}).get("file", "model.onnx")
    model = onnx.load(str(graph_file), load_external_data=False)
    node = next(n for n in model.graph.node if n.name == layer_node_name(meta["layers"][layer]))
    target = node.input[1] if what == "byte" else node.input[2]
    index, tensor = next((i, t) for i, t in enumerate(model.graph.initializer) if t.name == target)
    info = {e.key: e.value for e in tensor.external_data}
    if not info:  # inline initializer (small module exports): rewrite the graph file
        arr = numpy_helper.to_array(tensor).copy()
        _corrupt(arr.reshape(-1), what)
        model.graph.initializer[index].CopyFrom(numpy_helper.from_array(arr, target))
        onnx.save(model, str(graph_file))
        return dst
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    offset = int(info.get("offset", 0)) + (int(info["length"]) // 3) // itemsize * itemsize
    with open(graph_file.parent / info["location"], "r+b") as fh:
        fh.seek(offset)
        value = np.frombuffer(fh.read(itemsize), dtype=helper.tensor_dtype_to_np_dtype(
            tensor.data_type)).copy()
        _corrupt(value, what)
        fh.seek(offset)
        fh.write(value.tobytes())
    return dst


def _corrupt(flat: np.ndarray, what: str) -> None:
    i = flat.size // 3
    if what == "byte":
        flat[i] ^= 0xFF  # every code of that byte changes
    else:
        flat[i] *= 8.0


def tiny_tokens(n: int = 48) -> np.ndarray:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir()), local_files_only=True)
    text = ("Anarchism is a political philosophy and movement that is sceptical of authority and "
            "rejects all involuntary, coercive forms of hierarchy. Aristotle was an Ancient Greek "
            "philosopher and polymath. Apollo 11 was the American spaceflight that first landed "
            "humans on the Moon. ") * 3
    return np.asarray(tok.encode(text, add_special_tokens=False)[:n], dtype=np.int64)


# The tokenizer comes from the bundled model, converted on first use (never a silent skip).
needs_tokenizer = pytest.mark.usefixtures("smollm2_dir")


_CACHE: dict[str, Path] = {}


def cached_tiny_export(tmp_path_factory, key: str = "sinq4", **kwargs) -> Path:  # noqa: ANN001
    """Build each tiny export once per test session (shared by test_validate / test_eval)."""
    if key not in _CACHE or not _CACHE[key].is_dir():
        _CACHE[key] = build_tiny_export(tmp_path_factory.mktemp("tiny") / key, **kwargs)
    return _CACHE[key]
