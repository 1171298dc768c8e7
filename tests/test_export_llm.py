"""Real-model export (bundled SmolLM2-135M) through the CLI: the README's default command.

One export with the CLI defaults (4-bit SINQ linears, a 4-bit g32 lm_head calibrated alone,
an 8-bit embedding table, accuracy level auto: 4 on every SmolLM2 linear) is shared by the
module. `validate` checks it against
the PyTorch reference rebuilt from the source folder, exactly (accuracy_level 0 override) and
as shipped; the architectures and options are covered on tiny models in
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

from sinq_export.cli import main
from sinq_export.contract import MANIFEST_FILE, MODEL_FILE, REFERENCE_DIR
from sinq_export.models import default_model_dir
from sinq_export.outcome import EXIT_OK, EXIT_USAGE
from sinq_export.validate.runners import run_ort_lm

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
LONG_PROMPT = "Aristotle was a Greek philosopher and polymath during the Classical period in"


def _session(path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(path / MODEL_FILE), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("llm")


@pytest.fixture(scope="module")
def export4(work):
    out = work / "out4"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["model", "--bits", "4", "--target", "onnx", "-o", str(out), "--json"])
    assert rc == EXIT_OK
    summary = json.loads(buf.getvalue())
    print("4-bit export summary:", json.dumps({k: v for k, v in summary.items() if k != "config"}))
    return out, summary


def test_export_folder(export4):
    out, summary = export4
    for name in (MODEL_FILE, MODEL_FILE + "_data", "config.json", "generation_config.json",
                 "tokenizer.json", "genai_config.json", "sinq_export.json"):
        assert (out / name).exists(), name
    assert not (out / REFERENCE_DIR).exists()
    man = json.loads((out / MANIFEST_FILE).read_text())
    assert len(man["layers"]) == 212 and man["kind"] == "causal-lm"  # + lm_head + embedding
    head, table = man["layers"]["lm_head"], man["layers"]["model.embed_tokens"]
    assert man["graph"]["accuracy_level"] == "auto" and (head["bits"], head["group_size"]) == (4, 32)
    # SmolLM2's measured int8 errors keep every decoder linear at level 4; its head keeps the
    # argmax of too few probe tokens with int8 activations unless its loudest input channels
    # are multiplied in float beside the node (16 of 576)
    assert man["accuracy"]["layers_per_level"] == {"4": 211}
    assert head["accuracy_level"] == 4 and len(head["exact_channels"]) == 16
    assert man["accuracy"]["head_int8_top1"]["lm_head"] >= man["accuracy"]["head_top1_min"]
    # one table: the 4-bit table is the calibrated head's record
    assert table["bits"] == 4 and head.get("shared_with") == "model.embed_tokens"
    assert man["calibration"]["layers"] == "lm_head" and man["config"]["calibrate_head"]
    # t folded where exact: down_proj's into up_proj's rows (30), the head's into the norm,
    # gate/up's shared t into the post-attention norm (60), q_proj's into the input norm (30;
    # k/v multiply by a ratio): the Muls left are k, v, o_proj per layer and the embedding's
    assert man["onnx"]["ir_version"] == 11 and man["mul_nodes"] == 212 - 30 - 1 - 60 - 30
    assert man["config"]["shared_col_scale"] == "mlp"
    assert man["graph"]["col_scale"] == "fold"
    assert man["layers"]["model.layers.3.mlp.down_proj"]["folded_into"] == "model.layers.3.mlp.up_proj"
    assert man["source"]["path"] == str(default_model_dir())
    # the bundled model comes from a Q4_1 GGUF: the manifest says so
    assert man["source"]["quantization"]["tensor_types"]["Q4_1"] == 210
    sizes = man["sizes"]
    print(f"onnx bytes {sizes['onnx_bytes']}, summary timings {summary['timings_s']}")
    assert sizes["onnx_bytes"] < 140e6  # fp32 SmolLM2 is 540 MB
    model = onnx.load(str(out / MODEL_FILE), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulNBits") == 211 and ops.count("GroupQueryAttention") == 30
    assert ops.count("GatherBlockQuantized") == 1
    # the only float MatMul: the head's 16 exact channels ([16, vocab] float32)
    assert ops.count("MatMul") == 1 and ops.count("Gather") == 2  # + the token ids' shape
    exact = next(n for n in model.graph.node if n.op_type == "MatMul")
    assert exact.input[1] == head["initializers"]["exact_weight"]


def test_output_exists_refused(export4, capsys):
    out, _ = export4
    assert main(["model", "-o", str(out)]) == EXIT_USAGE
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("level", [["--accuracy-level", "0"], []], ids=["acc0", "as-shipped"])
def test_validate_passes(export4, level, capsys):
    """Against the reference rebuilt from the source folder: exact at acc 0, and within the
    validator's acc4 tolerance as shipped."""
    out, _ = export4
    rc = main(["validate", str(out), "--tokens", "128", "--decode-steps", "8", *level])
    report = capsys.readouterr().out
    print(report)
    assert rc == EXIT_OK and "PASSED" in report


def test_genai_greedy_equals_ort(export4):
    """genai's loop (shared KV buffer) and a plain onnxruntime loop pick the same tokens."""
    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    out, _ = export4
    tok = AutoTokenizer.from_pretrained(out)
    ids = np.asarray(tok(LONG_PROMPT).input_ids, dtype=np.int64)
    want = run_ort_lm(_session(out), ids, 20).fed
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
