"""Wikipedia text cleaning, token windows and the perplexity protocol."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from sinq_export import data

needs_gensim = pytest.mark.skipif(
    importlib.util.find_spec("gensim") is None, reason="gensim==4.4.0 not installed"
)


class CharTokenizer:
    """Minimal tokenizer stand-in: one id per character, no special tokens."""

    def __call__(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return {"input_ids": [ord(c) % 97 for c in text]}


def test_token_windows_shape_and_content():
    text = "".join(chr(65 + i % 26) for i in range(100))
    win = data.token_windows(CharTokenizer(), text, n_windows=3, length=10)
    assert win.shape == (3, 10) and win.dtype == torch.long
    ids = CharTokenizer()(text, add_special_tokens=False)["input_ids"]
    assert win[1].tolist() == ids[10:20]  # non-overlapping by default


def test_token_windows_stride():
    text = "abcdefghijklmnopqrstuvwxyz"
    win = data.token_windows(CharTokenizer(), text, n_windows=3, length=4, stride=2)
    ids = CharTokenizer()(text, add_special_tokens=False)["input_ids"]
    assert win[2].tolist() == ids[4:8]


def test_token_windows_too_short_text():
    with pytest.raises(ValueError, match="need 20"):
        data.token_windows(CharTokenizer(), "short", n_windows=2, length=10)


def test_load_text_unknown_id_lists_valid_ids():
    with pytest.raises(ValueError, match="wikipedia"):
        data.load_text("wikitext-103")


class Uniform(torch.nn.Module):
    """A 'model' whose logits are all zero: perplexity equals the vocabulary size."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=False):
        class Out:
            logits = torch.zeros(*input_ids.shape, self.vocab)

        return Out()


def test_perplexity_uniform_model_equals_vocab_size():
    windows = torch.randint(0, 50, (3, 16))
    for batch_size in (1, 2, 3):
        assert data.perplexity(Uniform(50), windows, batch_size) == pytest.approx(50.0)


@needs_gensim
def test_wikipedia_cleaning(tmp_path, monkeypatch):
    monkeypatch.setenv("SINQ_EXPORT_CACHE", str(tmp_path))
    text = data.wikipedia_text()
    assert len(text) > 2_500_000
    assert text.startswith("Anarchism is a political philosophy")
    assert "'''" not in text and "{|" not in text
    assert not any(line.startswith("=") for line in text.splitlines())
    cached = list(tmp_path.glob("wikipedia-*.txt"))
    assert len(cached) == 1 and cached[0].read_text(encoding="utf-8") == text
    assert data.wikipedia_text() == text  # served from the cache


@needs_gensim
def test_wikipedia_article_count():
    from gensim.corpora.wikicorpus import filter_wiki

    dump = data._gensim_dump_path()
    cleaned = [data._clean_article(raw, filter_wiki) for raw in data._iter_articles(dump)]
    assert sum(1 for a in cleaned if a) > 100


@pytest.mark.slow
def test_smollm2_float_perplexity(smollm2, wiki_windows):
    model, _ = smollm2
    assert wiki_windows.shape == (4, 512)
    ppl = data.perplexity(model, wiki_windows)
    assert abs(ppl - 22.68) < 0.3, ppl


def test_leading_token_ids_grows_the_prefix_until_it_holds_enough():
    text = "\n\n".join("x" * 40 for _ in range(50))  # 2,098 characters, a break every 42
    ids = CharTokenizer()(text, add_special_tokens=False)["input_ids"]
    for n in (1, 300, 1700, 5000):  # 1700 needs more than the first 6 chars per token guess
        assert data.leading_token_ids(CharTokenizer(), text, n) == ids[:n]


@needs_gensim
@pytest.mark.slow
def test_leading_token_ids_equal_the_whole_texts_tokens(smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    text = data.load_text("wikipedia")
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    for n in (512, 4 * 512, 65_536 + 8 * 512, 65_536 + 64 * 512):  # evaluation, calibration
        assert data.leading_token_ids(tokenizer, text, n) == whole[:n]
