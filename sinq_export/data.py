"""Real text for perplexity, and the perplexity protocol itself.

No dataset hub is reachable, so the evaluation text is a MediaWiki XML dump of English
Wikipedia that ships inside the ``gensim==4.4.0`` wheel:
``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``.

Cleaning (`clean_wikipedia_dump`, version `WIKIPEDIA_CLEANING_VERSION`), exactly:

1. Stream the XML; keep ``<page>`` elements whose ``<ns>`` is ``0`` (articles) and that have
   no ``<redirect>`` child. Take the text of the page's ``<revision><text>``.
2. Strip markup with ``gensim.corpora.wikicorpus.filter_wiki`` (default arguments).
3. Split into lines; in each line delete bold/italic quote runs (``''``, ``'''``, which
   filter_wiki leaves in place), then strip whitespace; drop table lines (starting with
   ``{|``, ``|`` or ``!``), heading lines (starting with ``=``) and lines shorter than
   `MIN_LINE_CHARS` characters (empty lines, captions, leftovers of templates).
4. Join an article's kept lines (paragraphs) with one blank line (``"\\n\\n"``); drop
   articles left empty; join the articles, in dump order, with one blank line too.

Result: 106 articles (Anarchism, Aristotle, Albania, ..., Apollo 11, ...), ~2.9 M
characters. The cleaned text is cached in `cache_dir()` under a file name that carries the
cleaning version, so changing the recipe never reuses a stale cache.

Perplexity protocol (`token_windows` + `perplexity`): tokenize the whole text (ids identical to
tokenizing a long enough prefix, which is what `leading_token_ids` does) with
``add_special_tokens=False``; take the first ``n_windows`` windows of ``length`` tokens with
``stride`` (default ``length``: non-overlapping); each window is scored independently,
predicting tokens ``1..length-1`` from their prefix inside the window; perplexity is
``exp`` of the mean NLL over all predicted tokens of all windows. SmolLM2-135M-Instruct in
float32 scores ~22.7 on 4 x 512 windows.
"""

from __future__ import annotations

import bz2
import importlib.util
import math
import os
import re
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from .folders import Tokenizer, cache_dir

WIKIPEDIA_DUMP = (
    "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
)
WIKIPEDIA_CLEANING_VERSION = "1"
MIN_LINE_CHARS = 30
CHARS_PER_TOKEN = 6  # a first guess at the prefix to tokenize (English text: ~4.4)
PREFIX_MARGIN = 256  # tokens tokenized past the last one used
_QUOTE_MARKUP = re.compile(r"'{2,}")
_TABLE_OR_HEADING = ("{|", "|", "!", "=")


# --------------------------------------------------------------------------- wikipedia


def _gensim_dump_path() -> Path:
    """Locate the dump inside the installed gensim wheel without importing gensim (slow)."""
    spec = importlib.util.find_spec("gensim")
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise FileNotFoundError(
            "the Wikipedia text ships inside gensim; install it with: pip install gensim==4.4.0"
        )
    path = Path(locations[0]) / WIKIPEDIA_DUMP
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed gensim package")
    return path


def _iter_articles(dump: Path) -> Iterator[str]:
    """Yield the raw wikitext of namespace-0, non-redirect pages, in dump order."""
    with bz2.open(dump, "rb") as fh:
        for _, elem in ET.iterparse(fh, events=("end",)):
            if not elem.tag.endswith("}page"):
                continue
            ns = elem.findtext("{*}ns")
            is_redirect = elem.find("{*}redirect") is not None
            text = elem.findtext("{*}revision/{*}text") or ""
            elem.clear()  # keep memory flat while streaming
            if ns == "0" and not is_redirect:
                yield text


def _clean_article(wikitext: str, filter_wiki: Callable[[str], str]) -> str:
    """Markup-free article: filter_wiki, then drop table/heading/short lines (see module doc)."""
    kept = []
    for line in filter_wiki(wikitext).splitlines():
        line = _QUOTE_MARKUP.sub("", line).strip()
        if len(line) < MIN_LINE_CHARS or line.startswith(_TABLE_OR_HEADING):
            continue
        kept.append(line)
    return "\n\n".join(kept)


def clean_wikipedia_dump(dump: Path) -> str:
    """Clean the whole dump into plain text (articles separated by a blank line)."""
    from gensim.corpora.wikicorpus import filter_wiki

    articles = (_clean_article(raw, filter_wiki) for raw in _iter_articles(dump))
    return "\n\n".join(a for a in articles if a)


def _write_atomically(path: Path, text: str) -> None:
    """Write to a temp file in the same folder, then rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def wikipedia_text() -> str:
    """Cleaned English Wikipedia text (~106 articles, ~2.9 M chars), cached after first use."""
    cached = cache_dir() / f"wikipedia-gensim440-v{WIKIPEDIA_CLEANING_VERSION}.txt"
    if cached.is_file():
        return cached.read_text(encoding="utf-8")
    text = clean_wikipedia_dump(_gensim_dump_path())
    _write_atomically(cached, text)
    return text


TEXT_IDS: dict[str, Callable[[], str]] = {"wikipedia": wikipedia_text}


def load_text(text_id: str) -> str:
    """Evaluation text by id (what ``--text`` names); unknown ids list the valid ones."""
    try:
        loader = TEXT_IDS[text_id]
    except KeyError:
        valid = ", ".join(sorted(TEXT_IDS))
        raise ValueError(f"unknown text id {text_id!r}; valid ids: {valid}") from None
    return loader()


# --------------------------------------------------------------------------- perplexity


def leading_token_ids(tokenizer: Tokenizer, text: str, n: int) -> list[int]:
    """The first ``n`` ids of ``tokenizer(text, add_special_tokens=False)`` (fewer if the text
    has fewer), tokenizing only a prefix of the text.

    Why: the windows sit in the first few hundred thousand tokens of a 2.9 M-character text,
    and tokenizing all of it costs seconds per export. The prefix ends at a paragraph break
    ``PREFIX_MARGIN`` tokens past ``n``: tokenizers split text into pieces at whitespace
    before merging, so ids that far from the cut are those of the whole text (tested against
    full tokenizations).
    """
    chars = CHARS_PER_TOKEN * (n + PREFIX_MARGIN)
    while True:
        cut = text.find("\n\n", chars)
        prefix = text if cut < 0 else text[:cut]
        ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        if cut < 0 or len(ids) >= n + PREFIX_MARGIN:
            return ids[:n]
        chars *= 2


def token_windows(
    tokenizer: Tokenizer, text: str, n_windows: int = 4, length: int = 512, stride: int | None = None
) -> torch.Tensor:
    """First ``n_windows`` token windows ``[n_windows, length]`` of ``text`` (int64).

    No special tokens are added, so every window is plain running text; the stride defaults
    to ``length`` (non-overlapping windows), the protocol behind every reported perplexity.
    """
    stride = length if stride is None else stride
    if n_windows < 1 or length < 2 or stride < 1:
        raise ValueError(
            f"need n_windows >= 1, length >= 2, stride >= 1; got {n_windows}, {length}, {stride}"
        )
    needed = (n_windows - 1) * stride + length
    ids = leading_token_ids(tokenizer, text, needed)
    if len(ids) < needed:
        raise ValueError(
            f"text has {len(ids)} tokens; {n_windows} windows of {length} "
            f"(stride {stride}) need {needed}"
        )
    ids = torch.tensor(ids[:needed], dtype=torch.long)
    return torch.stack([ids[i * stride : i * stride + length] for i in range(n_windows)])


def summed_nll(logits: torch.Tensor | np.ndarray, tokens: torch.Tensor | np.ndarray) -> float:
    """The one next-token NLL: summed over every prediction, in float64.

    ``logits`` ``[..., L, V]`` and ``tokens`` ``[..., L]``: token ``j`` is predicted by the
    logits at ``j - 1``, for ``j = 1..L-1`` (the last position predicts nothing). Every
    perplexity (PyTorch or onnxruntime, `eval` or `validate`) is ``exp`` of this sum over the
    number of predictions, so the numbers of two backends differ only by their logits.
    """
    logits = torch.as_tensor(logits)
    tokens = torch.as_tensor(tokens)
    if tokens.shape[-1] < 2 or tuple(logits.shape[:-1]) != tuple(tokens.shape):
        raise ValueError(f"logits {tuple(logits.shape)} do not score tokens {tuple(tokens.shape)}")
    predicted = logits[..., :-1, :]
    return torch.nn.functional.cross_entropy(
        predicted.reshape(-1, logits.shape[-1]).double(), tokens[..., 1:].reshape(-1).long(),
        reduction="sum").item()


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 1) -> float:
    """``exp`` of the mean next-token NLL over all windows (each scored on its own).

    Token ``j`` of a window is predicted from tokens ``0..j-1`` of the same window, for
    ``j = 1..L-1``; NLLs are summed in float64 (`summed_nll`).
    """
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [n, L] with L >= 2, got {tuple(windows.shape)}")
    device = next(model.parameters()).device
    total_nll = 0.0
    n_tokens = 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device)
        total_nll += summed_nll(model(input_ids=batch, use_cache=False).logits, batch)
        n_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / n_tokens)
