"""The built decoder route on tiny random-weight models of real architectures.

Each model is a real transformers class built offline from a config with the real family's
features (GQA, tied or untied head, q/k/v biases, rope theta) at toy sizes. The export (at
accuracy_level 0) must match the transformers model with `SinqLinear`s swapped in: logits
relative error <= 1e-4 and the same greedy tokens over a prefill + 16 decode steps, in plain
onnxruntime and in onnxruntime-genai (whose loop uses the shared KV buffer).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from _helpers import PROMPT, STEPS, cpu_session, genai_greedy, greedy_without_eos
from _models import FAMILIES, make_family_dir

from sinq_export import GraphConfig, SinqConfig
from sinq_export.contract import MANIFEST_FILE, MODEL_FILE, REFERENCE_DIR
from sinq_export.export import ExportError, export_causal_lm
from sinq_export.models import ModelLoadError
from sinq_export.nn import quantize_model
from sinq_export.validate.runners import run_ort_lm, run_torch_lm


def reference(model, config: SinqConfig):
    quantize_model(model, config, progress=False)
    return model


CFG = SinqConfig(group_size=32, lm_head_bits=4)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model = make_family_dir(root / "hf", request.param)
    export_causal_lm(root / "hf", root / "out", CFG, progress=False)
    ref = reference(model, CFG)
    torch_run, fed = run_torch_lm(ref, PROMPT, STEPS)
    return root, torch_run, fed, greedy_without_eos(ref, PROMPT, STEPS, root / "out")


def test_logits_and_greedy_tokens_match_torch(exported):
    root, torch_run, fed, _ = exported
    sess = cpu_session(root / "out")
    run = run_ort_lm(sess, PROMPT, fed)  # teacher-forced on torch's tokens
    rel = np.abs(run.logits - torch_run.logits).max() / np.abs(torch_run.logits).max()
    assert rel <= 1e-4
    greedy = run_ort_lm(sess, PROMPT, STEPS)
    assert greedy.fed == fed
    assert len(set(fed)) > 2  # the test model does not collapse to one repeated token


def test_genai_greedy_matches_torch(exported):
    root, _, _, want = exported
    genai = json.loads((root / "out" / "genai_config.json").read_text())
    assert genai["search"]["past_present_share_buffer"] is True
    assert genai_greedy(root / "out", PROMPT, STEPS) == want


def test_graph_is_fused_and_manifest_names_real_tensors(exported):
    root, _, _, _ = exported
    model = onnx.load(str(root / "out" / MODEL_FILE), load_external_data=False)
    ops = {(n.domain, n.op_type) for n in model.graph.node}
    assert ("com.microsoft", "GroupQueryAttention") in ops
    assert ("com.microsoft", "SkipSimplifiedLayerNormalization") in ops
    assert [i.name for i in model.graph.input][:4] == [
        "input_ids", "attention_mask", "past_key_values.0.key", "past_key_values.0.value"]
    assert model.ir_version == 11
    manifest = json.loads((root / "out" / MANIFEST_FILE).read_text())
    inits = {t.name for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    produced = {o for n in model.graph.node for o in n.output}
    assert len(manifest["layers"]) == 2 * 7 + 1  # every linear and the head
    for name, layer in manifest["layers"].items():
        assert nodes[layer["node"]].op_type == "MatMulNBits"
        assert layer["output"] in produced and layer["rows"] == [0, layer["shape"][0]]
        assert {v for v in layer["initializers"].values() if v} <= inits, name
    assert manifest["source"]["path"] == str((root / "hf").absolute())
    assert not (root / "out" / REFERENCE_DIR).exists()


def _check_qkv_packing(manifest: dict, out, packed: bool) -> None:
    """Packed: q/k/v of a layer are rows [0, q) [q, q+k) [q+k, N) of one MatMulNBits feeding
    GQA's packed-QKV form (key/value inputs empty). Else three nodes, GQA reads three inputs."""
    graph = onnx.load(str(out / MODEL_FILE), load_external_data=False).graph
    nodes = {n.name: n for n in graph.node}
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    for i, node in enumerate(gqa):
        attn = {k: v for k, v in manifest["layers"].items() if f"layers.{i}.self_attn." in k}
        qkv = [attn[f"model.layers.{i}.self_attn.{p}_proj"] for p in "qkv"]
        if not packed:
            assert len({la["node"] for la in qkv}) == 3 and all(node.input[1:3])
            continue
        assert len({la["node"] for la in qkv}) == 1 and not any(node.input[1:3])
        assert [la["rows"] for la in qkv] == [
            [0, qkv[0]["shape"][0]], [qkv[0]["shape"][0], qkv[0]["shape"][0] + qkv[1]["shape"][0]],
            [qkv[0]["shape"][0] + qkv[1]["shape"][0], sum(la["shape"][0] for la in qkv)]]
        mm = nodes[qkv[0]["node"]]
        assert mm.input[1] == f"model.layers.{i}.self_attn.qkv_proj.qweight"
        assert {a.name: a.i for a in mm.attribute}["N"] == qkv[2]["rows"][1]


@pytest.mark.parametrize("shared", ["all", "mlp"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_folded_column_scales_match_torch(tmp_path, family, shared):
    """col_scale=fold with shared t: gate/up's t in the post-attention norm, down's t in up's
    rows, the head's t in the final norm; with ``all`` also q/k/v's in the input norm, and
    q/k/v packed into one node (not Qwen3: its q/k norms sit between). Same numbers."""
    model = make_family_dir(tmp_path / "hf", family, seed=1)
    cfg = CFG.replace(shared_col_scale=shared)
    res = export_causal_lm(tmp_path / "hf", tmp_path / "out", cfg, GraphConfig(col_scale="fold"),
                           progress=False)
    per_layer = 1 if shared == "all" else 3  # o_proj (+ k, v: q's t is in the input norm)
    assert res.manifest["mul_nodes"] == 2 * per_layer
    modes = {la["col_scale_mode"] for la in res.manifest["layers"].values()}
    assert modes == ({"fold", "mul"} if shared == "all" else {"fold", "mul", "ratio"})
    _check_qkv_packing(res.manifest, tmp_path / "out", shared == "all" and family != "qwen3")
    torch_run, fed = run_torch_lm(reference(model, cfg), PROMPT, STEPS)
    run = run_ort_lm(cpu_session(tmp_path / "out"), PROMPT, fed)
    assert np.abs(run.logits - torch_run.logits).max() / np.abs(torch_run.logits).max() <= 1e-4
    if shared == "all" and family == "qwen2":  # packed rows with biases: validate slices them
        from sinq_export.validate import validate

        assert validate(tmp_path / "out", token_ids=PROMPT, decode_steps=4).status == "passed"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lead_column_scale_folds_into_each_norm(tmp_path, family):
    """col_scale=fold with a t per linear: the first reader of each norm (q_proj, gate_proj)
    folds its t into the norm weight, the others multiply by their t over the lead's
    (``ratio``); o_proj keeps its Mul. Same numbers as torch, and validate passes."""
    model = make_family_dir(tmp_path / "hf", family, seed=4)
    res = export_causal_lm(tmp_path / "hf", tmp_path / "out", CFG, GraphConfig(col_scale="fold"),
                           progress=False)
    layers = res.manifest["layers"]
    assert res.manifest["mul_nodes"] == 2 * 4  # per layer: k, v, up (ratio), o_proj (mul)
    for i in range(2):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        assert layers[f"{attn}.q_proj"]["folded_into"] == f"model.layers.{i}.input_layernorm"
        assert layers[f"{mlp}.gate_proj"]["folded_into"] == f"model.layers.{i}.post_attention_layernorm"
        for name, lead in ((f"{attn}.k_proj", f"{attn}.q_proj"), (f"{attn}.v_proj", f"{attn}.q_proj"),
                           (f"{mlp}.up_proj", f"{mlp}.gate_proj")):
            assert layers[name]["col_scale_mode"] == "ratio" and layers[name]["ratio_of"] == lead
        assert layers[f"{attn}.o_proj"]["col_scale_mode"] == "mul"
    torch_run, fed = run_torch_lm(reference(model, CFG), PROMPT, STEPS)
    run = run_ort_lm(cpu_session(tmp_path / "out"), PROMPT, fed)
    assert np.abs(run.logits - torch_run.logits).max() / np.abs(torch_run.logits).max() <= 1e-4
    from sinq_export.validate import validate

    assert validate(tmp_path / "out", token_ids=PROMPT, decode_steps=4).status == "passed"


def test_no_lead_fold_when_a_norm_reader_stays_float(tmp_path):
    """A float reader of the input norm (k_proj excluded) would see q's t: nothing folds there."""
    make_family_dir(tmp_path / "hf", "llama", seed=4)
    cfg = CFG.replace(exclude=(r"k_proj",))
    res = export_causal_lm(tmp_path / "hf", tmp_path / "out", cfg, GraphConfig(col_scale="fold"),
                           progress=False)
    layers = res.manifest["layers"]
    assert "model.layers.0.self_attn.k_proj" not in layers
    assert {layers[f"model.layers.0.self_attn.{p}"]["col_scale_mode"] for p in ("q_proj", "v_proj")} \
        == {"mul"}
    assert layers["model.layers.0.mlp.up_proj"]["col_scale_mode"] == "ratio"


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_symmetric_export_omits_default_zero_points(tmp_path, family):
    """Symmetric codes at their own width: MatMulNBits without a zero-point input (its
    default 2^(bits-1) is exact), packed q/k/v included; a 3-bit layer in a 4-bit container
    keeps its zero points (4 is not the container's 8). Same numbers as torch."""
    model = make_family_dir(tmp_path / "hf", family, seed=2)
    cfg = CFG.replace(symmetric=True, shared_col_scale="all",
                      overrides=((r"layers\.1\.mlp\.down_proj", 3),))
    res = export_causal_lm(tmp_path / "hf", tmp_path / "out", cfg, GraphConfig(col_scale="fold"),
                           progress=False)
    graph = onnx.load(str(tmp_path / "out" / MODEL_FILE), load_external_data=False).graph
    nodes = {n.name: n for n in graph.node}
    for name, layer in res.manifest["layers"].items():
        node = nodes[layer["node"]]
        three_bit = name.endswith("layers.1.mlp.down_proj")
        assert (len(node.input) > 3) == three_bit, name
        assert (layer["initializers"]["zero_points"] is None) == (not three_bit), name
    _check_qkv_packing(res.manifest, tmp_path / "out", True)
    torch_run, fed = run_torch_lm(reference(model, cfg), PROMPT, STEPS)
    run = run_ort_lm(cpu_session(tmp_path / "out"), PROMPT, fed)
    assert np.abs(run.logits - torch_run.logits).max() / np.abs(torch_run.logits).max() <= 1e-4
    from sinq_export.validate import validate

    assert validate(tmp_path / "out", token_ids=PROMPT, decode_steps=4).status == "passed"


def test_precomputed_calibrated_records_are_what_ships(tmp_path):
    """A calibrated pass (`quantize_model` with calibration windows, A-SINQ + GPTQ) hands its
    records to the streamed export: the ONNX model computes the calibrated torch model, and
    the records differ from a calibration-free export's (so they were used, not re-made)."""
    model = make_family_dir(tmp_path / "hf", "qwen2", seed=3)
    cfg = CFG.replace(calibrate=True, lm_head_bits=None)
    windows = torch.randint(0, 320, (2, 64), generator=torch.Generator().manual_seed(0))
    quantize_model(model, cfg, progress=False, calibration=windows)
    from sinq_export.nn import quantized_layers

    records = {n: m.record for n, m in quantized_layers(model).items()}
    res = export_causal_lm(tmp_path / "hf", tmp_path / "out", cfg, progress=False,
                           records=records, manifest_extra={"calibration": {"tokens": 128}})
    assert res.manifest["calibration"] == {"tokens": 128} and res.manifest["config"]["calibrate"]
    torch_run, fed = run_torch_lm(model, PROMPT, STEPS)
    run = run_ort_lm(cpu_session(tmp_path / "out"), PROMPT, fed)
    assert np.abs(run.logits - torch_run.logits).max() / np.abs(torch_run.logits).max() <= 1e-4
    from sinq_export.validate import validate

    # GPTQ moves codes several steps from round-to-nearest: the weight check uses RMS steps
    report = validate(tmp_path / "out", token_ids=PROMPT, decode_steps=4)
    assert report.status == "passed"
    free = export_causal_lm(tmp_path / "hf", tmp_path / "free", CFG.replace(lm_head_bits=None),
                            progress=False)
    name = "model.layers.0.mlp.down_proj.qweight"
    got = {d: onnx.load(str(tmp_path / d / MODEL_FILE)) for d in ("out", "free")}
    arrays = {d: next(onnx.numpy_helper.to_array(t) for t in m.graph.initializer if t.name == name)
              for d, m in got.items()}
    assert not np.array_equal(arrays["out"], arrays["free"]) and free.manifest.get("calibration") is None
    bad = {**records, "model.layers.0.mlp.up_proj": records["model.layers.0.mlp.down_proj"]}
    with pytest.raises(ExportError, match="up_proj: given record"):
        export_causal_lm(tmp_path / "hf", tmp_path / "bad", cfg, progress=False, records=bad)
    assert not (tmp_path / "bad").exists()


def test_calibrated_tied_head_is_the_shared_table(tmp_path):
    """``--calibrate`` with a tied head and table at one width: the table on disk is the
    calibrated head's record (not a calibration-free quantization of the table), so the ONNX
    model computes the calibrated torch model with its embedding = that record."""
    model = make_family_dir(tmp_path / "hf", "llama", seed=3)
    cfg = CFG.replace(calibrate=True, lm_head_group_size=16)
    windows = torch.randint(0, 320, (2, 64), generator=torch.Generator().manual_seed(0))
    quantize_model(model, cfg, progress=False, calibration=windows)
    from sinq_export.nn import quantized_layers

    records = {n: m.record for n, m in quantized_layers(model).items()}
    res = export_causal_lm(tmp_path / "hf", tmp_path / "out", cfg, GraphConfig(embedding_bits=4),
                           progress=False, records=records)
    assert res.manifest["layers"]["lm_head"]["shared_with"] == "model.embed_tokens"
    graph = onnx.load(str(tmp_path / "out" / MODEL_FILE))
    table = next(onnx.numpy_helper.to_array(t) for t in graph.graph.initializer
                 if t.name == "model.embed_tokens.qweight")
    head = records["lm_head"]
    assert np.array_equal(table, head.packed.numpy().reshape(table.shape))
    model.get_input_embeddings().weight = torch.nn.Parameter(head.dequantize(), requires_grad=False)
    torch_run, fed = run_torch_lm(model, PROMPT, STEPS)
    run = run_ort_lm(cpu_session(tmp_path / "out"), PROMPT, fed)
    assert np.abs(run.logits - torch_run.logits).max() / np.abs(torch_run.logits).max() <= 1e-4


def test_lm_head_group_size_reaches_the_graph(tmp_path):
    """A finer head group (``lm_head_group_size``) is the head node's block size; a tied head
    at the table's width still shares one table, quantized at the head's group size."""
    make_family_dir(tmp_path / "hf", "llama", seed=4)
    cfg = CFG.replace(lm_head_group_size=16)
    res = export_causal_lm(tmp_path / "hf", tmp_path / "out", cfg, GraphConfig(embedding_bits=4),
                           progress=False)
    head = res.manifest["layers"]["lm_head"]
    assert head["group_size"] == 16 and head["shared_with"] == "model.embed_tokens"
    assert res.manifest["layers"]["model.embed_tokens"]["group_size"] == 16
    graph = onnx.load(str(tmp_path / "out" / MODEL_FILE), load_external_data=False).graph
    node = next(n for n in graph.node if n.name == head["node"])
    assert {a.name: a.i for a in node.attribute}["block_size"] == 16
    from sinq_export.validate import validate

    assert validate(tmp_path / "out", token_ids=PROMPT, decode_steps=4).status == "passed"


def test_missing_tokenizer_is_a_warning_not_a_failure(tmp_path, capsys):
    """A folder without tokenizer files still exports (token ids work in a plain session), but
    the summary and stderr say what genai / eval / validate will miss; with one, no warning."""
    from sinq_export.cli import main

    make_family_dir(tmp_path / "hf", "llama")
    res = export_causal_lm(tmp_path / "hf", tmp_path / "out", CFG, progress=False)
    (warning,) = res.summary()["warnings"]
    assert "no tokenizer file" in warning and str(tmp_path / "hf") in warning
    assert main(["model", str(tmp_path / "hf"), "-o", str(tmp_path / "cli"), "--group-size", "32",
                 "--json"]) == 0
    assert "warning: " in capsys.readouterr().err
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")
    res = export_causal_lm(tmp_path / "hf", tmp_path / "out2", CFG, progress=False)
    assert res.summary()["warnings"] == []


def test_two_exports_are_byte_identical(tmp_path):
    make_family_dir(tmp_path / "hf", "llama")
    for name in ("a", "b"):
        export_causal_lm(tmp_path / "hf", tmp_path / name, CFG, progress=False)
    files = sorted(str(p.relative_to(tmp_path / "a")) for p in (tmp_path / "a").rglob("*")
                   if p.is_file())
    assert files == sorted(str(p.relative_to(tmp_path / "b")) for p in (tmp_path / "b").rglob("*")
                           if p.is_file())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def _edit_config(folder, **changes) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize(("changes", "message"), [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "model_type='gpt2'.*supported: llama"),
    ({"architectures": ["Qwen2ForCausalLM"]}, "Qwen2ForCausalLM.*llama|llama.*Qwen2ForCausalLM"),
    ({"rope_scaling": {"rope_type": "longrope2", "factor": 2.0}}, "rope_type='longrope2'.*supported"),
])
def test_unsupported_configs_are_refused(tmp_path, changes, message):
    make_family_dir(tmp_path / "hf", "llama")
    _edit_config(tmp_path / "hf", **changes)
    with pytest.raises((ExportError, ModelLoadError), match=message):
        export_causal_lm(tmp_path / "hf", tmp_path / "out", CFG, progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_or_misshapen_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    make_family_dir(tmp_path / "hf", "llama")
    path = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.post_attention_layernorm.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="model.layers.1.post_attention_layernorm.weight"):
        export_causal_lm(tmp_path / "hf", tmp_path / "out", CFG, progress=False)
    tensors["model.layers.1.post_attention_layernorm.weight"] = torch.ones(95)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"post_attention_layernorm.weight.*\(95,\)"):
        export_causal_lm(tmp_path / "hf", tmp_path / "out", CFG, progress=False)
    assert not (tmp_path / "out").exists()


def test_quantizing_nothing_is_an_error_unless_asked(tmp_path):
    make_family_dir(tmp_path / "hf", "llama")
    cfg = SinqConfig(group_size=32, include=("nothing-matches",))
    with pytest.raises(ExportError, match="quantizes no linear"):
        export_causal_lm(tmp_path / "hf", tmp_path / "out", cfg, progress=False)
    res = export_causal_lm(tmp_path / "hf", tmp_path / "out", cfg, progress=False,
                           allow_unquantized=True)
    assert res.manifest["layers"] == {}
    logits = cpu_session(tmp_path / "out").run(["logits"], _empty_feed(tmp_path / "out"))[0]
    assert np.isfinite(logits).all()


def _empty_feed(out) -> dict:
    sess = cpu_session(out)
    feed = {"input_ids": PROMPT[None, :], "attention_mask": np.ones((1, len(PROMPT)), np.int64)}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values"):
            feed[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    return feed


@pytest.mark.parametrize(("bits", "graph", "tol"), [
    (3, GraphConfig(runtime="custom"), 1e-4),
    (4, GraphConfig(runtime="custom", col_scale="fused"), 1e-4),
    (4, GraphConfig(dtype="fp16"), 1e-2),
], ids=["3bit-custom", "4bit-fused", "fp16"])
def test_other_graphs_run_in_ort_and_genai(tmp_path, bits, graph, tol):
    """Custom-op graphs run in genai through the library the export ships (genai_config names
    it); fp16 (standard Attention on CPU) runs with an unshared cache."""
    from sinq_export import runtime_ops

    model = make_family_dir(tmp_path / "hf", "qwen2", seed=2)
    cfg = SinqConfig(bits=bits, group_size=32, lm_head_bits=bits)
    res = export_causal_lm(tmp_path / "hf", tmp_path / "out", cfg, graph, progress=False)
    genai = json.loads((tmp_path / "out" / "genai_config.json").read_text())
    options = genai["model"]["decoder"]["session_options"]
    if graph.runtime == "custom":
        assert {la["op"] for la in res.manifest["layers"].values()} == {"SinqMatMulNBits"}
        assert options["custom_ops_library"] == runtime_ops.LIB_NAME
        assert (tmp_path / "out" / runtime_ops.LIB_NAME).is_file()
    else:
        assert "custom_ops_library" not in options
    assert genai["search"]["past_present_share_buffer"] is (graph.dtype == "fp32")
    ref = reference(model, cfg)
    torch_run, fed = run_torch_lm(ref, PROMPT, STEPS)
    sess = ort.InferenceSession(str(tmp_path / "out" / MODEL_FILE),
                                runtime_ops.session_options(), providers=["CPUExecutionProvider"])
    run = run_ort_lm(sess, PROMPT, fed)
    assert np.abs(run.logits - torch_run.logits).max() / np.abs(torch_run.logits).max() <= tol
    assert genai_greedy(tmp_path / "out", PROMPT, STEPS) == greedy_without_eos(ref, PROMPT, STEPS,
                                                                          tmp_path / "out")


@pytest.mark.parametrize(("family", "embedding_bits", "col_scale"), [
    ("llama", 4, "mul"), ("llama", 4, "fold"), ("qwen2", 8, "mul")])
def test_quantized_embedding_matches_torch(tmp_path, family, embedding_bits, col_scale):
    """GatherBlockQuantized table (t applied after the gather); a tied head at the same width
    reads the same record: one table on disk."""
    from sinq_export.quant import make_config, quantize

    model = make_family_dir(tmp_path / "hf", family, seed=3)
    table = model.model.embed_tokens.weight.detach().clone()
    res = export_causal_lm(tmp_path / "hf", tmp_path / "out", CFG,
                           GraphConfig(embedding_bits=embedding_bits, col_scale=col_scale),
                           progress=False)
    layers = res.manifest["layers"]
    assert layers["model.embed_tokens"]["op"] == "GatherBlockQuantized"
    tied = FAMILIES[family]["tie_word_embeddings"]
    assert layers["lm_head"]["shared_with"] == ("model.embed_tokens" if tied else None)
    inits = {t.name for t in onnx.load(str(tmp_path / "out" / MODEL_FILE),
                                       load_external_data=False).graph.initializer}
    assert "model.embed_tokens.weight" not in inits and ("lm_head.qweight" in inits) != tied
    ref = reference(model, CFG)
    # a tied table is the head's record (quantized with the probe's energies of the head's
    # input); an untied one is quantized from its weight alone
    record = ref.lm_head.record if tied else quantize(table, make_config(
        "sinq", bits=embedding_bits, group_size=CFG.group_size))
    with torch.no_grad():  # the head is a SinqLinear now: only the gather reads this
        ref.model.embed_tokens.weight.copy_(record.dequantize())
    torch_run, fed = run_torch_lm(ref, PROMPT, STEPS)
    run = run_ort_lm(cpu_session(tmp_path / "out"), PROMPT, fed)
    assert np.abs(run.logits - torch_run.logits).max() / np.abs(torch_run.logits).max() <= 1e-4
    assert genai_greedy(tmp_path / "out", PROMPT, STEPS) == greedy_without_eos(ref, PROMPT, STEPS,
                                                                          tmp_path / "out")


def test_overrides_and_float_layers(tmp_path):
    """Per-layer widths (--override) and float layers (--exclude; a float tied head): the
    float weights reach the graph as lazily transposed copies of the checkpoint's."""
    model = make_family_dir(tmp_path / "hf", "llama", seed=4)
    cfg = SinqConfig(group_size=32, overrides={r"down_proj$": 8},
                     exclude=(r"(^|\.)lm_head$", r"layers\.0\.self_attn\.o_proj$"))
    res = export_causal_lm(tmp_path / "hf", tmp_path / "out", cfg, progress=False)
    layers = res.manifest["layers"]
    assert layers["model.layers.1.mlp.down_proj"]["bits"] == 8
    assert "model.layers.0.self_attn.o_proj" not in layers and "lm_head" not in layers
    graph = onnx.load(str(tmp_path / "out" / MODEL_FILE), load_external_data=False).graph
    assert sum(n.op_type == "MatMul" for n in graph.node) == 2  # o_proj of layer 0, the head
    assert not any(n.op_type == "Transpose" for n in graph.node)
    torch_run, fed = run_torch_lm(reference(model, cfg), PROMPT, STEPS)
    run = run_ort_lm(cpu_session(tmp_path / "out"), PROMPT, fed)
    assert np.abs(run.logits - torch_run.logits).max() / np.abs(torch_run.logits).max() <= 1e-4


@pytest.mark.parametrize(("family", "shared"),
                         [(f, "all") for f in sorted(FAMILIES)] + [("llama", "none")])
def test_tied_o_proj_folds_into_value_rows(tmp_path, family, shared):
    """With o_proj's t tied per GQA group, it multiplies v_proj's rows (and bias) instead of a
    Mul: ``all`` leaves no column-scale Mul at all (genai's graph), ``none`` only the k/v/up
    ratios. Same numbers as torch; validate passes (packed rows with biases included)."""
    model = make_family_dir(tmp_path / "hf", family, seed=2)
    cfg = CFG.replace(shared_col_scale=shared).tie_o_proj_for(FAMILIES[family])
    res = export_causal_lm(tmp_path / "hf", tmp_path / "out", cfg, GraphConfig(col_scale="fold"),
                           progress=False)
    assert res.manifest["mul_nodes"] == (0 if shared == "all" else 2 * 3)
    kv = FAMILIES[family]["num_key_value_heads"]
    layers = res.manifest["layers"]
    for i in range(2):
        attn = f"model.layers.{i}.self_attn"
        assert layers[f"{attn}.o_proj"]["folded_into"] == f"{attn}.v_proj"
        assert layers[f"{attn}.v_proj"]["output_scaled_by"] == f"{attn}.o_proj"
        assert layers[f"{attn}.v_proj"]["output_scale_heads"] == kv
    ref = reference(model, cfg)
    rep = FAMILIES[family]["num_attention_heads"] // kv
    t = ref.model.layers[0].self_attn.o_proj.record.col_scale.reshape(kv, rep, -1)
    assert torch.equal(t, t[:, :1].expand_as(t))
    torch_run, fed = run_torch_lm(ref, PROMPT, STEPS)
    run = run_ort_lm(cpu_session(tmp_path / "out"), PROMPT, fed)
    assert np.abs(run.logits - torch_run.logits).max() / np.abs(torch_run.logits).max() <= 1e-4
    assert run_ort_lm(cpu_session(tmp_path / "out"), PROMPT, STEPS).fed == fed
    got = genai_greedy(tmp_path / "out", PROMPT, STEPS)  # genai's shared-buffer loop
    assert got == greedy_without_eos(ref, PROMPT, STEPS, tmp_path / "out")
    from sinq_export.validate import validate

    assert validate(tmp_path / "out", token_ids=PROMPT, decode_steps=4).status == "passed"


def test_o_proj_tie_of_another_model_is_refused(tmp_path):
    make_family_dir(tmp_path / "hf", "llama")
    cfg = CFG.replace(o_proj_tie=(3, 2))  # the model has 2 kv heads of 3 query heads each
    with pytest.raises(ExportError, match=r"o_proj_tie=\[3, 2\].*\[2, 3\]"):
        export_causal_lm(tmp_path / "hf", tmp_path / "out", cfg, GraphConfig(col_scale="fold"),
                         progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("runtime", ["stock", "custom"])
def test_allocated_widths_and_group_sizes_export(tmp_path, runtime):
    """What a bit allocation writes (a width and a group size per layer, `group_overrides`)
    reaches every node: block sizes per layer, 5-bit codes in 8-bit containers (stock) or the
    custom op (custom); logits match torch and validate passes."""
    from sinq_export import runtime_ops

    model = make_family_dir(tmp_path / "hf", "llama", seed=5)
    cfg = CFG.replace(overrides=((r"\.0\.mlp\.", 5),),
                      group_overrides=((r"\.1\.self_attn\.", 64), (r"up_proj", 16)))
    res = export_causal_lm(tmp_path / "hf", tmp_path / "out", cfg, GraphConfig(runtime=runtime),
                           progress=False)
    layers = res.manifest["layers"]
    assert layers["model.layers.1.self_attn.q_proj"]["group_size"] == 64
    assert layers["model.layers.0.mlp.up_proj"]["group_size"] == 16
    assert layers["model.layers.0.mlp.up_proj"]["bits"] == 5
    assert layers["model.layers.0.mlp.gate_proj"]["container_bits"] == (8 if runtime == "stock" else 5)
    assert layers["model.layers.0.self_attn.q_proj"]["group_size"] == 32
    nodes = {n.name: n for n in onnx.load(str(tmp_path / "out" / MODEL_FILE),
                                          load_external_data=False).graph.node}
    node = nodes[layers["model.layers.1.self_attn.q_proj"]["node"]]
    assert {a.name: a.i for a in node.attribute}["block_size"] == 64
    torch_run, fed = run_torch_lm(reference(model, cfg), PROMPT, STEPS)
    sess = ort.InferenceSession(str(tmp_path / "out" / MODEL_FILE),
                                runtime_ops.session_options(), providers=["CPUExecutionProvider"])
    run = run_ort_lm(sess, PROMPT, fed)
    assert np.abs(run.logits - torch_run.logits).max() / np.abs(torch_run.logits).max() <= 1e-4
    from sinq_export.validate import validate

    assert validate(tmp_path / "out", token_ids=PROMPT, decode_steps=4).status == "passed"


def test_o_proj_tie_that_cannot_fold_is_refused(tmp_path):
    """A tied t kept as a Mul (v_proj float, or --col-scale mul) is quality lost for nothing."""
    make_family_dir(tmp_path / "hf", "llama")
    cfg = CFG.tie_o_proj_for(FAMILIES["llama"])
    for c, graph in ((cfg.replace(exclude=(r"v_proj", r"lm_head")), GraphConfig(col_scale="fold")),
                     (cfg, GraphConfig(col_scale="mul"))):
        with pytest.raises(ExportError, match="o_proj_tie: model.layers.0.self_attn.o_proj"):
            export_causal_lm(tmp_path / "hf", tmp_path / "out", c, graph, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("table_bits", [4, 8])
def test_a_float_tied_head_beside_a_quantized_table_validates(tmp_path, table_bits):
    """The head stays float (its graph MatMul reads the source weight) while the tied table
    is quantized: the validator's reference must not give the head the table's codes."""
    make_family_dir(tmp_path / "hf", "llama", seed=5)
    res = export_causal_lm(tmp_path / "hf", tmp_path / "out", CFG.replace(lm_head_bits=None),
                           GraphConfig(embedding_bits=table_bits), progress=False)
    assert FAMILIES["llama"]["tie_word_embeddings"] is True
    assert "lm_head" not in res.manifest["layers"]
    from sinq_export.validate import validate

    assert validate(tmp_path / "out", token_ids=PROMPT, decode_steps=4).status == "passed"


@pytest.mark.parametrize(("family", "table_bits", "group_size"), [
    ("llama", 4, 32), ("llama", 4, 16), ("llama", 8, 32), ("qwen2", 4, 32)])
def test_a_table_in_standard_ops_computes_what_gather_block_quantized_does(
        tmp_path, family, table_bits, group_size):
    """``table_ops="standard"`` reads the same tensors with Gather and standard ops: the same
    bytes on disk, bit-identical logits, and it validates, tied (llama: the head reads the
    table's record) or not (qwen2). Group size 32 on the 96-wide hidden gives three 4-bit zero
    points per row (the last byte's padding nibble is cut off), 16 six."""
    make_family_dir(tmp_path / "hf", family, seed=3)
    cfg = CFG.replace(group_size=group_size, lm_head_bits=table_bits,
                      lm_head_group_size=group_size)
    runs, manifests = {}, {}
    for ops in ("contrib", "standard"):
        res = export_causal_lm(tmp_path / "hf", tmp_path / ops, cfg,
                               GraphConfig(embedding_bits=table_bits, table_ops=ops),
                               progress=False)
        manifests[ops] = res.manifest["layers"]["model.embed_tokens"]
        runs[ops] = run_ort_lm(cpu_session(tmp_path / ops), PROMPT, STEPS)
    assert (manifests["contrib"]["op"], manifests["standard"]["op"]) == (
        "GatherBlockQuantized", "Gather")
    graph = onnx.load(str(tmp_path / "standard" / MODEL_FILE), load_external_data=False)
    assert "GatherBlockQuantized" not in {n.op_type for n in graph.graph.node}
    # the manifest's output is the dequantized rows (as the contrib op's), not the codes
    producer = {o: n for n in graph.graph.node for o in n.output}
    assert producer[manifests["standard"]["output"]].op_type == "Reshape"
    data = sorted(p.name for p in (tmp_path / "standard" / "onnx").glob("*_data*"))
    assert data and all((tmp_path / "standard" / "onnx" / name).read_bytes()
                        == (tmp_path / "contrib" / "onnx" / name).read_bytes() for name in data)
    np.testing.assert_array_equal(runs["standard"].logits, runs["contrib"].logits)
    from sinq_export.validate import validate

    assert validate(tmp_path / "standard", token_ids=PROMPT, decode_steps=4).status == "passed"


def test_a_standard_op_table_in_an_fp16_graph_validates(tmp_path):
    """In float16 each gathered element is rounded once (``(q - z) * s``), so the logits match
    the contrib op's to float16 rounding, not bit for bit; the export validates."""
    make_family_dir(tmp_path / "hf", "llama", seed=3)
    export_causal_lm(tmp_path / "hf", tmp_path / "out", CFG,
                     GraphConfig(embedding_bits=4, table_ops="standard", dtype="fp16"),
                     progress=False)
    from sinq_export.validate import validate

    assert validate(tmp_path / "out", token_ids=PROMPT, decode_steps=4).status == "passed"


def test_a_table_gathered_with_its_nibbles_swapped_fails_validate(tmp_path):
    """The standard-op table's unpacking is checked end to end: the graph reading each byte's
    high nibble first (every tensor unchanged) must not pass."""
    make_family_dir(tmp_path / "hf", "llama", seed=3)
    export_causal_lm(tmp_path / "hf", tmp_path / "out", CFG,
                     GraphConfig(embedding_bits=4, table_ops="standard"), progress=False)
    path = tmp_path / "out" / MODEL_FILE
    model = onnx.load(str(path), load_external_data=False)
    pairs = [n for n in model.graph.node if n.op_type == "Concat" and len(n.input) == 2
             and all("Unsqueeze" in i or "unsqueeze" in i.lower() for i in n.input)]
    assert pairs, "the nibble pairs' Concat nodes"
    for node in pairs:
        node.input[0], node.input[1] = node.input[1], node.input[0]
    onnx.save(model, str(path))
    from sinq_export.validate import validate

    assert validate(tmp_path / "out", token_ids=PROMPT, decode_steps=4).status == "failed"
