"""Real-model export (bundled SmolLM2-135M) through the CLI: the default job, end to end.

One CLI export (4-bit SINQ, ``--with-reference`` so the PyTorch model comes with it) is shared
by the module; the architectures and options are covered on tiny models in
test_export_decoder.py.
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

from sinq_export.cli import EXIT_OK, EXIT_USAGE, main
from sinq_export.models import default_model_dir
from sinq_export.validate.runners import run_ort_lm, run_torch_lm

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
LONG_PROMPT = "Aristotle was a Greek philosopher and polymath during the Classical period in"


def _session(path) -> ort.InferenceSession:  # noqa: ANN001
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(path / "model.onnx"), so, providers=["CPUExecutionProvider"])


def _rel_err(onnx_logits: np.ndarray, torch_logits: torch.Tensor) -> float:
    ref = torch_logits.float().numpy()
    return float(np.abs(onnx_logits.astype(np.float32) - ref).max() / np.ptp(ref))


@pytest.fixture(scope="module")
def work(tmp_path_factory):  # noqa: ANN201
    return tmp_path_factory.mktemp("llm")


@pytest.fixture(scope="module")
def export4(work):  # noqa: ANN001, ANN201
    out = work / "out4"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["model", "--bits", "4", "--target", "onnx", "-o", str(out),
                   "--with-reference", "--json"])
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
    assert man["onnx"]["ir_version"] == 11 and man["mul_nodes"] == 210
    assert "lm_head" not in man["layers"]
    assert man["source"]["path"] == str(default_model_dir())
    sizes = man["sizes"]
    ratio = sizes["linear_weight_bytes"] / sizes["float_linear_weight_bytes"]
    print(f"4-bit linear-weight bytes: {sizes['linear_weight_bytes']} = {ratio:.3f} x fp32")
    assert ratio <= 0.2
    assert summary["layers_quantized"] == 210
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulNBits") == 210 and ops.count("GroupQueryAttention") == 30
    assert ops.count("MatMul") == 1  # the float tied head


def test_output_exists_refused(export4, capsys):
    out, _ = export4
    assert main(["model", "-o", str(out)]) == EXIT_USAGE
    assert "--overwrite" in capsys.readouterr().err


def test_logits_and_greedy_match_torch(export4, reference4):
    out, _ = export4
    model, tok, _ = reference4
    ids = np.asarray(tok(LONG_PROMPT).input_ids, dtype=np.int64)
    want, fed = run_torch_lm(model, ids, 20)
    sess = _session(out)
    got = run_ort_lm(sess, ids, fed)
    err = _rel_err(got.logits, torch.from_numpy(want.logits))
    print(f"ONNX vs torch logits, max abs / range: {err:.2e}")
    assert err <= 1e-4
    assert run_ort_lm(sess, ids, 20).fed == fed


def test_genai_greedy(export4, reference4):
    import onnxruntime_genai as og

    out, _ = export4
    model, tok, _ = reference4
    ids = np.asarray(tok(LONG_PROMPT).input_ids, dtype=np.int64)
    _, want = run_torch_lm(model, ids, 20)
    gm = og.Model(str(out))
    params = og.GeneratorParams(gm)
    params.set_search_options(max_length=len(ids) + 20, do_sample=False)
    gen = og.Generator(gm, params)
    gen.append_tokens(ids)
    tokens = []
    while not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    print("genai:", tok.decode(tokens))
    assert tokens == want
