"""The tokens calibration runs the model on: windows of a text (disjoint from the evaluation
windows) for calibrated SINQ and the bit allocation, random ids for the energy probe; and how
many windows fit in memory."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from ..config import ConfigError
from ..data import leading_token_ids, load_text

if TYPE_CHECKING:  # typing only: transformers is slow to import
    from transformers import PreTrainedTokenizerBase

# Calibration windows start here: far past every evaluation window (the protocol scores the
# first n x 512 tokens; 64 windows would end at token 32768), so the two never overlap.
CALIBRATION_OFFSET = 65536


# Default window count (`default_window_count`): at least MIN_WINDOWS, and enough tokens for
# TOKENS_PER_INPUT x the widest calibrated linear's K, rounded up to a power of two windows.
MIN_WINDOWS, MAX_WINDOWS, TOKENS_PER_INPUT = 8, 64, 1.5
# Tokens of text a head calibrated alone gets, whatever its K (docs/presets.md: 2048 tokens
# matched 4096 on SmolLM2 -0.03 and Qwen2.5-0.5B -0.07 perplexity, Gemma3-270m +0.18 of 79;
# 1024 lost 0.36-0.38 on two of the three), at half the forward of 4096.
HEAD_TOKENS = 2048


def default_window_count(max_k: int, length: int = 512, head_only: bool = False) -> int:
    """Calibration windows for linears of up to ``max_k`` inputs (``head_only``: the output
    projection is the only linear calibrated).

    Why it grows with K: GPTQ inverts the ``K x K`` input Hessian, which fewer than K tokens
    leave rank deficient, so GPTQ then fits the calibration text. Measured on Qwen2.5-0.5B
    (down_proj K = 4864): 8 windows (4096 tokens) 39.55, 16 windows 38.99, calibration-free
    39.27; SmolLM2 (K <= 1536) is covered by the 8-window minimum. A head alone does not
    follow that rule: `HEAD_TOKENS` measured as well as twice as many on the three real
    models (heads of K = 576, 640, 896), and the forward that makes its input is the biggest
    cost of a big model's export.
    """
    if head_only:
        return max(1, math.ceil(HEAD_TOKENS / length))
    need = math.ceil(TOKENS_PER_INPUT * max_k / length)
    return min(MAX_WINDOWS, max(MIN_WINDOWS, 1 << max(0, (need - 1).bit_length())))


# Copies of the [windows, length, hidden] float32 hidden states a calibration holds at once:
# a block's input and output, their concatenation from chunks, and the head's normed input.
HIDDEN_COPIES = 4


def calibration_bytes(n_windows: int, length: int, hidden: int) -> int:
    """Bytes of hidden states a calibration on ``n_windows`` x ``length`` tokens holds
    (everything else it holds is bounded by one block or one chunk)."""
    return HIDDEN_COPIES * n_windows * length * hidden * 4


def available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def calibration_windows(tokenizer: PreTrainedTokenizerBase, n_windows: int = 16, length: int = 512,
                        text: str = "wikipedia", offset: int = CALIBRATION_OFFSET
                        ) -> tuple[torch.Tensor, dict[str, Any]]:
    """``[n_windows, length]`` calibration tokens and the manifest record that describes them."""
    stop = offset + n_windows * length
    ids = leading_token_ids(tokenizer, load_text(text), stop)
    if len(ids) < stop:
        fits = max(0, len(ids) - offset) // length
        raise ConfigError(f"calibration: the model's tokenizer makes {len(ids)} tokens of the "
                          f"{text!r} text, the calibration needs {stop} ({offset} skipped, then "
                          f"{n_windows} windows x {length})"
                          + (f"; at most --calibration-windows {fits} fit" if fits else ""))
    win = torch.tensor(ids[offset:stop], dtype=torch.long).reshape(n_windows, length)
    info = {"text": text, "token_range": [offset, stop], "n_windows": n_windows,
            "length": length, "tokens": n_windows * length,
            "disjoint_from": "evaluation windows (the first n x length tokens, n <= 64)"}
    return win, info


PROBE_SEED = 0


def probe_window(vocab_size: int, n_tokens: int, seed: int = PROBE_SEED
                 ) -> tuple[torch.Tensor, dict[str, Any]]:
    """``[1, n_tokens]`` uniformly random token ids, and the manifest record that says so.

    Why random ids are enough for the calibration-free scale refit: it only needs each
    linear's input energies ``E[x^2]``, and which channels are loud is a property of the model
    (its norms, its massive activations), not of the text. Measured on SmolLM2: energies from
    256 random ids and from 256 Wikipedia tokens give 4-bit 26.2-26.5 vs 25.8, 3-bit 42.6-43.1
    vs 41.2 (docs/quality.md). A fixed seed keeps exports reproducible.
    """
    ids = torch.randint(0, vocab_size, (1, n_tokens), generator=torch.Generator().manual_seed(seed))
    return ids, {"tokens": n_tokens, "seed": seed, "ids": "uniform random token ids (no text)",
                 "use": "input energies of the scale refit (SinqConfig.energy_refit)"}
