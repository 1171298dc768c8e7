"""The validator's reference, rebuilt from a source folder + ONNX tensors, computes exactly what
the in-memory quantized model computes; ONNX tensors are read lazily from external data."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from _models import random_causal_lm
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from sinq_export.checkpoint import Checkpoint
from sinq_export.config import SinqConfig
from sinq_export.nn import quantize_model, quantized_layers
from sinq_export.onnx_tensors import EXTERNAL_FOLDER_KEY, OnnxTensors, graph_bytes, load_graph
from sinq_export.validate import ValidationError
from sinq_export.validate.rebuild import build_reference, config_sha256, resolve_source


def tiny_llama(tmp_path: Path, dtype: torch.dtype = torch.bfloat16, tie: bool = True,
               bias: bool = False) -> tuple[Path, torch.nn.Module]:
    """A 2-layer random Llama (Qwen2 with ``bias``: q/k/v biases) saved in ``dtype``, and the
    float32 model holding exactly the saved values."""
    model = random_causal_lm("qwen2" if bias else "llama", vocab_size=96, hidden_size=64,
                             intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=128,
                             tie_word_embeddings=tie)
    with torch.no_grad():
        for p in model.parameters():  # larger weights, rounded to the stored dtype
            p.copy_((p * 3.0).to(dtype).float())
    folder = tmp_path / "src"
    copy.deepcopy(model).to(dtype).save_pretrained(folder)
    return folder, model  # float32 buffers (rotary inv_freq), as transformers builds them


def onnx_container(qmodel, pack_qkv: bool):
    """Nodes + initializers as the graph route writes them (its per-layer records)."""
    nodes, tensors, layers = {}, {}, {}
    records = {n: m.record for n, m in quantized_layers(qmodel).items()}
    groups = []
    for name in records:
        if pack_qkv and name.endswith("q_proj"):
            base = name[: -len("q_proj")]
            groups.append([base + p for p in ("q_proj", "k_proj", "v_proj")])
        elif not (pack_qkv and name.endswith(("k_proj", "v_proj"))):
            groups.append([name])
    for group in groups:
        recs = [records[n] for n in group]
        node_name = group[0] + ("_qkv" if len(group) > 1 else "") + "/MatMulNBits"
        prefix = node_name.replace("/", ".")
        tensors[prefix + ".qweight"] = torch.cat([r.packed for r in recs]).numpy()
        tensors[prefix + ".scales"] = torch.cat([r.scales for r in recs]).numpy().reshape(-1)
        tensors[prefix + ".qzeros"] = torch.cat([r.zero_points for r in recs]).numpy().reshape(-1)
        n_total, k = sum(r.shape[0] for r in recs), recs[0].shape[1]
        nodes[node_name] = helper.make_node(
            "MatMulNBits", ["x", prefix + ".qweight", prefix + ".scales", prefix + ".qzeros"],
            ["y"], name=node_name, domain="com.microsoft", K=k, N=n_total, bits=recs[0].bits,
            block_size=recs[0].group_size)
        start = 0
        for n, r in zip(group, recs):
            t_name = None
            if r.col_scale is not None:
                t_name = n + ".col_scale"
                tensors[t_name] = r.col_scale.numpy()
            layers[n] = {"bits": r.bits, "group_size": r.group_size, "op": "MatMulNBits",
                         "shape": list(r.shape), "node": node_name,
                         "initializers": {"packed": prefix + ".qweight", "scales": prefix + ".scales",
                                          "zero_points": prefix + ".qzeros", "col_scale": t_name},
                         "rows": [start, start + r.shape[0]],
                         "col_scale_mode": "mul" if t_name else "none"}
            start += r.shape[0]
    return nodes, tensors, layers


@pytest.mark.parametrize("method,pack_qkv,tie,bias", [
    ("sinq", False, True, False), ("rtn", True, False, True), ("sinq", False, False, True)])
def test_rebuilt_reference_equals_the_quantized_model(tmp_path, method, pack_qkv, tie, bias):
    folder, float_model = tiny_llama(tmp_path, tie=tie, bias=bias)
    config = SinqConfig(bits=4, group_size=16, method=method,
                        lm_head_bits=None if tie else 8)
    qmodel = copy.deepcopy(float_model)
    quantize_model(qmodel, config, progress=False)
    nodes, tensors, layers = onnx_container(qmodel, pack_qkv)
    ref = build_reference(Checkpoint.open(folder), layers, nodes, tensors)
    assert set(quantized_layers(ref)) == set(layers)
    assert not any(p.device.type == "meta" for p in ref.parameters())
    ids = torch.tensor([[1, 5, 9, 33, 70, 2, 95]])
    with torch.inference_mode():
        want, got = qmodel(input_ids=ids).logits, ref(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if tie:
        assert ref.lm_head.weight is ref.model.embed_tokens.weight


def test_rebuild_refuses_a_checkpoint_that_does_not_match(tmp_path):
    folder, float_model = tiny_llama(tmp_path)
    qmodel = copy.deepcopy(float_model)
    quantize_model(qmodel, SinqConfig(bits=4, group_size=16), progress=False)
    nodes, tensors, layers = onnx_container(qmodel, False)
    layers["model.layers.0.mlp.up_proj"]["rows"] = [0, 64]  # half the rows
    with pytest.raises(ValidationError, match="up_proj: ONNX rows give shape"):
        build_reference(Checkpoint.open(folder), layers, nodes, tensors)
    layers["model.layers.0.mlp.up_proj"]["rows"] = [0, 128]
    layers["model.norm"] = layers["model.layers.0.mlp.up_proj"]
    with pytest.raises(ValidationError, match="model.norm of sinq_export.json is not a linear"):
        build_reference(Checkpoint.open(folder), layers, nodes, tensors)


def test_resolve_source_order(tmp_path):
    folder, _ = tiny_llama(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    meta = {"source": {"path": str(folder), "config_sha256": config_sha256(folder)}}
    assert resolve_source(out, meta, None).path == folder
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValidationError, match="--source .*config.json differs"):
        resolve_source(out, meta, other)
    with pytest.raises(ValidationError, match="not a model folder"):
        resolve_source(out, meta, tmp_path / "nowhere")
    gone = {"source": {"path": str(tmp_path / "moved"), "config_sha256": "0"}}
    with pytest.raises(ValidationError, match="source model folder .*moved.* is missing.*--source"):
        resolve_source(out, gone, None)
    moved = {"source": {"path": str(tmp_path / "moved"), "config_sha256": config_sha256(folder)}}
    got = resolve_source(out, moved, folder)  # a moved source passed with --source
    assert (got.kind, got.path) == ("source", folder)
    changed = {"source": {"path": str(folder), "config_sha256": "0" * 64}}
    with pytest.raises(ValidationError, match="config.json differs"):
        resolve_source(out, changed, None)
    (out / "reference").mkdir()
    (out / "reference" / "sinq_quantized.json").write_text("{}")
    r = resolve_source(out, changed, None)
    assert r.kind == "reference" and "changed since the export" in r.note
    assert resolve_source(out, {}, None).kind == "reference"


def _external_model(folder, big: np.ndarray):
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "g", [helper.make_tensor_value_info("x", 1, [2, big.shape[0]])],
        [helper.make_tensor_value_info("y", 1, [2, big.shape[1]])], [numpy_helper.from_array(big, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(folder / "model.onnx"), save_as_external_data=True,
              location="model.onnx.data", size_threshold=0)
    return folder / "model.onnx"


def test_tensors_read_by_offset_and_probe_keeps_data_external(tmp_path):
    w = np.random.default_rng(0).standard_normal((512, 300)).astype(np.float32)
    path = _external_model(tmp_path / "exp", w)
    model = load_graph(path)
    tensors = OnnxTensors(model, path.parent)
    np.testing.assert_array_equal(tensors["W"], w)
    assert list(tensors) == ["W"] and "W" in tensors and len(tensors) == 1
    model.graph.output.append(helper.make_tensor_value_info("h", 1, None))
    data = graph_bytes(model)
    assert len(data) < 1000  # the 600 kB weight stays in the data file
    opts = ort.SessionOptions()
    opts.add_session_config_entry(EXTERNAL_FOLDER_KEY, str(path.parent))
    sess = ort.InferenceSession(data, opts)
    x = np.ones((2, 512), np.float32)
    y, h = sess.run(["y", "h"], {"x": x})
    np.testing.assert_allclose(h, x @ w, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("damage", ["truncate-data", "delete-data", "truncate-onnx"])
def test_damaged_onnx_folder_is_named(tmp_path, damage):
    path = _external_model(tmp_path / "exp", np.ones((64, 64), np.float32))
    data = path.parent / "model.onnx.data"
    if damage == "truncate-data":
        data.write_bytes(data.read_bytes()[:1000])
        with pytest.raises(ValidationError, match=r"model.onnx.data: external data is truncated: tensor 'W'"):
            OnnxTensors(load_graph(path), path.parent)
    elif damage == "delete-data":
        data.unlink()
        with pytest.raises(ValidationError, match="external data file is missing"):
            OnnxTensors(load_graph(path), path.parent)
    else:
        path.write_bytes(path.read_bytes()[:40])
        with pytest.raises(ValidationError, match="cannot parse the ONNX model"):
            load_graph(path)


@settings(max_examples=20, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), method=st.sampled_from(["sinq", "rtn"]),
       symmetric=st.booleans(), n=st.integers(2, 24), k=st.integers(2, 80), seed=st.integers(0, 99))
def test_quantized_weights_are_within_one_step_and_a_flipped_code_is_not(
        bits, method, symmetric, n, k, seed):
    from sinq_export.quant import make_config, packing, quantize
    from sinq_export.quant.record import QuantizedWeight
    from sinq_export.validate.providers import WEIGHT_STEP_LIMIT
    from sinq_export.validate.rebuild import quantization_steps

    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    rec = quantize(w, make_config(method, bits=bits, group_size=16, symmetric=symmetric))
    assert quantization_steps(w, rec) <= 1.0 + 1e-4
    codes = rec.codes().clone()
    qmax = (1 << bits) - 1
    codes[n // 2, k // 2] = qmax if codes[n // 2, k // 2] < (1 << (bits - 1)) else 0  # far move
    moved = QuantizedWeight(packing.pack_codes(codes, bits, 16), rec.scales, rec.zero_points,
                            rec.col_scale, bits, 16, rec.shape)
    if bits > 2:  # a 2-bit code moved to the other end is only 2-3 steps away
        assert quantization_steps(w, moved) > WEIGHT_STEP_LIMIT


@given(seed=st.integers(0, 99), bits=st.sampled_from([3, 4]))
def test_rms_steps_pass_gptq_rounding_and_flag_another_layers_weight(seed, bits):
    """GPTQ's codes sit several steps from round-to-nearest by design, so a calibrated export
    is checked on RMS steps: within the limit for GPTQ, far past it for a swapped tensor."""
    from sinq_export.quant.methods import SINQConfig, quantize
    from sinq_export.quant.stats import LayerStats
    from sinq_export.validate.providers import WEIGHT_STEP_LIMIT
    from sinq_export.validate.rebuild import quantization_steps

    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(32, 64, generator=gen)
    x = torch.randn(256, 64, generator=gen) @ torch.randn(64, 64, generator=gen)  # correlated
    stats = LayerStats(64)
    stats.add(x)
    rec = quantize(w, SINQConfig(bits=bits, group_size=16), calibration=stats)
    assert quantization_steps(w, rec, rms=True) <= WEIGHT_STEP_LIMIT
    other = torch.randn(32, 64, generator=gen)
    assert quantization_steps(other, rec, rms=True) > WEIGHT_STEP_LIMIT
