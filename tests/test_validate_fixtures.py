"""Hand-made tiny export folders (docs/export-format.md) for the validator / eval unit tests.

A 2-layer random Llama (hidden 64, SmolLM2's tokenizer) is quantized with `quantize_model`
(the reference, saved with `save_quantized`), its float twin is exported by optimum, and each
linear's MatMul is replaced by hand with ``Mul(t)`` + ``com.microsoft::MatMulNBits`` built from
the very `QuantizedWeight` records. Layer 0's MLP folds down_proj's ``t`` into up_proj's
output rows (``output_scaled_by``), the rest keeps an explicit ``Mul``.
Also imported by the other test modules (``from test_validate_fixtures import ...``).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

FOLD_LAYER = "model.layers.0.mlp"


def tokenizer_dir() -> Path:
    """SmolLM2's converted folder, decided at run time (honours ``SINQ_EXPORT_CACHE``; converts
    the bundled GGUF on first use), never at collection time."""
    from sinq_export.models import default_model_dir

    return default_model_dir()


def _node_path(layer: str) -> str:
    return "/" + re.sub(r"/(\d+)(?=/|$)", r".\1", layer.replace(".", "/")) + "/MatMul"


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
                      with_reference: bool = True, float_dir: Path | None = None) -> Path:
    """Write a tiny export folder at ``out`` following docs/export-format.md."""
    import onnx
    from onnx import helper, numpy_helper
    from optimum.exporters.onnx import main_export
    from transformers import AutoTokenizer

    from sinq_export.config import SinqConfig
    from sinq_export.nn import quantize_model, quantized_layers, save_quantized

    out = Path(out)
    work = out.parent / f".{out.name}-work"
    shutil.rmtree(work, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir()), local_files_only=True)
    if float_dir is None:
        float_model = tiny_float_model()
        float_model.save_pretrained(work / "float")
        tok.save_pretrained(work / "float")
        float_dir = work / "float"
    else:  # a real model folder (measurements only; the suite uses the real exporter)
        from transformers import AutoModelForCausalLM

        float_model = AutoModelForCausalLM.from_pretrained(str(float_dir)).eval()
    main_export(str(float_dir), output=str(work / "onnx"), task="text-generation-with-past",
                no_post_process=True, do_validation=False)

    config = SinqConfig(bits=bits, group_size=group_size, method=method)
    qmodel = copy.deepcopy(float_model)
    quantize_model(qmodel, config, progress=False)
    layers = quantized_layers(qmodel)

    model = onnx.load(str(work / "onnx" / "model.onnx"))
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    by_name = {n.name: n for n in g.node}
    meta_layers = {}
    new_inits = []
    for name, layer in layers.items():
        node = by_name[_node_path(name)]
        rec = layer.record
        n_out, k = rec.shape
        scales = rec.scales.numpy().astype(np.float32).copy()
        fold = name.startswith(FOLD_LAYER)
        scaled_by = None
        if fold and name.endswith("up_proj"):
            scaled_by = f"{FOLD_LAYER}.down_proj"
            scales *= layers[scaled_by].col_scale.numpy()[:, None]
        prefix = name
        b_name, s_name, z_name = f"{prefix}.qweight", f"{prefix}.scales", f"{prefix}.qzeros"
        new_inits += [numpy_helper.from_array(rec.packed.numpy(), b_name),
                      numpy_helper.from_array(scales, s_name),
                      numpy_helper.from_array(rec.zero_points.numpy(), z_name)]
        a = node.input[0]
        col_mode = "none"
        idx = list(g.node).index(node)
        if rec.col_scale is not None and not (fold and name.endswith("down_proj")):
            t_name = f"{prefix}.col_scale"
            new_inits.append(numpy_helper.from_array(rec.col_scale.numpy().astype(np.float32), t_name))
            mul = helper.make_node("Mul", [a, t_name], [f"{node.name[:-6]}Mul_t_output_0"],
                                   name=f"{node.name[:-6]}Mul_t")
            g.node.insert(idx, mul)
            idx += 1
            a = mul.output[0]
            col_mode = "mul"
        elif rec.col_scale is not None:
            col_mode = f"folded:{FOLD_LAYER}.up_proj"
        mm = helper.make_node("MatMulNBits", [a, b_name, s_name, z_name], list(node.output),
                              name=node.name + "NBits", domain="com.microsoft", K=k, N=n_out,
                              bits=bits, block_size=group_size, accuracy_level=0)
        g.node.insert(idx, mm)
        g.node.remove(node)
        g.initializer.remove(inits[node.input[1]])
        meta_layers[name] = {
            "shape": [n_out, k], "bits": bits, "group_size": group_size, "op": "MatMulNBits",
            "container_bits": bits, "col_scale": col_mode, "output_scaled_by": scaled_by,
            "onnx_node": mm.name, "onnx_output": node.output[0],
        }
    g.initializer.extend(new_inits)
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    model.ir_version = 10

    tmp = work / "out"
    tmp.mkdir(parents=True)
    onnx.save(model, str(tmp / "model.onnx"), save_as_external_data=True,
              location="model.onnx.data", size_threshold=0)
    for f in (work / "onnx").iterdir():
        if f.suffix == ".json" or f.name.startswith("tokenizer") or f.suffix == ".jinja":
            if f.name != "model.onnx":
                shutil.copy(f, tmp / f.name)
    if with_reference:
        save_quantized(qmodel, tmp / "reference", config, tokenizer=tok)
    meta = {
        "format_version": 1, "kind": "causal-lm", "config": config.to_dict(),
        "source_model": "tiny-llama",
        "onnx": {"file": "model.onnx", "ir_version": 10, "opset": 18,
                 "inputs": [i.name for i in g.input], "outputs": [o.name for o in g.output],
                 "custom_domains": []},
        "layers": meta_layers, "mul_nodes": sum(m["col_scale"] == "mul" for m in meta_layers.values()),
    }
    (tmp / "sinq_export.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    shutil.rmtree(work, ignore_errors=True)
    return out


def corrupt_copy(src: Path, dst: Path, layer: str, what: str = "byte") -> Path:
    """Copy an export folder and corrupt one packed byte (``byte``) or one group scale
    (``scale``) of ``layer``'s quantized node in the copy's ONNX model."""
    import onnx
    from onnx import numpy_helper

    shutil.copytree(src, dst)
    meta = json.loads((dst / "sinq_export.json").read_text())
    node_name = meta["layers"][layer]["onnx_node"]
    model = onnx.load(str(dst / "model.onnx"))
    node = next(n for n in model.graph.node if n.name == node_name)
    target = node.input[1] if what == "byte" else node.input[2]
    for i, t in enumerate(model.graph.initializer):
        if t.name == target:
            arr = numpy_helper.to_array(t).copy()
            flat = arr.reshape(-1)
            if what == "byte":
                flat[flat.size // 3] ^= 0xFF  # every code of that byte changes
            else:
                flat[flat.size // 3] *= 8.0
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(arr, t.name))
    (dst / "model.onnx").unlink()
    (dst / "model.onnx.data").unlink()
    onnx.save(model, str(dst / "model.onnx"), save_as_external_data=True,
              location="model.onnx.data", size_threshold=0)
    return dst


def tiny_tokens(n: int = 48) -> np.ndarray:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir()), local_files_only=True)
    text = ("Anarchism is a political philosophy and movement that is sceptical of authority and "
            "rejects all involuntary, coercive forms of hierarchy. Aristotle was an Ancient Greek "
            "philosopher and polymath. Apollo 11 was the American spaceflight that first landed "
            "humans on the Moon. ") * 3
    return np.asarray(tok.encode(text, add_special_tokens=False)[:n], dtype=np.int64)


# The tokenizer comes from the session fixture `smollm2_dir` (conftest.py), which converts the
# bundled model when the cache is empty instead of skipping.
needs_tokenizer = pytest.mark.usefixtures("smollm2_dir")


_CACHE: dict[str, Path] = {}


def cached_tiny_export(tmp_path_factory, key: str = "sinq4", **kwargs) -> Path:  # noqa: ANN001
    """Build each tiny export once per test session (shared by test_validate / test_eval)."""
    if key not in _CACHE or not _CACHE[key].is_dir():
        _CACHE[key] = build_tiny_export(tmp_path_factory.mktemp("tiny") / key, **kwargs)
    return _CACHE[key]
