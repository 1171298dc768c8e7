"""Validator unit tests on tiny export folders written by the exporter (`_models.build_tiny_export`)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import onnx
import pytest
from _helpers import corrupt_copy
from _models import cached_tiny_export, needs_tokenizer, tiny_tokens

from sinq_export import validate as V
from sinq_export.cli import main
from sinq_export.contract import MANIFEST_FILE, MODEL_FILE

# ------------------------------------------------------------------ pure logic (no model)


def test_parse_providers_names_all_and_unknown():
    assert V.parse_providers("cpu") == ["cpu"]
    assert V.parse_providers(" CPU , cuda,cpu") == ["cpu", "cuda"]
    assert V.parse_providers(["CPUExecutionProvider"]) == ["cpu"]
    assert "cpu" in V.parse_providers("all")
    with pytest.raises(V.ValidationError, match="valid names: cpu, cuda"):
        V.parse_providers("cpu,gpu0")
    with pytest.raises(V.ValidationError):
        V.parse_providers(",")


def test_tolerance_table_ordering():
    tight = V.tolerance_for("cpu", 0, "fp32")
    loose = V.tolerance_for("cpu", 4, "fp32")
    fp16 = V.tolerance_for("cpu", 0, "fp16")
    gpu = V.tolerance_for("cuda", 0, "fp32")
    for field in ("layer_rel", "logits_rel", "ppl_rel", "kl_mean"):
        assert getattr(tight, field) < getattr(loose, field)
        assert getattr(tight, field) <= getattr(fp16, field)
        assert getattr(tight, field) <= getattr(gpu, field)
    assert tight.top1 >= loose.top1
    assert V.tolerance_for("cpu", 1, "fp32") == loose  # levels 1-3 use the int8 row
    assert V.tolerance_for("tensorrt", 0, "fp32") == gpu
    assert tight.ppl_rel <= 1e-3 and tight.top1 >= 0.99  # the gate


def test_compare_logits_metrics():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(6, 50)).astype(np.float32)
    tokens = rng.integers(0, 50, size=5)
    same = V.compare_logits(ref, ref.copy(), tokens, 5)
    assert same.max_abs == 0 and same.top1 == 1 and abs(same.kl_mean) < 1e-12
    assert same.ppl_delta_rel == 0 and math.isclose(same.cosine_min, 1, rel_tol=1e-9)
    assert same.n_decode == 1 and same.top1_decode == 1
    # Manual perplexity of the first 5 positions.
    lp = ref[:4] - np.log(np.exp(ref[:4]).sum(-1, keepdims=True))
    assert math.isclose(same.ppl_torch, math.exp(-lp[np.arange(4), tokens[1:]].mean()), rel_tol=1e-6)
    test = ref.copy()
    i = int(test[2].argmax())
    test[2, i] -= 100.0  # flip the argmax of one token out of six
    d = V.compare_logits(ref, test, tokens, 5)
    assert math.isclose(d.top1, 5 / 6) and d.kl_max > 0.1 and d.max_abs == pytest.approx(100.0)
    assert d.rel == pytest.approx(100.0 / (ref.max() - ref.min()))
    with pytest.raises(ValueError, match="shape"):
        V.compare_logits(ref, ref[:, :10])


def test_layer_error_relative_and_nonfinite():
    ref = np.array([[1.0, -4.0], [2.0, 0.5]])
    e = V.layer_error(ref, ref + np.array([[0.0, 0.04], [0.0, 0.0]]))
    assert e["rel"] == pytest.approx(0.01) and e["max_abs"] == pytest.approx(0.04)
    bad = V.layer_error(ref, np.array([[1.0, np.nan], [2.0, 0.5]]))
    assert bad["rel"] == math.inf


def test_not_an_export_folder_exit_2(tmp_path, capsys):
    assert main(["validate", str(tmp_path)]) == 2
    assert "sinq_export.json" in capsys.readouterr().err


# ------------------------------------------------------------------ tiny export folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return cached_tiny_export(tmp_path_factory)


@pytest.fixture()
def fixed_tokens(monkeypatch):
    """CLI runs feed the tiny fixture's fixed sentence instead of the Wikipedia text."""
    monkeypatch.setattr(V, "validation_tokens", lambda tok, n, text="wikipedia": tiny_tokens(n))


@needs_tokenizer
def test_tiny_export_passes_and_reports_every_layer(tiny):
    r = V.validate(tiny, token_ids=tiny_tokens(40), tokens=40, decode_steps=3)
    assert r.status == "passed" and r.mode == "reference"
    (p,) = r.providers
    assert p.status == "passed" and p.first_diverging_layer is None
    assert len(p.layers) == 14 and all(la.passed for la in p.layers)
    assert max(la.local_rel for la in p.layers) < 1e-5  # fp32 acc 0: kernel rounding only
    assert all(la.propagated_rel is not None for la in p.layers)
    assert all(la.weight_steps is not None and la.weight_steps <= 1.0 + 1e-4 for la in p.layers)
    e = p.end_to_end
    assert e.n_prefill == 40 and e.n_decode == 3 and e.top1 == 1.0 and e.ppl_delta_rel < 1e-5
    assert "PASSED" in r.format_table()


@needs_tokenizer
def test_folded_column_scales_pass(tmp_path_factory):
    """col_scale=fold: t inside norm weights / up_proj rows; the rebuilt reference takes the
    folded norms from the graph (the source norms lack t) and still matches."""
    folded = cached_tiny_export(tmp_path_factory, key="fold", col_scale="fold",
                                shared_col_scale=True)
    layers = json.loads((folded / MANIFEST_FILE).read_text())["layers"]
    targets = {m["folded_into"] for m in layers.values() if m["col_scale_mode"] == "fold"}
    assert any("layernorm" in str(t) for t in targets)  # q/k/v's shared t is in the norm
    r = V.validate(folded, token_ids=tiny_tokens(40), tokens=40, decode_steps=3)
    assert r.passed, r.format_table()
    (p,) = r.providers
    assert max(la.local_rel for la in p.layers) < 1e-5 and p.end_to_end.rel < 1e-4


@needs_tokenizer
def test_lead_fold_keeps_the_weight_check(tmp_path_factory, tmp_path, fixed_tokens, capsys):
    """col_scale=fold with a t per linear: q's t sits in the input norm and k/v's Muls hold a
    ratio. The weight check reads t back from the norm, so those layers keep it, and a flipped
    byte in a ratio layer (identical on both sides of the parity run) still fails there."""
    out = cached_tiny_export(tmp_path_factory, key="fold-lead", col_scale="fold")
    layers = json.loads((out / MANIFEST_FILE).read_text())["layers"]
    ratio = [n for n, m in layers.items() if m["col_scale_mode"] == "ratio"]
    assert "model.layers.1.self_attn.k_proj" in ratio
    r = V.validate(out, token_ids=tiny_tokens(40), tokens=40, decode_steps=3)
    assert r.passed, r.format_table()
    (p,) = r.providers
    steps = {la.name: la.weight_steps for la in p.layers}
    for name in ratio + [layers[n]["ratio_of"] for n in ratio]:  # up_proj: rows undone too
        assert steps[name] is not None and steps[name] <= 1.0 + 1e-4, name
    layer = "model.layers.1.self_attn.k_proj"
    bad = corrupt_copy(out, tmp_path / "bad", layer, "byte")
    code = main(["validate", str(bad), "--tokens", "40", "--decode-steps", "2"])
    assert code == 1 and f"first diverging layer: {layer}" in capsys.readouterr().out


@needs_tokenizer
def test_accuracy_level_override_is_looser_but_passes_layers(tiny):
    r = V.validate(tiny, token_ids=tiny_tokens(40), tokens=40, decode_steps=2, accuracy_level=4)
    (p,) = r.providers
    assert p.accuracy_level == 4 and p.tolerance == V.tolerance_for("cpu", 4)
    worst = max(la.local_rel for la in p.layers)
    assert 1e-4 < worst < p.tolerance.layer_rel  # int8 activations: visibly looser, still in tolerance
    assert any("overridden" in n for n in r.notes)


@needs_tokenizer
@pytest.mark.parametrize("what,layer", [("byte", "model.layers.1.self_attn.k_proj"),
                                        ("scale", "model.layers.0.mlp.down_proj")])
def test_corrupted_model_fails_naming_the_layer(tiny, tmp_path, what, layer, fixed_tokens, capsys):
    bad = corrupt_copy(tiny, tmp_path / "bad", layer, what)
    code = main(["validate", str(bad), "--tokens", "40", "--decode-steps", "2",
                 "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert code == 1
    assert f"first diverging layer: {layer}" in out and "FAILED" in out
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["status"] == "failed"
    assert data["providers"][0]["first_diverging_layer"] == layer
    failing = [la["name"] for la in data["providers"][0]["layers"] if not la["passed"]]
    assert failing == [layer]  # local errors do not propagate to later layers


@needs_tokenizer
def test_cli_json_plot_and_skipped_provider(tiny, tmp_path, fixed_tokens, capsys):
    js, png = tmp_path / "v.json", tmp_path / "v.png"
    code = main(["validate", str(tiny), "--providers", "cpu,cuda", "--tokens", "32",
                 "--decode-steps", "2", "--json", str(js), "--plot", str(png)])
    out = capsys.readouterr().out
    assert code == 0
    data = json.loads(js.read_text())
    status = {p["provider"]: p["status"] for p in data["providers"]}
    if "cuda" not in V.available_providers():
        assert status == {"cpu": "passed", "cuda": "skipped"}
        assert "CUDA : SKIPPED" in out.upper().replace("(CUDAEXECUTIONPROVIDER) ", "")
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


@needs_tokenizer
@pytest.mark.cuda  # it needs CUDA to be *absent*: on a CUDA machine this skip is allowed
@pytest.mark.skipif("cuda" in V.available_providers(), reason="CUDA is installed here")
def test_only_unavailable_provider_is_exit_2_not_a_pass(tiny, fixed_tokens, capsys):
    assert main(["validate", str(tiny), "--providers", "cuda", "--tokens", "16",
                 "--decode-steps", "1"]) == 2
    cap = capsys.readouterr()
    assert "SKIPPED" in cap.out and "PASSED" not in cap.out and "nothing was validated" in cap.err


@needs_tokenizer
def test_unknown_provider_exit_2_lists_valid_names(tiny, capsys):
    assert main(["validate", str(tiny), "--providers", "cpu,npu"]) == 2
    err = capsys.readouterr().err
    assert "unknown provider 'npu'" in err and "cpu, cuda" in err


@needs_tokenizer
def test_mismatched_tokenizer_exit_2(tiny, tmp_path, fixed_tokens, capsys):
    from transformers import AutoTokenizer

    bad = tmp_path / "mismatch"
    shutil.copytree(tiny, bad)
    tok = AutoTokenizer.from_pretrained(str(bad))
    tok.add_tokens(["<an-extra-token>"])
    tok.save_pretrained(str(bad))
    assert main(["validate", str(bad), "--tokens", "16"]) == 2
    assert "mismatched tokenizer" in capsys.readouterr().err


@needs_tokenizer
def test_onnx_only_mode_without_a_recorded_source(tiny, tmp_path, fixed_tokens, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(tiny, bare)
    meta = json.loads((bare / MANIFEST_FILE).read_text())
    meta["source"] = {"path": None, "config_sha256": None}
    (bare / MANIFEST_FILE).write_text(json.dumps(meta))
    code = main(["validate", str(bare), "--tokens", "24", "--decode-steps", "2",
                 "--json", str(tmp_path / "o.json")])
    out = capsys.readouterr().out
    assert code == 0 and "ONNX-only" in out
    data = json.loads((tmp_path / "o.json").read_text())
    assert data["mode"] == "onnx-only"
    layers = data["providers"][0]["layers"]
    assert len(layers) == 14 and all(la["local_rel"] < 1e-5 for la in layers)
    assert layers[0]["name"] == "model.layers.0.self_attn.q_proj"  # named from sinq_export.json


@needs_tokenizer
def test_numpy_dequantization_matches_the_record(tiny):
    """The ONNX-only NumPy dequantisation and the reference's torch records agree exactly."""
    from sinq_export.onnx_tensors import OnnxTensors, load_graph
    from sinq_export.validate.rebuild import layer_col_scale, layer_rows, record_from_node

    model = load_graph(tiny / MODEL_FILE)
    tensors = OnnxTensors(model, (tiny / MODEL_FILE).parent)
    meta = json.loads((tiny / MANIFEST_FILE).read_text())["layers"]
    name = "model.layers.1.self_attn.q_proj"
    node = next(n for n in model.graph.node if n.name == meta[name]["node"])
    d = V.dequantize_node(node, tensors)
    rec = record_from_node(node, tensors, layer_rows(meta[name], node), layer_col_scale(meta[name], node))
    np.testing.assert_allclose(d["W"], rec.dequantize_grouped().double().numpy(), rtol=0, atol=1e-7)
    assert rec.col_scale is not None and meta[name]["col_scale_mode"] == "mul"


def test_module_export_reference_and_onnx_only(tmp_path):
    """kind 'module' (exporter's export_module): with the reference module given, and without."""
    import torch
    from torch import nn

    from sinq_export.config import SinqConfig
    from sinq_export.export import export_module

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32))
    res = export_module(mlp, torch.randn(4, 64), tmp_path / "m", SinqConfig(group_size=16),
                        input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    ok = V.validate(tmp_path / "m", reference=res.model, tokens=8)
    assert ok.status == "passed" and ok.mode == "reference" and len(ok.providers[0].layers) == 2
    bare = V.validate(tmp_path / "m", tokens=8)
    assert bare.status == "passed" and bare.mode == "onnx-only" and "module class" in bare.notes[0]
    bad = corrupt_copy(tmp_path / "m", tmp_path / "bad", "2", "scale")
    failed = V.validate(bad, reference=res.model, tokens=8)
    assert failed.status == "failed" and failed.providers[0].first_diverging_layer == "2"
    # the manifest records every initializer's digest, so a changed byte fails even with
    # nothing to compare the outputs against
    assert set(res.manifest["tensor_sha256"]) == {t.name for t in onnx.load(
        str(tmp_path / "m" / "model.onnx"), load_external_data=False).graph.initializer}
    bad_bare = V.validate(corrupt_copy(tmp_path / "m", tmp_path / "bad2", "0", "byte"), tokens=8)
    assert bad_bare.status == "failed"
    assert bad_bare.providers[0].failures == [
        "tensor 0.qweight differs from the bytes the export wrote (sha256)"]
