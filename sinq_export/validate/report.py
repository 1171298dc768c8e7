"""Report records and the readable table."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .metrics import EndToEnd
from .providers import Tolerance

# ------------------------------------------------------------------------------ report


@dataclass
class LayerResult:
    name: str
    op: str
    bits: int | None
    local_rel: float | None = None  # gated
    local_max_abs: float | None = None
    propagated_rel: float | None = None  # drift, reported only
    propagated_cosine: float | None = None
    weight_steps: float | None = None  # max |W_source - W_onnx| in quantization steps (gated)
    layer_rel_limit: float | None = None  # the local rel limit of the node's accuracy level
    passed: bool = True
    note: str = ""


@dataclass
class ProviderResult:
    provider: str
    ort_provider: str
    status: str  # "passed" | "failed" | "skipped"
    reason: str = ""
    accuracy_level: int | None = None
    dtype: str = "fp32"
    tolerance: Tolerance | None = None
    end_to_end: EndToEnd | None = None
    layers: list[LayerResult] = field(default_factory=list)
    first_diverging_layer: str | None = None
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    runtime: str = ""  # what ran, for the JavaScript runtimes (version, backend, adapter)


@dataclass
class ValidationReport:
    out_dir: str
    mode: str  # "reference" (torch vs onnxruntime) | "onnx-only" (NumPy per-op reference)
    kind: str
    n_prefill: int
    n_decode: int
    providers: list[ProviderResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        """``failed`` if any provider failed, ``passed`` if at least one passed, else ``skipped``."""
        states = {p.status for p in self.providers}
        if "failed" in states:
            return "failed"
        return "passed" if "passed" in states else "skipped"

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = self.status
        return _json_safe(d)

    def format_table(self) -> str:
        return format_report(self)


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, np.generic):
        return _json_safe(x.item())
    return x


def _fmt(x: float | None, spec: str = ".2e") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return format(x, spec)


def format_report(report: ValidationReport, max_layers: int = 12) -> str:
    """Readable summary: one block per provider, the worst layers, the verdict."""
    lines = [f"validate {report.out_dir}  [{report.mode}, {report.kind}, "
             f"{report.n_prefill} prefill tokens + {report.n_decode} decode steps]"]
    lines += [f"note: {n}" for n in report.notes]
    for p in report.providers:
        head = f"\n== {p.provider} ({p.ort_provider}) : {p.status.upper()}"
        if p.status == "skipped":
            lines.append(f"{head} - {p.reason}")
            continue
        lines.append(f"{head}  accuracy_level={p.accuracy_level} dtype={p.dtype} "
                     f"({p.seconds:.1f} s)")
        if p.runtime:
            lines.append(f"  runtime: {p.runtime}")
        tol, e = p.tolerance, p.end_to_end
        if e is not None:
            what = "output" if report.kind == "module" else "logits"
            rows = [
                (f"{what} max abs err", _fmt(e.max_abs), ""),
                (f"{what} mean abs err", _fmt(e.mean_abs), ""),
                (f"{what} rel err (max/range)", _fmt(e.rel), f"<= {_fmt(tol.logits_rel)}"),
                ("cosine min / mean", f"{_fmt(e.cosine_min, '.7f')} / "
                                      f"{_fmt(e.cosine_mean, '.7f')}", ""),
                ("top-1 agreement", _fmt(e.top1, '.4f'), f">= {tol.top1}"),
                ("  prefill / decode", f"{_fmt(e.top1_prefill, '.4f')} / "
                                       f"{_fmt(e.top1_decode, '.4f')}", ""),
                ("KL(torch||ort) mean / max", f"{_fmt(e.kl_mean)} / {_fmt(e.kl_max)}",
                 f"<= {_fmt(tol.kl_mean)}"),
                ("perplexity torch / ort", f"{_fmt(e.ppl_torch, '.4f')} / "
                                           f"{_fmt(e.ppl_ort, '.4f')}", ""),
                ("perplexity delta (rel)", _fmt(e.ppl_delta_rel), f"<= {_fmt(tol.ppl_rel)}"),
            ]
            if report.mode == "onnx-only":
                rows = [("perplexity ort", _fmt(e.ppl_ort, ".4f"), "")] if e.ppl_ort else []
            rows = [r for r in rows if any(tok not in ("-", "/") for tok in r[1].split())]
            w = max((len(r[0]) for r in rows), default=0)
            lines += [f"  {a:<{w}}  {b:<24} {c}" for a, b, c in rows]
        if p.layers and all(la.local_rel is None for la in p.layers):  # weights check only
            bad = [la for la in p.layers if not la.passed]
            lines.append(f"  {len(p.layers)} layers' weights checked against the source "
                         f"(quantization steps): {len(bad)} past the limit"
                         + "".join(f"\n    {la.name}  {_fmt(la.weight_steps, '.3f')}  FAIL"
                                   for la in bad[:max_layers]))
        elif p.layers:
            worst = sorted(p.layers, key=lambda la: -(la.local_rel if la.local_rel is not None
                                                       else la.propagated_rel or 0.0))
            shown = [la for la in p.layers if not la.passed][:max_layers] or worst[:3]
            label = "failing layers" if any(not la.passed for la in p.layers) else "worst layers"
            limits = Counter(la.layer_rel_limit for la in p.layers if la.layer_rel_limit)
            per_level = ", ".join(f"{n} at <= {_fmt(lim)}" for lim, n in sorted(limits.items()))
            lines.append(f"  {len(p.layers)} quantized layers, layer tolerance local rel "
                         f"({per_level or '<= ' + _fmt(tol.layer_rel)}, by each node's "
                         f"accuracy level); {label}:")
            w = max(5, *(len(la.name) for la in shown))
            lines.append(f"    {'layer':<{w}}  {'op':<15} {'local rel':>10} {'propag rel':>10}"
                         f" {'cosine':>10} {'w steps':>8}")
            for la in shown:
                lines.append(f"    {la.name:<{w}}  {la.op:<15} {_fmt(la.local_rel):>10} "
                             f"{_fmt(la.propagated_rel):>10} "
                             f"{_fmt(la.propagated_cosine, '.6f'):>10} "
                             f"{_fmt(la.weight_steps, '.3f'):>8}"
                             + ("" if la.passed else "  FAIL") + (f"  {la.note}" if la.note else ""))
        if p.first_diverging_layer:
            lines.append(f"  first diverging layer: {p.first_diverging_layer}")
        lines += [f"  FAIL: {f}" for f in p.failures]
    lines.append(f"\nresult: {report.status.upper()}")
    return "\n".join(lines)
