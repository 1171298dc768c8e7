"""Perplexity on real text, in PyTorch and in onnxruntime, for float / RTN / SINQ models.

Protocol (every number this module reports follows it, so any two are comparable):

* text: ``sinq_export.data.load_text(text)`` - ``"wikipedia"`` is the cleaned English
  Wikipedia sample shipped in gensim's wheel (namespace-0, non-redirect pages, markup stripped
  with ``filter_wiki``, table/heading/short lines dropped);
* tokens: ``data.token_windows(tokenizer, text, n_windows, length)`` - the text is tokenized
  once with ``add_special_tokens=False`` and cut into the first ``n_windows``
  non-overlapping windows of ``length`` tokens (stride = length; default 4 x 512);
* each window is scored on its own, from an empty context (no BOS, no carry-over, onnxruntime:
  empty past): the NLL of tokens 2..L given their prefix, i.e. L - 1 predictions per window;
* perplexity = exp(total NLL / total predictions) over all windows (windows have equal
  length, so this is also the exp of the mean per-window loss).

`compare` quantizes the float model on the fly with `quantize_model` (each method / bits on a
fresh copy), so one call gives float, RTN and SINQ at any widths, and the ratio
(SINQ - float) / (RTN - float) per width (lower is better; 1 = no gain over RTN).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .config import SinqConfig, check_bits
from .contract import REFERENCE_DIR
from .data import load_text, summed_nll, token_windows
from .models import default_model_dir, load_causal_lm, read_config
from .nn import quantize_model
from .validate import PROVIDERS, ValidationError, _session, available_providers, read_export, run_ort_lm
from .validate.core import _run_ort, check_export_runs, context_length, reference_model
from .validate.runners import OrtSession
from .validate.snapshot import while_unchanged

PROTOCOL_DOC = ("first {n_windows} non-overlapping {length}-token windows (stride {length}) of the "
                "cleaned '{text}' text, add_special_tokens=False, each window scored from an "
                "empty context ({length}-1 predictions), ppl = exp(mean NLL)")


@dataclass
class PplResult:
    label: str  # e.g. "float", "rtn", "sinq"
    bits: int | None
    group_size: int | None
    backend: str  # "torch" | "onnxruntime"
    ppl: float
    mean_nll: float
    n_predictions: int
    seconds: float
    quantize_seconds: float | None = None
    source: str = ""


@dataclass
class PplTable:
    rows: list[PplResult] = field(default_factory=list)
    protocol: dict[str, Any] = field(default_factory=dict)

    def get(self, label: str, bits: int | None = None, backend: str | None = None) -> PplResult | None:
        for r in self.rows:
            if r.label == label and (bits is None or r.bits == bits) and \
                    (backend is None or r.backend == backend):
                return r
        return None

    def ratio(self, bits: int, backend: str = "torch") -> float | None:
        """(SINQ - float) / (RTN - float) at ``bits``; None when a row is missing."""
        f = self.get("float", backend=backend) or self.get("float")
        s, r = self.get("sinq", bits, backend), self.get("rtn", bits, backend)
        if f is None or s is None or r is None or r.ppl == f.ppl:
            return None
        return (s.ppl - f.ppl) / (r.ppl - f.ppl)

    def to_dict(self) -> dict[str, Any]:
        bits = sorted({r.bits for r in self.rows if r.bits is not None})
        ratios = {str(b): self.ratio(b) for b in bits}
        return {"protocol": self.protocol, "rows": [asdict(r) for r in self.rows],
                "ratio_sinq_vs_rtn": {b: v for b, v in ratios.items() if v is not None}}

    def to_markdown(self) -> str:
        lines = ["| model | bits | group | backend | perplexity | (SINQ-float)/(RTN-float) |",
                 "|---|---|---|---|---|---|"]
        for r in self.rows:
            ratio = self.ratio(r.bits, r.backend) if r.label == "sinq" and r.bits else None
            lines.append(
                f"| {r.label} | {r.bits or '-'} | {r.group_size or '-'} | {r.backend} | "
                f"{r.ppl:.2f} | {'' if ratio is None else f'{ratio:.3f}'} |")
        p = self.protocol
        if p:
            lines.append("")
            lines.append(f"Protocol: {p.get('description', '')}.")
        return "\n".join(lines)


# ------------------------------------------------------------------------------ tokens


def text_windows(tokenizer: PreTrainedTokenizerBase, text: str = "wikipedia", n_windows: int = 4,
                 length: int = 512) -> np.ndarray:
    """``[n_windows, length]`` int64 token windows of the real text (see module docstring)."""
    if n_windows < 1 or length < 2:
        raise ValueError(f"need n_windows >= 1 and length >= 2 (got {n_windows}, {length})")
    windows = token_windows(tokenizer, load_text(text), n_windows=n_windows, length=length)
    arr = np.stack([np.asarray(w.tolist() if hasattr(w, "tolist") else w, dtype=np.int64).reshape(-1)
                    for w in windows])
    if arr.shape != (n_windows, length):
        raise ValueError(f"text {text!r} gave windows of shape {arr.shape}, "
                         f"expected {(n_windows, length)} (text too short?)")
    return arr


def protocol(text: str, n_windows: int, length: int) -> dict[str, Any]:
    return {"text": text, "n_windows": n_windows, "length": length, "stride": length,
            "add_special_tokens": False,
            "description": PROTOCOL_DOC.format(text=text, n_windows=n_windows, length=length)}


# ------------------------------------------------------------------------------ perplexity


def torch_nll(model: torch.nn.Module, windows: np.ndarray) -> tuple[float, int]:
    """(total NLL, number of predictions) of a torch causal LM over the windows."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for w in windows:
            ids = torch.as_tensor(np.asarray(w, dtype=np.int64))[None, :]
            total += summed_nll(model(input_ids=ids, use_cache=False).logits[0], ids[0])
            count += ids.shape[1] - 1
    return total, count


def ort_session(out_dir: str | Path, provider: str = "cpu") -> ort.InferenceSession:
    """An onnxruntime session of an export folder's model (custom ops registered if used)."""
    info = read_export(out_dir)
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; valid: {', '.join(PROVIDERS)}")
    if provider not in available_providers():
        raise ValueError(f"{PROVIDERS[provider]} is not available in this onnxruntime build")
    check_export_runs(info)
    try:
        return _session(info.onnx_path, info, provider)
    except ValidationError:
        raise
    except Exception as exc:  # onnxruntime refuses the graph: the folder is damaged
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValidationError(f"{info.onnx_path}: onnxruntime cannot load it: {first}") from exc


def ort_nll(session: OrtSession, windows: np.ndarray) -> tuple[float, int]:
    """(total NLL, predictions) of an ONNX causal LM; each full window with an empty past."""
    total, count = 0.0, 0
    for w in windows:
        w = np.asarray(w, dtype=np.int64)
        run = run_ort_lm(session, w, [])
        total += summed_nll(run.logits, w)
        count += len(w) - 1
    return total, count


def _result(label: str, bits: int | None, group_size: int | None, backend: str,
            nll_count: tuple[float, int], seconds: float, **kw: Any) -> PplResult:
    total, count = nll_count
    mean = total / count
    return PplResult(label=label, bits=bits, group_size=group_size, backend=backend,
                     ppl=math.exp(mean), mean_nll=mean, n_predictions=count, seconds=seconds, **kw)


def perplexity_torch(model: torch.nn.Module, windows: np.ndarray, label: str = "model",
                     bits: int | None = None, group_size: int | None = None, **kw: Any) -> PplResult:
    start = time.perf_counter()
    nc = torch_nll(model, windows)
    return _result(label, bits, group_size, "torch", nc, time.perf_counter() - start, **kw)


def perplexity_onnx(out_dir: str | Path, windows: np.ndarray, provider: str = "cpu",
                    label: str | None = None) -> PplResult:
    """Perplexity of ``OUT_DIR/model.onnx`` in onnxruntime (label/bits from sinq_export.json)."""
    info = read_export(out_dir)
    cfg = info.meta.get("config", {})
    sess = ort_session(out_dir, provider)
    start = time.perf_counter()
    nc = _run_ort(ort_nll, sess, windows)
    return _result(label or cfg.get("method", "onnx"), cfg.get("bits"), cfg.get("group_size"),
                   "onnxruntime" if provider == "cpu" else f"onnxruntime-{provider}", nc,
                   time.perf_counter() - start, source=str(out_dir))


# ------------------------------------------------------------------------------ compare


def parse_methods(spec: str | Sequence[str]) -> list[str]:
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = [m.strip().lower() for m in items if m.strip()]
    bad = [m for m in out if m not in ("float", "rtn", "sinq")]
    if bad or not out:
        raise ValueError(f"--compare: unknown method(s) {bad}; choose from float, rtn, sinq")
    return list(dict.fromkeys(out))


def parse_bits(spec: str | Sequence[int]) -> list[int]:
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    try:
        out = [int(str(b).strip()) for b in items if str(b).strip()]
    except ValueError as exc:
        raise ValueError(f"--bits: expected comma-separated integers, got {spec!r}") from exc
    for b in out:
        check_bits(b)
    return list(dict.fromkeys(out))


def model_context(config: dict[str, Any]) -> int | None:
    """``max_position_embeddings`` of a HF config (or of its ``text_config``), None if absent."""
    for section in (config, config.get("text_config") or {}):
        value = section.get("max_position_embeddings") if isinstance(section, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_length(config: dict[str, Any], length: int) -> None:
    """Refuse windows longer than the model's context (ValueError, one line)."""
    context = model_context(config)
    if context is not None and length > context:
        raise ValueError(f"--length {length} exceeds the model's context of {context} tokens "
                         "(max_position_embeddings)")


def compare(
    model_dir: str | Path | None = None,
    methods: Sequence[str] = ("float", "rtn", "sinq"),
    bits: Sequence[int] = (4,),
    group_size: int = 64,
    text: str = "wikipedia",
    n_windows: int = 4,
    length: int = 512,
    *,
    model: torch.nn.Module | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    config_overrides: dict[str, Any] | None = None,
    progress: bool = False,
) -> PplTable:
    """Torch perplexity of the float model and of RTN / SINQ copies at each width.

    Every linear but lm_head is quantized (SinqConfig defaults) with ``group_size``; ``rtn``
    is the plain min/max baseline (no energy refit) unless ``config_overrides`` says otherwise.
    """
    if model is None:
        # before the model is loaded: a window past the context fails in a second, not after
        # minutes of loading and tens of GB of attention
        check_length(read_config(Path(model_dir or default_model_dir())), length)
        model, tokenizer = load_causal_lm(model_dir)
    else:
        check_length(model.config.to_dict(), length)
    windows = text_windows(tokenizer, text, n_windows, length)
    table = PplTable(protocol=protocol(text, n_windows, length))
    source = str(model_dir or "default")
    if "float" in methods:
        table.rows.append(perplexity_torch(model, windows, "float", source=source))
    for b in bits:
        for method in ("rtn", "sinq"):
            if method not in methods:
                continue
            baseline = {"energy_refit": 0} if method == "rtn" else {}
            cfg = SinqConfig(bits=b, group_size=group_size, method=method,
                             **{**baseline, **(config_overrides or {})})
            q = copy.deepcopy(model)
            report = quantize_model(q, cfg, progress=progress)
            table.rows.append(perplexity_torch(q, windows, method, b, group_size,
                                               quantize_seconds=report.seconds, source=source))
            del q
    return table


@while_unchanged
def evaluate_export(out_dir: str | Path, backend: str = "onnxruntime", text: str = "wikipedia",
                    n_windows: int = 4, length: int = 512, provider: str = "cpu") -> PplTable:
    """Perplexity of an export folder: its ONNX model, or (``torch``) the reference `validate`
    rebuilds (source folder + ONNX tensors, or OUT_DIR/reference)."""
    info = read_export(out_dir)
    folder = Path(out_dir)
    context = context_length(info)
    if context is not None and length > context:
        raise ValidationError(f"--length {length} exceeds the model's context of {context} tokens")
    model = None
    if backend == "torch":  # a missing source or damaged folder fails before any text work
        model = reference_model(out_dir)
    else:
        check_export_runs(info)
    source = Path((info.meta.get("source") or {}).get("path") or folder / REFERENCE_DIR)
    tok_dir = next((d for d in (folder, source, folder / REFERENCE_DIR)
                    if (d / "tokenizer_config.json").is_file()), None)
    if tok_dir is None:
        raise ValidationError(f"{out_dir}: no tokenizer files (tokenizer_config.json)")
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    windows = text_windows(tokenizer, text, n_windows, length)
    table = PplTable(protocol=protocol(text, n_windows, length))
    cfg = info.meta.get("config", {})
    if model is not None:
        qcfg = SinqConfig.from_dict(cfg)
        table.rows.append(perplexity_torch(model, windows, qcfg.method, qcfg.bits, qcfg.group_size,
                                           source=str(out_dir)))
    else:
        table.rows.append(perplexity_onnx(out_dir, windows, provider,
                                          label=cfg.get("method", "onnx")))
    return table
