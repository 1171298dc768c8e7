"""Real-model export (bundled SmolLM2-135M): the issue's must-shows.

One CLI export (4-bit SINQ, the default job) is shared by the module; the other bit widths
reuse its float ONNX export (``--float-export``) so optimum runs once per test session.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from sinq_export import SinqConfig
from sinq_export.cli import EXIT_OK, EXIT_USAGE, main

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
LONG_PROMPT = "Aristotle was a Greek philosopher and polymath during the Classical period in"


def _session(path) -> ort.InferenceSession:  # noqa: ANN001
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(path / "model.onnx"), so, providers=["CPUExecutionProvider"])


def _feed(ids: torch.Tensor, hf_config, dtype=np.float32) -> dict:  # noqa: ANN001
    n = ids.shape[1]
    heads = hf_config.num_key_value_heads
    head = hf_config.hidden_size // hf_config.num_attention_heads
    feed = {
        "input_ids": ids.numpy(),
        "attention_mask": np.ones_like(ids.numpy()),
        "position_ids": np.arange(n, dtype=np.int64)[None],
    }
    for i in range(hf_config.num_hidden_layers):
        empty = np.zeros((1, heads, 0, head), dtype)
        feed[f"past_key_values.{i}.key"] = empty
        feed[f"past_key_values.{i}.value"] = empty
    return feed


def _rel_err(onnx_logits: np.ndarray, torch_logits: torch.Tensor) -> float:
    ref = torch_logits.float().numpy()
    return float(np.abs(onnx_logits.astype(np.float32) - ref).max() / np.ptp(ref))


@pytest.fixture(scope="module")
def work(tmp_path_factory):  # noqa: ANN201
    return tmp_path_factory.mktemp("llm")


@pytest.fixture(scope="module")
def float_dir(work):  # noqa: ANN001, ANN201
    """optimum's float export, made once and shared by every export of this module."""
    from sinq_export.export import export_float_causal_lm
    from sinq_export.models import default_model_dir

    return export_float_causal_lm(default_model_dir(), work / "float")


@pytest.fixture(scope="module")
def export4(work, float_dir):  # noqa: ANN001, ANN201
    out = work / "out4"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["model", "--bits", "4", "--target", "onnx", "-o", str(out),
                   "--float-export", str(float_dir), "--json"])
    assert rc == EXIT_OK
    summary = json.loads(buf.getvalue())
    print("4-bit export summary:", json.dumps({k: v for k, v in summary.items() if k != "config"}))
    return out, summary


@pytest.fixture(scope="module")
def reference4(export4):  # noqa: ANN001, ANN201
    from transformers import AutoTokenizer

    from sinq_export.nn import load_quantized

    out, _ = export4
    model, config = load_quantized(out / "reference")
    return model, AutoTokenizer.from_pretrained(out), config


def test_export_folder(export4):
    out, summary = export4
    for name in ("model.onnx", "model.onnx.data", "config.json", "generation_config.json",
                 "tokenizer.json", "genai_config.json", "sinq_export.json", "reference"):
        assert (out / name).exists(), name
    man = json.loads((out / "sinq_export.json").read_text())
    assert len(man["layers"]) == 210 and man["kind"] == "causal-lm"
    assert {la["op"] for la in man["layers"].values()} == {"MatMulNBits"}
    assert man["onnx"]["ir_version"] == 10 and man["mul_nodes"] == 210
    assert "lm_head" not in man["layers"]
    assert str(out) not in (out / "sinq_export.json").read_text()
    sizes = man["sizes"]
    ratio = sizes["linear_weight_bytes"] / sizes["float_linear_weight_bytes"]
    print(f"4-bit linear-weight bytes: {sizes['linear_weight_bytes']} = {ratio:.3f} x fp32")
    assert ratio <= 0.2
    assert summary["layers_quantized"] == 210
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    assert "MatMulNBits" in ops
    assert sum(n.op_type == "MatMul" and n.name.endswith("proj/MatMul") for n in model.graph.node) == 0


def test_output_exists_refused(export4, capsys):
    out, _ = export4
    assert main(["model", "-o", str(out)]) == EXIT_USAGE
    assert "--overwrite" in capsys.readouterr().err


def test_logits_match_torch(export4, reference4):
    out, _ = export4
    model, tok, _ = reference4
    ids = tok(LONG_PROMPT, return_tensors="pt").input_ids
    logits = _session(out).run(["logits"], _feed(ids, model.config))[0]
    with torch.no_grad():
        ref = model(ids).logits
    err = _rel_err(logits, ref)
    print(f"ONNX vs torch logits, max abs / range: {err:.2e}")
    assert err <= 1e-3


def test_ortmodel_greedy_20_tokens(export4, reference4):
    from optimum.onnxruntime import ORTModelForCausalLM

    out, _ = export4
    model, tok, _ = reference4
    ort_model = ORTModelForCausalLM.from_pretrained(out, provider="CPUExecutionProvider")
    ids = tok(PROMPT, return_tensors="pt")
    kw = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False)
    got = ort_model.generate(**ids, **kw)
    with torch.no_grad():
        want = model.generate(**ids, **kw)
    n = ids.input_ids.shape[1]
    print("ORT :", tok.decode(got[0, n:]))
    assert got.shape[1] == n + 20
    assert got[0, n:].tolist() == want[0, n:].tolist()


def test_genai_greedy(export4, reference4):
    og = pytest.importorskip("onnxruntime_genai")
    out, _ = export4
    model, tok, _ = reference4
    ids = tok(LONG_PROMPT, return_tensors="pt").input_ids
    n = ids.shape[1]
    gm = og.Model(str(out))
    params = og.GeneratorParams(gm)
    params.set_search_options(max_length=n + 20, do_sample=False)
    gen = og.Generator(gm, params)
    gen.append_tokens(ids[0].numpy())
    logits0 = gen.get_logits()  # last prompt position
    tokens = []
    while not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    with torch.no_grad():
        ref_logits = model(ids).logits[:, -1]
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20,
                              do_sample=False)[0, n:].tolist()
    print("genai:", tok.decode(tokens))
    assert tokens == want
    assert _rel_err(np.asarray(logits0).reshape(1, -1), ref_logits) <= 1e-3


@pytest.mark.parametrize(
    "cfg",
    [
        dict(bits=2, method="rtn"),
        dict(bits=3, col_scale="fold", shared_col_scale=True),
        dict(bits=8, method="rtn", lm_head_bits=8),
        dict(bits=3, method="rtn", runtime="custom"),
    ],
    ids=["2bit-rtn", "3bit-sinq-fold-shared", "8bit-rtn-lmhead8", "3bit-rtn-custom-op"],
)
def test_other_bits_run(work, float_dir, cfg):
    from sinq_export.export import export_causal_lm

    config = SinqConfig(**cfg)
    so = None
    if config.runtime == "custom":
        from sinq_export import runtime_ops

        if not runtime_ops.is_available():
            pytest.fail("custom op library (sinq_export.runtime_ops) not built: run install.sh")
        so = runtime_ops.session_options(intra_op_num_threads=2)
    out = work / f"out-{config.bits}-{config.runtime}-{config.method}"
    res = export_causal_lm(None, out, config, progress=False, reference=False,
                           float_export_dir=float_dir)
    man = res.manifest
    ids = res.tokenizer(LONG_PROMPT, return_tensors="pt").input_ids
    sess = _session(out) if so is None else ort.InferenceSession(
        str(out / "model.onnx"), so, providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], _feed(ids, res.model.config))[0]
    with torch.no_grad():
        ref = res.model(ids).logits
    err = _rel_err(logits, ref)
    print(f"{cfg}: rel err {err:.2e}, Mul nodes {man['mul_nodes']}, timings {res.timings}")
    assert err <= 1e-3
    stock = config.runtime == "stock"
    assert {la["container_bits"] for la in man["layers"].values()} == \
        {4 if config.bits == 3 and stock else config.bits}
    assert {la["op"] for la in man["layers"].values()} == {"MatMulNBits" if stock else "SinqMatMulNBits"}
    if not stock:  # true 3-bit size: 3/8 byte per weight + fp32 scales / packed zeros per 64
        sizes = man["sizes"]
        assert sizes["linear_weight_bytes"] <= 0.115 * sizes["float_linear_weight_bytes"]
    if config.col_scale == "fold":
        # q/k/v and gate/up fold into the norms, down_proj into up_proj: only o_proj keeps a Mul
        assert man["mul_nodes"] == 30
        assert man["layers"]["model.layers.0.mlp.up_proj"]["output_scaled_by"] == \
            "model.layers.0.mlp.down_proj"
    if config.lm_head_bits:
        assert man["layers"]["lm_head"]["bits"] == 8
