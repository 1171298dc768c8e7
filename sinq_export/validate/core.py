"""`validate()`: drive providers, compare end to end and layer by layer, decide."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .graph import (
    ExportInfo,
    _initializers,
    _LayerSite,
    _load_onnx,
    _session,
    dequantize_node,
    instrumented_copy,
    locate_layers,
    read_export,
)
from .metrics import EndToEnd, compare_logits, compare_outputs, layer_error, perplexity_from_logits
from .providers import (
    EXPORT_META_FILE,
    PROVIDERS,
    QUANT_OPS,
    REFERENCE_DIR,
    Tolerance,
    ValidationError,
    available_providers,
    parse_providers,
    tolerance_for,
)
from .report import LayerResult, ProviderResult, ValidationReport, _fmt
from .runners import (
    _check_tokenizers,
    module_feeds,
    run_ort_lm,
    run_ort_module,
    run_torch_lm,
    run_torch_module,
    validation_tokens,
)

# ------------------------------------------------------------------------------ validate


def validate(
    out_dir: str | Path,
    providers: str | Sequence[str] = ("cpu",),
    accuracy_level: int | None = None,
    tokens: int = 256,
    decode_steps: int = 8,
    *,
    token_ids: Sequence[int] | np.ndarray | None = None,
    reference: Any = None,
    text: str = "wikipedia",
    seed: int = 0,
) -> ValidationReport:
    """Check ``out_dir`` (a `sinq-export model` folder) on each provider; see module docstring.

    Args:
        providers: short names (``cpu``, ``cuda``, ...), a comma list, or ``"all"``.
        accuracy_level: override every quantized node's ``accuracy_level`` (None: as exported).
        tokens: prefill length (real text, the first ``tokens`` tokens of the cleaned text).
            For ``kind: module`` exports: the size given to every symbolic input dimension.
        decode_steps: greedy decode steps through the KV cache after the prefill.
        token_ids: explicit prefill tokens instead of the real text (tests).
        reference: an already loaded reference model (default: ``load_quantized(out/reference)``;
            a ``kind: module`` export needs it: its module class cannot be rebuilt from files,
            so without it the module is checked ONNX-only). Its outputs are not modified.
        seed: seed of the random float inputs of ``kind: module`` exports.
    """
    info = read_export(out_dir)
    names = parse_providers(providers)
    if tokens < 2 or decode_steps < 0:
        raise ValidationError(f"tokens must be >= 2 and decode_steps >= 0 (got {tokens}, {decode_steps})")
    if info.kind not in ("causal-lm", "module"):
        raise ValidationError(f"{out_dir}: unknown export kind {info.kind!r}")
    is_lm = info.kind == "causal-lm"
    ref_dir = info.out_dir / REFERENCE_DIR
    has_ref_files = (ref_dir / "sinq_quantized.json").is_file()
    has_ref = reference is not None or (has_ref_files and is_lm)
    report = ValidationReport(out_dir=str(out_dir), mode="reference" if has_ref else "onnx-only",
                              kind=info.kind, n_prefill=0, n_decode=decode_steps if is_lm else 0)
    if not has_ref:
        why = (f"no {REFERENCE_DIR}/ in {out_dir}" if not has_ref_files else
               f"{REFERENCE_DIR}/ of a kind 'module' export needs the module class (Python API: "
               "validate(..., reference=load_quantized(path, model=YourModule())[0]))")
        report.notes.append(
            f"{why}: ONNX-only checks - every quantized node is compared with a NumPy "
            "dequantisation of its own initializers on captured inputs; this proves the kernels, "
            "not that the weights match the PyTorch model")
    level = info.accuracy_level if accuracy_level is None else int(accuracy_level)
    if accuracy_level is not None:
        report.notes.append(f"accuracy_level overridden to {level} on every quantized node")

    model = _load_onnx(info.onnx_path)
    prefill = feeds = None
    if is_lm:
        if token_ids is None:
            tok = _check_tokenizers(info.out_dir, ref_dir if ref_dir.is_dir() else None)
            prefill = validation_tokens(tok, tokens, text)
        else:
            prefill = np.asarray(token_ids, dtype=np.int64).reshape(-1)[:tokens]
        report.n_prefill = len(prefill)
    else:
        feeds = module_feeds(model, tokens, seed)
        report.n_prefill = max(int(np.prod(v.shape[:-1])) if v.ndim > 1 else 1 for v in feeds.values())

    # --- torch reference (once, shared by every provider)
    ref_run, decode_tokens, ref_layers = None, None, {}
    if has_ref:
        if reference is None:
            from ..nn import load_quantized

            reference, _ = load_quantized(ref_dir)
        from ..nn import quantized_layers

        ref_layers = quantized_layers(reference)
        missing = sorted(set(info.layers) - set(ref_layers))
        if missing:
            raise ValidationError(f"layers in {EXPORT_META_FILE} but not in the reference: {missing[:5]}")
        if is_lm:
            vocab = int(getattr(getattr(reference, "config", None), "vocab_size", 0) or 0)
            if vocab and int(prefill.max()) >= vocab:
                raise ValidationError(f"token id {int(prefill.max())} >= reference vocab {vocab}: "
                                      "mismatched tokenizer")
            ref_run, decode_tokens = run_torch_lm(reference, prefill, decode_steps, ref_layers)
        else:
            ref_run = run_torch_module(reference, feeds, model, ref_layers)

    inits = _initializers(model)
    sites = locate_layers(model, info) if has_ref else _sites_from_graph(model, info)
    if not sites:
        report.notes.append("the graph has no quantized (MatMulNBits / SinqMatMulNBits) node")
    expose = list(dict.fromkeys(t for s in sites for t in (s.output, s.local_input)))
    plain = instrumented_copy(model, [], level) if accuracy_level is not None else info.onnx_path
    probe = instrumented_copy(model, expose, level if accuracy_level is not None else None)
    del model

    available = set(available_providers())
    for name in names:
        pr = ProviderResult(provider=name, ort_provider=PROVIDERS[name], status="skipped",
                            accuracy_level=level, dtype=info.dtype)
        report.providers.append(pr)
        if name not in available:
            pr.reason = (f"{PROVIDERS[name]} is not available in this onnxruntime build "
                         f"(available: {', '.join(sorted(available)) or 'none'})")
            continue
        start = time.perf_counter()
        try:
            sess_plain = _session(plain, info, name)
            sess_probe = _session(probe, info, name)
        except RuntimeError as exc:
            pr.reason = f"cannot create a session on {PROVIDERS[name]}: {exc}"
            continue
        pr.tolerance = tolerance_for(name, level, info.dtype)
        if is_lm:
            # ONNX-only: greedy tokens from the first provider's own logits
            ort_run = run_ort_lm(sess_plain, prefill,
                                 decode_steps if decode_tokens is None else decode_tokens)
            decode_tokens = ort_run.fed
            probe_run = run_ort_lm(sess_probe, prefill, decode_tokens, capture=expose)
        else:
            ort_run = run_ort_module(sess_plain, feeds)
            probe_run = run_ort_module(sess_probe, feeds, capture=expose)
        if ref_run is not None:
            if ort_run.logits.shape != ref_run.logits.shape:
                raise ValidationError(f"output shape: torch {ref_run.logits.shape} vs onnxruntime "
                                      f"{ort_run.logits.shape} (mismatched vocab / tokenizer?)")
            if is_lm:
                pr.end_to_end = compare_logits(ref_run.logits, ort_run.logits, prefill, len(prefill))
            else:
                pr.end_to_end = compare_outputs(ref_run.logits, ort_run.logits)
        elif is_lm:
            e = EndToEnd(n_tokens=len(ort_run.logits), n_prefill=len(prefill),
                         n_decode=len(decode_tokens))
            e.ppl_ort = perplexity_from_logits(ort_run.logits[: len(prefill)], prefill)
            pr.end_to_end = e
        pr.layers = _check_layers(sites, probe_run.captures, inits, ref_layers,
                                  ref_run.captures if ref_run else {}, pr.tolerance)
        _verdict(pr, report.mode)
        pr.seconds = time.perf_counter() - start
    return report



def _sites_from_graph(model, info: ExportInfo) -> list[_LayerSite]:
    """ONNX-only mode: every quantized node, named by sinq_export.json when it lists it."""
    by_node = {m.get("onnx_node"): (n, m) for n, m in info.layers.items()}
    sites = []
    for i, node in enumerate(model.graph.node):
        if node.op_type not in QUANT_OPS:
            continue
        name, meta = by_node.get(node.name, (node.name, {}))
        sites.append(_LayerSite(name, node, node.output[0], node.input[0], True, None, i, meta))
    return sites


def _check_layers(sites, captures, inits, ref_layers, ref_captures, tol: Tolerance) -> list[LayerResult]:
    """Local error of every site (see module docstring), propagated error where hooked.

    The local reference runs in float32 (torch, multi-threaded): its own rounding (~1e-7
    relative) is far below every tolerance row.
    """
    import torch

    results = []
    for s in sites:
        got = captures[s.output]
        x = torch.from_numpy(np.ascontiguousarray(captures[s.local_input], dtype=np.float32))
        res = LayerResult(name=s.name, op=s.node.op_type, bits=s.meta.get("bits"))
        if s.name in ref_layers:  # reference weights, applied to onnxruntime's own input
            layer = ref_layers[s.name]
            w = layer.grouped_weight().float()
            t = None if s.input_has_col_scale or layer.col_scale is None else layer.col_scale.float()
            bias = None if layer.bias is None else layer.bias.float()
        else:  # ONNX-only: the node's own initializers
            d = dequantize_node(s.node, inits)
            w = torch.from_numpy(d["W"]).float()
            t, bias = (None if d[k] is None else torch.from_numpy(d[k]).float()
                       for k in ("col_scale", "bias"))
            if s.output != s.node.output[0]:
                res.note = "compared at the node output"
        with torch.inference_mode():
            y = torch.nn.functional.linear(x * t if t is not None else x, w, bias)
        row_scale = None
        if s.output_scaled_by:
            other = ref_layers.get(s.output_scaled_by)
            if other is None or other.col_scale is None:
                res.note = f"output_scaled_by {s.output_scaled_by}: no column scale in the reference"
            else:
                row_scale = other.col_scale.float().numpy()
                y = y * other.col_scale.float()
        ref = y.numpy()
        if ref.shape != got.shape:
            res.passed, res.note = False, f"shape {got.shape} vs reference {ref.shape}"
            results.append(res)
            continue
        err = layer_error(ref, got, cosine=False)
        res.local_rel, res.local_max_abs = err["rel"], err["max_abs"]
        if s.name in ref_captures:
            hooked = ref_captures[s.name]
            if row_scale is not None:
                hooked = hooked * row_scale
            if hooked.shape == got.shape:
                perr = layer_error(hooked, got)
                res.propagated_rel, res.propagated_cosine = perr["rel"], perr["cosine"]
        res.passed = bool(res.local_rel <= tol.layer_rel)
        results.append(res)
    return results


def _verdict(pr: ProviderResult, mode: str) -> None:
    tol, e = pr.tolerance, pr.end_to_end
    failing = [la for la in pr.layers if not la.passed]
    if failing:
        pr.first_diverging_layer = failing[0].name
        pr.failures.append(
            f"{len(failing)} layer(s) past local rel {tol.layer_rel:.1e}; first diverging layer: "
            f"{failing[0].name} (local rel {_fmt(failing[0].local_rel)})")
    if e is not None and mode == "reference":
        checks = [
            ("logits rel err", e.rel, tol.logits_rel, "<="),
            ("perplexity delta", e.ppl_delta_rel, tol.ppl_rel, "<="),
            ("top-1 agreement", e.top1, tol.top1, ">="),
            ("KL mean", e.kl_mean, tol.kl_mean, "<="),
        ]
        for label, value, limit, op in checks:
            if value is None:
                continue
            ok = value <= limit if op == "<=" else value >= limit
            if not ok or not math.isfinite(value):
                pr.failures.append(f"{label} {_fmt(value)} not {op} {_fmt(limit)}")
    elif e is not None and e.ppl_ort is not None and not math.isfinite(e.ppl_ort):
        pr.failures.append("onnxruntime perplexity is not finite")
    pr.status = "failed" if pr.failures else "passed"
