"""Every supported decoder family, exported by the built route, against transformers.

Each family is a real transformers class built offline from a config that keeps the real
model's structural features (GQA ratio, explicit head_dim, biases, q/k norms, sliding-window
layers and their rope theta, fused projections, tied or untied head) at toy widths. The
export (4 bits, accuracy_level 0) must match the same model with `SinqLinear`s swapped in (the
reference the validator rebuilds): logits relative error <= 1e-4, teacher-forced over a
prefill + 16 decode steps through the KV cache, and the same 16 greedy tokens.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from _helpers import cpu_session, genai_greedy, greedy_without_eos
from _models import ARCHS, make_model_dir

from sinq_export import GraphConfig, SinqConfig
from sinq_export.contract import MANIFEST_FILE, MODEL_FILE
from sinq_export.export import export_causal_lm
from sinq_export.nn import quantize_model
from sinq_export.onnx_tensors import OnnxTensors
from sinq_export.validate.core import reference_model, validate
from sinq_export.validate.runners import run_ort_lm, run_torch_lm

STEPS = 16
PROMPT = [5, 17, 99, 3, 42, 250, 7, 18, 64, 11, 12, 77]  # 12 + 16 tokens: past any window below
CFG = SinqConfig(group_size=32, lm_head_bits=4)
TOL = 1e-4

# seeds whose greedy continuation neither settles on one token nor ends early
SEEDS = {"gemma3_text": 2, "phi3": 1}


def prompt_for(model) -> np.ndarray:
    """The prompt, after the BOS token for families that need it (Gemma)."""
    bos = [model.config.bos_token_id] if model.config.model_type.startswith("gemma") else []
    return np.array(bos + PROMPT, dtype=np.int64)


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


# Gemma3-4B/12B/27B text: linear rope scaling (factor 8) on the full-attention layers only
GEMMA3_LINEAR = {"rope_parameters": {
    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}


@pytest.mark.parametrize(("model_type", "overrides"),
                         [(t, {}) for t in ARCHS] + [("gemma3_text", GEMMA3_LINEAR)],
                         ids=[*ARCHS, "gemma3_text-linear-rope"])
def test_export_matches_transformers(tmp_path, model_type, overrides):
    model = make_model_dir(tmp_path / "hf", model_type, seed=SEEDS.get(model_type, 0), **overrides)
    export_causal_lm(tmp_path / "hf", tmp_path / "out", CFG, progress=False)
    quantize_model(model, CFG, progress=False)
    prompt = prompt_for(model)
    want, fed = run_torch_lm(model, prompt, STEPS)
    sess = cpu_session(tmp_path / "out")
    forced = run_ort_lm(sess, prompt, fed)
    rel = rel_error(forced.logits, want.logits)
    print(f"{model_type}: logits rel error {rel:.2e}")
    assert rel <= TOL
    assert run_ort_lm(sess, prompt, STEPS).fed == fed
    assert len(set(fed)) > 2  # the test model does not collapse to one repeated token
    # genai's loop (shared KV buffer), EOS suppressed on both sides: all STEPS tokens compared
    assert genai_greedy(tmp_path / "out", prompt, STEPS) == greedy_without_eos(model, prompt, STEPS,
                                                                          tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / MANIFEST_FILE).read_text())
    quantized = {n for n, m in model.named_modules() if type(m).__name__ == "SinqLinear"}
    assert set(manifest["layers"]) == quantized
    # the validator's reference, rebuilt from the source folder + the ONNX tensors, is the same
    rebuilt, rebuilt_fed = run_torch_lm(reference_model(tmp_path / "out"), prompt, STEPS)
    assert rebuilt_fed == fed and rel_error(rebuilt.logits, want.logits) <= 1e-6
    assert validate(tmp_path / "out", token_ids=prompt, decode_steps=4).status == "passed"


@pytest.mark.parametrize(("model_type", "folded_into"), [
    # Gemma's norms are x * (1 + w): only down_proj's t folds (into up_proj's rows)
    ("gemma3_text", {"model.layers.0.mlp.up_proj"}),
    # Phi3's fused qkv_proj / gate_up_proj fold into the norms they read
    ("phi3", {"model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
              "model.norm"}),
])
def test_folded_column_scales_match_transformers(tmp_path, model_type, folded_into):
    model = make_model_dir(tmp_path / "hf", model_type, seed=SEEDS.get(model_type, 0))
    cfg = CFG.replace(shared_col_scale=True)
    res = export_causal_lm(tmp_path / "hf", tmp_path / "out", cfg, GraphConfig(col_scale="fold"),
                           progress=False)
    folded = {la["folded_into"] for la in res.manifest["layers"].values()} - {None}
    assert folded == folded_into | {f.replace(".0.", ".1.") for f in folded_into}
    quantize_model(model, cfg, progress=False)
    prompt = prompt_for(model)
    want, fed = run_torch_lm(model, prompt, STEPS)
    got = run_ort_lm(cpu_session(tmp_path / "out"), prompt, fed)
    assert rel_error(got.logits, want.logits) <= TOL


# every rope type the export accepts; the scaled ones extend a 64-token original context to
# max_position_embeddings (256), so rows 64..255 are the extended positions
LONGROPE_FACTORS = {"short_factor": [1.0 + i / 10 for i in range(8)],
                    "long_factor": [2.0 + i for i in range(8)]}
ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "yarn-attention-factor": {"rope_type": "yarn", "factor": 4.0, "attention_factor": 0.7,
                              "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False,
                              "original_max_position_embeddings": 64},
    # longrope is static only while the original context is the whole context
    "longrope": {"rope_type": "longrope", **LONGROPE_FACTORS,
                 "original_max_position_embeddings": 256},
}


@pytest.mark.parametrize("rope", ROPES)
def test_rotary_tables_are_transformers_own(tmp_path, rope):
    """The cos/sin tables every GroupQueryAttention node reads equal what transformers' rotary
    module computes at every position of the export's context (GQA refuses a longer sequence),
    for sequences of every length the graph sees; scaled types differ from the default there."""
    model = make_model_dir(tmp_path / "hf", "llama", rope_scaling=ROPES[rope])
    export_causal_lm(tmp_path / "hf", tmp_path / "out", CFG, progress=False)
    graph_file = tmp_path / "out" / MODEL_FILE
    graph = onnx.load(str(graph_file), load_external_data=False)
    tensors = OnnxTensors(graph, graph_file.parent)
    context = model.config.max_position_embeddings
    assert json.loads((tmp_path / "out" / "genai_config.json").read_text()
                      )["model"]["context_length"] == context
    rotary = model.model.rotary_emb
    x = torch.zeros(1)
    for node in (n for n in graph.graph.node if n.op_type == "GroupQueryAttention"):
        cos, sin = tensors[node.input[7]], tensors[node.input[8]]
        assert cos.shape == (context, rotary.inv_freq.numel())
        for n in (1, 17, 64, 65, 200, context):  # prefill lengths, shorter and longer than 64
            want_cos, want_sin = (t[0, :, :cos.shape[1]].numpy() for t in
                                  rotary(x, torch.arange(n)[None]))
            np.testing.assert_allclose(cos[:n], want_cos, rtol=0, atol=1e-6)
            np.testing.assert_allclose(sin[:n], want_sin, rtol=0, atol=1e-6)
    if rope in ("linear", "llama3", "yarn"):  # the test would see a scaling left out
        default = 1.0 / 1e5 ** (np.arange(0, 2 * cos.shape[1], 2) / (2 * cos.shape[1]))
        assert np.abs(cos[64:] - np.cos(np.outer(np.arange(64, context), default))).max() > 0.1


def test_supported_model_types_and_architectures_agree():
    """The export builder's model types and the loader's architecture names are one set."""
    from sinq_export.checkpoint import architecture_model_types
    from sinq_export.contract import SUPPORTED_ARCHITECTURES, SUPPORTED_MODEL_TYPES

    types = [architecture_model_types(a) for a in SUPPORTED_ARCHITECTURES]
    assert all(len(t & set(SUPPORTED_MODEL_TYPES)) == 1 for t in types)
    assert set().union(*types) >= set(SUPPORTED_MODEL_TYPES)
    assert set(SUPPORTED_MODEL_TYPES) == set(ARCHS)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    for model_type in ("llama", "qwen2", "mistral", "gemma3_text"):
        make_model_dir(root / model_type, model_type)
    return root


@pytest.mark.parametrize(("model_type", "changes", "args", "message"), [
    # a causal LM transformers knows but the builder does not: every supported one is listed
    ("llama", {"model_type": "olmo", "architectures": ["OlmoForCausalLM"]}, [],
     "model_type='olmo' is not supported; supported: llama, mistral, qwen2, qwen3, gemma3_text, phi3"),
    ("llama", {"model_type": "qwen2"}, [], "model_type 'qwen2' disagrees with architectures"),
    ("llama", {"rope_scaling": {"rope_type": "su-rope", "factor": 2.0}}, [],
     "rope_scaling.rope_type='su-rope' is not supported"),
    # its factors switch for the whole sequence at 64 tokens: no static table holds that
    ("llama", {"rope_scaling": {"rope_type": "longrope", **LONGROPE_FACTORS,
                                "original_max_position_embeddings": 64}}, [],
     "rope_type='longrope': a position's angles differ between a sequence of 64 tokens and "
     "one of 256 (max_position_embeddings); they depend on the sequence length"),
    ("llama", {"head_dim": 24}, [], "head_dim=24 is not supported"),
    ("gemma3_text", {"rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e4}}}, [],
     "rope_parameters.sliding_attention.rope_type='linear' is not supported"),
    ("gemma3_text", {"rope_parameters": {
        "full_attention": {"rope_type": "longrope", "rope_theta": 1e6, "short_factor": [1.0] * 128,
                           "long_factor": [4.0] * 128, "original_max_position_embeddings": 64},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}, [],
     "rope_type='longrope' (full_attention): a position's angles differ between a sequence of 64"),
    # a rope dict transformers itself rejects
    ("llama", {"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, [],
     "transformers rejects config.json (Missing required keys in `rope_parameters` for "
     "'rope_type'='longrope'"),
    ("gemma3_text", {"final_logit_softcapping": 30.0}, [],
     "final_logit_softcapping=30.0 is not supported"),
    # windows the graph would not apply: mobius has none for mixed layers, none in fp16
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1,
               "layer_types": ["full_attention", "sliding_attention"]}, [],
     "layer_types mixes sliding and full attention (sliding_window=8)"),
    ("mistral", {}, ["--dtype", "fp16"], "sliding_window=8 cannot be honoured with dtype FLOAT16"),
])
def test_cli_refuses_what_the_builder_cannot_honour(tiny_dirs, tmp_path, capsys, model_type,
                                                     changes, args, message):
    import shutil

    from sinq_export.cli import main
    from sinq_export.outcome import EXIT_USAGE

    src = tmp_path / "hf"
    shutil.copytree(tiny_dirs / model_type, src)
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    (src / "config.json").write_text(json.dumps(config))
    rc = main(["model", str(src), "-o", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert rc == EXIT_USAGE
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_quantized_embedding_keeps_gemma_scale(tmp_path):
    """`--embedding-bits` swaps Gemma3's scaled embedding for GatherBlockQuantized: the
    sqrt(hidden) factor must survive the swap (and the tied head share the table)."""
    model = make_model_dir(tmp_path / "hf", "gemma3_text", seed=SEEDS["gemma3_text"])
    res = export_causal_lm(tmp_path / "hf", tmp_path / "out", CFG, GraphConfig(embedding_bits=4),
                           progress=False)
    assert res.manifest["layers"]["lm_head"]["shared_with"] == "model.embed_tokens"
    quantize_model(model, CFG, progress=False)
    with torch.no_grad():  # the head is a SinqLinear now: only the gather reads this table,
        # which is the head's record (quantized with the probe's energies of the head input)
        model.model.embed_tokens.weight.copy_(model.lm_head.record.dequantize())
    prompt = prompt_for(model)
    want, fed = run_torch_lm(model, prompt, STEPS)
    got = run_ort_lm(cpu_session(tmp_path / "out"), prompt, fed)
    assert rel_error(got.logits, want.logits) <= TOL
