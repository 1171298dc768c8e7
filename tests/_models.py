"""The test suite's tiny models, tokenizers and source folders: one home for every factory.

Every model here is a real transformers class (or a real GGUF file written with the ``gguf``
package's own writer) with random weights drawn after a fixed seed, built offline at toy sizes.
`random_causal_lm` is the one constructor; the named factories below fix the shapes the tests
rely on (a tokenizer's vocabulary, a family's structural features, a real tokenizer's 49,152
ids), so the same call always gives the same bytes.

The real models (SmolLM2, the Wikipedia windows) are session fixtures in ``conftest.py``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

if TYPE_CHECKING:  # transformers is imported where a model is built: collection stays fast
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

# ----------------------------------------------------------------------------------- models


def random_causal_lm(model_type: str, *, seed: int = 0, **config: Any) -> PreTrainedModel:
    """A transformers causal LM of ``model_type`` with the given config fields, its weights
    drawn after ``torch.manual_seed(seed)``, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, **config)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def scaled(model: PreTrainedModel, factor: float = 3.0) -> PreTrainedModel:
    """``model`` with every parameter multiplied by ``factor`` (larger weights than the default
    init: non-trivial logits)."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(factor)
    return model


# The suite's small Llama (SmolLM2's structure: GQA 2:1, tied head) for PyTorch-side tests.
TINY_LLAMA: dict[str, Any] = dict(vocab_size=128, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  tie_word_embeddings=True)


def tiny_llama(tied: bool = True, **config: Any) -> PreTrainedModel:
    """`TINY_LLAMA` in memory (``tied``: head tied to the embedding)."""
    return random_causal_lm("llama", **{**TINY_LLAMA, "tie_word_embeddings": tied, **config})


def tiny_llama_dir(tmp_path: Path) -> Path:
    """A one-layer `TINY_LLAMA` with `tiny_tokenizer`, saved as ``tmp_path/tiny``."""
    model = tiny_llama(num_hidden_layers=1, architectures=["LlamaForCausalLM"])
    folder = tmp_path / "tiny"
    model.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def write_tiny_llama(folder: Path, layers: int = 2, hidden: int = 64) -> Path:
    """A random-weight Llama (256 ids) with a word-level tokenizer, saved as a normal HF folder."""
    vocab = {f"w{i}": i for i in range(255)} | {"<unk>": 255}
    tok = word_level_tokenizer(vocab, unk_token="<unk>", eos_token="<unk>")
    model = random_causal_lm("llama", vocab_size=256, hidden_size=hidden,
                             intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=128)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_tiny_qwen2(folder: Path) -> Path:
    """A random-weight Qwen2 (q/k/v biases, untied head) with `write_tiny_llama`'s tokenizer."""
    from transformers import AutoTokenizer

    llama = write_tiny_llama(folder.parent / f"{folder.name}-tokenizer", layers=1)
    model = random_causal_lm("qwen2", vocab_size=256, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=128, tie_word_embeddings=False)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(llama).save_pretrained(folder)
    shutil.rmtree(llama)
    return folder


# ------------------------------------------------------------ every family, real structure

# model_type -> (real model the shape is taken from, config overrides at toy size)
ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("SmolLM2-135M: GQA 3:1, tied head", dict(
        hidden_size=96, intermediate_size=256, num_attention_heads=6, num_key_value_heads=2,
        tie_word_embeddings=True, rope_theta=100000.0)),
    "qwen2": ("Qwen2.5-0.5B: q/k/v biases, untied head, GQA 7:1", dict(
        hidden_size=112, intermediate_size=320, num_attention_heads=7, num_key_value_heads=1,
        tie_word_embeddings=False, rope_theta=1000000.0)),
    "qwen3": ("Qwen3-0.6B: per-head q/k RMSNorm, head_dim 128 != hidden/heads, GQA 2:1, tied", dict(
        hidden_size=64, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2,
        head_dim=128, tie_word_embeddings=True, rope_theta=1000000.0)),
    "mistral": ("Mistral-7B-v0.1: GQA 4:1, sliding window on every layer, untied", dict(
        hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=1,
        head_dim=32, sliding_window=8, tie_word_embeddings=False, rope_theta=10000.0)),
    "gemma3_text": ("Gemma3-1B: head_dim 256, sliding layers with rope_local_base_freq, "
                    "sqrt(hidden) embedding scale, 4 norms a layer, q/k norms, BOS, tied", dict(
        hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1,
        head_dim=256, query_pre_attn_scalar=256, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], rope_theta=1000000.0,
        rope_local_base_freq=10000.0, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1,
        pad_token_id=0)),
    "phi3": ("Phi-3-mini-4k: fused qkv_proj and gate_up_proj, MHA, head_dim 96, untied", dict(
        hidden_size=192, intermediate_size=256, num_attention_heads=2, num_key_value_heads=2,
        tie_word_embeddings=False, rope_theta=10000.0, sliding_window=2047)),
}

# The decoder route's own four families (the shapes its greedy-token tests were chosen on).
FAMILIES: dict[str, dict[str, Any]] = {
    # SmolLM2's shape features: Llama, GQA 3:1, tied embeddings
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=96,
                  intermediate_size=256, num_attention_heads=6, num_key_value_heads=2,
                  tie_word_embeddings=True, rope_theta=100000.0),
    # Qwen2.5's: q/k/v biases, untied lm_head, rope theta 1e6
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=128,
                  intermediate_size=320, num_attention_heads=4, num_key_value_heads=2,
                  tie_word_embeddings=False, rope_theta=1000000.0),
    # Qwen3's: per-head q/k RMSNorm, explicit head_dim != hidden / heads
    "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=96,
                  intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, tie_word_embeddings=True, rope_theta=1000000.0),
    # Mistral's: GQA 4:1, untied head
    "mistral": dict(model_type="mistral", architectures=["MistralForCausalLM"], hidden_size=128,
                    intermediate_size=256, num_attention_heads=8, num_key_value_heads=2,
                    tie_word_embeddings=False, rope_theta=10000.0, sliding_window=None),
}

# What every family model shares: a 320-id vocabulary, two layers, BOS 1 / EOS 2.
_FAMILY_BASE: dict[str, Any] = dict(vocab_size=320, num_hidden_layers=2,
                                    max_position_embeddings=256, bos_token_id=1, eos_token_id=2)


def save_family_model(path: Path, model_type: str, *, seed: int = 0,
                      post_norms: tuple[float, float] | None = (4.0, 8.0),
                      **config: Any) -> PreTrainedModel:
    """Save a random-weight ``model_type`` model to ``path``; return the transformers model.

    Norm weights and biases are randomised too (they are ones/zeros at init, which would hide
    a norm or bias the graph drops), and weights are spread wide enough that greedy decoding
    does not collapse to one token. Norms named ``.post_...`` (Gemma's branch-output norms,
    Llama's post-attention norm) are drawn from ``post_norms`` so the layers, not Gemma's
    scaled embedding, pick the token; None draws them like every other norm.
    """
    model = random_causal_lm(model_type, seed=seed, **{**_FAMILY_BASE, **config})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if post_norms and ".post_" in name and name.endswith("norm.weight"):
                p.uniform_(*post_norms)
            elif name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(path)
    return model


def make_model_dir(path: Path, model_type: str, seed: int = 0,
                   **overrides: Any) -> PreTrainedModel:
    """`save_family_model` with the `ARCHS` shape of ``model_type`` (plus ``overrides``)."""
    config = {"pad_token_id": 0, "initializer_range": 0.2, **ARCHS[model_type][1], **overrides}
    return save_family_model(path, model_type, seed=seed, **config)


def make_family_dir(path: Path, family: str, seed: int = 0) -> PreTrainedModel:
    """`save_family_model` with the `FAMILIES` shape of ``family``."""
    spec = {"initializer_range": 0.1, **FAMILIES[family]}
    model_type = spec.pop("model_type")
    return save_family_model(path, model_type, seed=seed, post_norms=None, **spec)


# ------------------------------------------------------------ models on SmolLM2's tokenizer


def tokenizer_dir() -> Path:
    """The converted SmolLM2 folder (converted from the bundled GGUF on first use)."""
    from sinq_export.models import default_model_dir

    return default_model_dir()


# The tokenizer comes from the bundled model, converted on first use (never a silent skip).
needs_tokenizer = pytest.mark.usefixtures("smollm2_dir")


def tiny_float_model(seed: int = 0) -> PreTrainedModel:
    """A 2-layer random Llama with SmolLM2's vocabulary (49,152 ids), weights x3."""
    return scaled(random_causal_lm(
        "llama", seed=seed, vocab_size=49152, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, tie_word_embeddings=True, rms_norm_eps=1e-5))


def qwen2_source(folder: Path, tokenizer: Path) -> Path:
    """A tiny bf16 Qwen2 (q/k/v biases, tied, SmolLM2's vocabulary, weights x3) saved to
    ``folder`` with the tokenizer of the folder ``tokenizer``."""
    from transformers import AutoTokenizer

    model = scaled(random_causal_lm(
        "qwen2", vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, rms_norm_eps=1e-6))
    model.to(torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True).save_pretrained(folder)
    return folder


def build_tiny_export(out: Path, bits: int = 4, group_size: int = 16, method: str = "sinq",
                      with_reference: bool = False, col_scale: str = "mul",
                      shared_col_scale: bool = False) -> Path:
    """Source folder ``<out>-src`` (`tiny_float_model` + SmolLM2's tokenizer) and its export at
    ``out``, written by the real exporter, so `validate` rebuilds its reference from that source
    + the ONNX tensors, as it does for users."""
    from transformers import AutoTokenizer

    from sinq_export.config import GraphConfig, SinqConfig
    from sinq_export.export import export_causal_lm

    out = Path(out)
    src = out.with_name(out.name + "-src")
    shutil.rmtree(src, ignore_errors=True)
    tiny_float_model().save_pretrained(src)
    AutoTokenizer.from_pretrained(str(tokenizer_dir()), local_files_only=True).save_pretrained(src)
    config = SinqConfig(bits=bits, group_size=group_size, method=method,
                        shared_col_scale=shared_col_scale)
    export_causal_lm(src, out, config,
                     GraphConfig(col_scale=col_scale), overwrite=True, progress=False,
                     with_reference=with_reference)
    return out


_CACHE: dict[str, Path] = {}


def cached_tiny_export(tmp_path_factory: pytest.TempPathFactory, key: str = "sinq4",
                       **kwargs: Any) -> Path:
    """Build each tiny export once per test session (shared by test_validate / test_eval)."""
    if key not in _CACHE or not _CACHE[key].is_dir():
        _CACHE[key] = build_tiny_export(tmp_path_factory.mktemp("tiny") / key, **kwargs)
    return _CACHE[key]


def tiny_tokens(n: int = 48) -> np.ndarray:
    """``n`` ids of a fixed English sentence in SmolLM2's tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir()), local_files_only=True)
    text = ("Anarchism is a political philosophy and movement that is sceptical of authority and "
            "rejects all involuntary, coercive forms of hierarchy. Aristotle was an Ancient Greek "
            "philosopher and polymath. Apollo 11 was the American spaceflight that first landed "
            "humans on the Moon. ") * 3
    return np.asarray(tok.encode(text, add_special_tokens=False)[:n], dtype=np.int64)


# ------------------------------------------------------------------------------- tokenizers


def word_level_tokenizer(vocab: dict[str, int], **special: str) -> PreTrainedTokenizerFast:
    """A whitespace-split word-level tokenizer over ``vocab`` (``special``: unk/eos tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab, unk_token=special.get("unk_token", "<unk>")))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """128 ids: ``<unk>`` and the words ``w0`` .. ``w126`` (`TINY_LLAMA`'s vocabulary)."""
    return word_level_tokenizer({"<unk>": 0, **{f"w{i}": i + 1 for i in range(127)}},
                                unk_token="<unk>")


# ------------------------------------------------------------------------------------- GGUF


def write_gguf(path: Path, arch: str = "llama", tokenizer: bool = True) -> Path:
    """A small GGUF: one F32 and one Q8_0 tensor, tokenizer metadata unless told otherwise."""
    w = GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(["a", "b", "c", "d"])
        w.add_chat_template("{{ messages[0]['content'] }}")
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((4, 32), dtype=np.float32))
    q8 = quantize(rng.standard_normal((8, 64), dtype=np.float32), GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.ffn_down.weight", q8, raw_dtype=GGMLQuantizationType.Q8_0)
    return _finish(w, path)


def write_tiny_llama_gguf(path: Path, vocab: int = 64, d: int = 64, ff: int = 128, heads: int = 4,
                          kv: int = 2) -> Path:
    """A complete one-layer llama GGUF (hyper-parameters, a GPT-2 style BPE tokenizer, a chat
    template, Q4_0/Q4_1/Q8_0/F32 tensors, tied head) that transformers' loader converts."""
    w = GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(d)
    w.add_block_count(1)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(d // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    letters = [chr(ord("a") + i) for i in range(26)]
    tokens = ["<s>", "</s>", *letters, *(f"\u0120{c}" for c in letters), "ab", "\u0120"]
    tokens += [f"x{i}" for i in range(vocab - len(tokens))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3] + [1] * (vocab - 2))
    w.add_token_merges(["a b", "\u0120 a"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_chat_template("{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}")
    rng = np.random.default_rng(0)
    q = GGMLQuantizationType
    hd = d // heads
    for name, shape, qtype in [
        ("token_embd.weight", (vocab, d), q.Q8_0), ("output_norm.weight", (d,), None),
        ("blk.0.attn_norm.weight", (d,), None), ("blk.0.ffn_norm.weight", (d,), None),
        ("blk.0.attn_q.weight", (d, d), q.Q4_0), ("blk.0.attn_k.weight", (kv * hd, d), q.Q4_0),
        ("blk.0.attn_v.weight", (kv * hd, d), q.Q4_0), ("blk.0.attn_output.weight", (d, d), q.Q4_0),
        ("blk.0.ffn_gate.weight", (ff, d), q.Q4_1), ("blk.0.ffn_up.weight", (ff, d), q.Q4_1),
        ("blk.0.ffn_down.weight", (d, ff), q.Q8_0),
    ]:
        a = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if qtype is None:
            w.add_tensor(name, a)
        else:
            w.add_tensor(name, quantize(a, qtype), raw_dtype=qtype)
    return _finish(w, path)


def write_tiny_gemma3_gguf(path: Path, vocab: int = 64, d: int = 64, ff: int = 128, heads: int = 2,
                           kv: int = 1, head_dim: int = 32, layers: int = 2) -> Path:
    """A complete gemma3 GGUF as llama.cpp writes one: head_dim from ``key_length``, a sliding
    window, q/k norms and the branch-output norms (norm weights stored as ``1 + w``), a
    sentencepiece vocabulary with scores, Q5_0/Q8_0/Q4_K/F32 tensors, tied head."""
    w = GGUFWriter(str(path), "gemma3")
    w.add_context_length(1024)
    w.add_embedding_length(d)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e6)
    w.add_sliding_window(8)
    letters = [chr(ord("a") + i) for i in range(26)]
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "\u2581", *letters, *(f"\u2581{c}" for c in letters)]
    tokens += [f"<unused{i}>" for i in range(vocab - len(tokens))]
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 4 + [-float(i) for i in range(vocab - 4)])
    w.add_token_types([3, 3, 3, 2] + [1] * (vocab - 4))
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    rng = np.random.default_rng(0)
    q = GGMLQuantizationType
    tensors = [("token_embd.weight", (vocab, d), q.Q8_0), ("output_norm.weight", (d,), None)]
    for i in range(layers):
        b = f"blk.{i}."
        tensors += [
            (b + "attn_norm.weight", (d,), None), (b + "ffn_norm.weight", (d,), None),
            (b + "post_attention_norm.weight", (d,), None), (b + "post_ffw_norm.weight", (d,), None),
            (b + "attn_q_norm.weight", (head_dim,), None), (b + "attn_k_norm.weight", (head_dim,), None),
            (b + "attn_q.weight", (heads * head_dim, d), q.Q5_0),
            (b + "attn_k.weight", (kv * head_dim, d), q.Q5_0),
            (b + "attn_v.weight", (kv * head_dim, d), q.Q8_0),
            (b + "attn_output.weight", (d, heads * head_dim), q.Q8_0),
            (b + "ffn_gate.weight", (ff, d), q.Q5_0), (b + "ffn_up.weight", (ff, d), q.Q5_0),
            (b + "ffn_down.weight", (d, ff), q.Q8_0),
        ]
    for name, shape, qtype in tensors:
        if qtype is None:  # llama.cpp stores Gemma's x * (1 + w) norm weights as 1 + w
            w.add_tensor(name, (1.0 + rng.uniform(-0.5, 0.5, shape)).astype(np.float32))
        else:
            a = (rng.standard_normal(shape) * 0.1).astype(np.float32)
            w.add_tensor(name, quantize(a, qtype), raw_dtype=qtype)
    return _finish(w, path)


def _finish(w: GGUFWriter, path: Path) -> Path:
    """Write the GGUF's header, metadata and tensors, in gguf's required order."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
