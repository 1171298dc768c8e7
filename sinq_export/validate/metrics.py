"""Parity metrics on logits and layer outputs (NumPy; perplexity through the one NLL)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..data import summed_nll

# ------------------------------------------------------------------------------ metrics


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def layer_error(ref: np.ndarray, test: np.ndarray, cosine: bool = True) -> dict[str, float]:
    """Error of ``test`` against ``ref`` (same shape): rel = max abs / max |ref|, cosine."""
    ref = np.asarray(ref).reshape(-1)
    test = np.asarray(test).reshape(-1)
    if ref.shape != test.shape:
        raise ValueError(f"shape mismatch: {ref.shape} vs {test.shape}")
    if not np.isfinite(test).all():
        return {"rel": math.inf, "max_abs": math.inf, "cosine": math.nan}
    diff = np.abs(test.astype(np.float64) - ref.astype(np.float64))
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    out = {"rel": max_abs / max(scale, 1e-30), "max_abs": max_abs, "cosine": math.nan}
    if cosine:
        r, t = ref.astype(np.float64), test.astype(np.float64)
        denom = float(np.sqrt((r @ r) * (t @ t)))
        out["cosine"] = float(r @ t / denom) if denom > 0 else (1.0 if max_abs == 0 else 0.0)
    return out


@dataclass
class EndToEnd:
    """End-to-end comparison of two logits sequences ``[T, V]`` (T = prefill + decode)."""

    n_tokens: int
    n_prefill: int
    n_decode: int
    max_abs: float | None = None
    mean_abs: float | None = None
    rel: float | None = None
    cosine_min: float | None = None
    cosine_mean: float | None = None
    top1: float | None = None
    top1_prefill: float | None = None
    top1_decode: float | None = None
    kl_mean: float | None = None
    kl_max: float | None = None
    ppl_torch: float | None = None
    ppl_ort: float | None = None
    ppl_delta_rel: float | None = None


def perplexity_from_logits(logits: np.ndarray, tokens: np.ndarray) -> float:
    """exp(mean NLL) of ``tokens[1:]`` given ``logits[:-1]`` (one sequence, ``[T, V]``)."""
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if len(tokens) < 2:
        return math.nan
    return math.exp(summed_nll(np.asarray(logits)[: len(tokens)], tokens) / (len(tokens) - 1))


def compare_logits(
    ref: np.ndarray, test: np.ndarray, prefill_tokens: np.ndarray | None = None, n_prefill: int = 0
) -> EndToEnd:
    """All end-to-end metrics of ``test`` (onnxruntime) against ``ref`` (torch), ``[T, V]``.

    KL is KL(ref || test) per token, in nats. Perplexity is over the first ``n_prefill``
    positions predicting ``prefill_tokens[1:]``.
    """
    ref = np.asarray(ref, dtype=np.float64)
    test = np.asarray(test, dtype=np.float64)
    if ref.shape != test.shape:
        raise ValueError(f"logits shape mismatch: torch {ref.shape} vs onnxruntime {test.shape}")
    t = ref.shape[0]
    out = EndToEnd(n_tokens=t, n_prefill=n_prefill, n_decode=t - n_prefill)
    diff = np.abs(test - ref)
    out.max_abs, out.mean_abs = float(diff.max()), float(diff.mean())
    out.rel = out.max_abs / max(float(ref.max() - ref.min()), 1e-30)
    if not np.isfinite(test).all():
        out.max_abs = out.mean_abs = out.rel = math.inf
    norms = np.linalg.norm(ref, axis=-1) * np.linalg.norm(test, axis=-1)
    cos = (ref * test).sum(-1) / np.maximum(norms, 1e-30)
    out.cosine_min, out.cosine_mean = float(np.nanmin(cos)), float(np.nanmean(cos))
    agree = ref.argmax(-1) == test.argmax(-1)
    out.top1 = float(agree.mean())
    if n_prefill:
        out.top1_prefill = float(agree[:n_prefill].mean())
    if t > n_prefill:
        out.top1_decode = float(agree[n_prefill:].mean())
    lp, lq = _log_softmax(ref), _log_softmax(test)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    out.kl_mean, out.kl_max = float(kl.mean()), float(kl.max())
    if prefill_tokens is not None and n_prefill >= 2:
        out.ppl_torch = perplexity_from_logits(ref[:n_prefill], prefill_tokens)
        out.ppl_ort = perplexity_from_logits(test[:n_prefill], prefill_tokens)
        out.ppl_delta_rel = abs(out.ppl_ort - out.ppl_torch) / out.ppl_torch
    return out



def compare_outputs(ref: np.ndarray, test: np.ndarray) -> EndToEnd:
    """End-to-end metrics of a plain module's first output (no tokens: no top-1 / KL / ppl)."""
    ref = np.asarray(ref, dtype=np.float64).reshape(-1, ref.shape[-1])
    test = np.asarray(test, dtype=np.float64).reshape(-1, test.shape[-1])
    out = EndToEnd(n_tokens=ref.shape[0], n_prefill=ref.shape[0], n_decode=0)
    diff = np.abs(test - ref)
    out.max_abs, out.mean_abs = float(diff.max()), float(diff.mean())
    out.rel = out.max_abs / max(float(ref.max() - ref.min()), 1e-30)
    if not np.isfinite(test).all():
        out.max_abs = out.mean_abs = out.rel = math.inf
    cos = (ref * test).sum(-1) / np.maximum(np.linalg.norm(ref, axis=-1) * np.linalg.norm(test, axis=-1),
                                            1e-30)
    out.cosine_min, out.cosine_mean = float(cos.min()), float(cos.mean())
    return out
