"""`validate()`: drive providers, compare end to end and layer by layer, decide."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from ..checkpoint import Checkpoint
from ..models import ModelLoadError
from ..onnx_tensors import OnnxTensors, graph_bytes, load_graph
from .graph import (
    ExportInfo,
    _LayerSite,
    _session,
    dequantize_node,
    exact_channel_faults,
    instrumented_copy,
    locate_layers,
    node_accuracy_level,
    read_export,
)
from .js import js_provider_result, refuse_custom_ops
from .loadable import check_loadable
from .metrics import EndToEnd, compare_logits, compare_outputs, layer_error, perplexity_from_logits
from .providers import (
    EXPORT_META_FILE,
    JS_PROVIDERS,
    PROVIDERS,
    QUANT_OPS,
    REFERENCE_DIR,
    WEIGHT_STEP_LIMIT,
    Tolerance,
    ValidationError,
    available_providers,
    parse_providers,
    tolerance_for,
)
from .rebuild import (
    ReferenceSource,
    build_reference,
    layer_node_name,
    norm_folds,
    read_folded_t,
    resolve_source,
    weight_steps,
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
from .snapshot import while_unchanged

if TYPE_CHECKING:
    import onnx
    import onnxruntime as ort
    import torch

_Run = TypeVar("_Run")  # what a provider's run function returns

# ------------------------------------------------------------------------------ validate


@while_unchanged
def validate(
    out_dir: str | Path,
    providers: str | Sequence[str] = ("cpu",),
    accuracy_level: int | None = None,
    tokens: int = 256,
    decode_steps: int = 8,
    *,
    token_ids: Sequence[int] | np.ndarray | None = None,
    reference: Any = None,
    source: str | Path | None = None,
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
        reference: an already loaded reference model (default: rebuilt from the source folder
            + the ONNX tensors, see `rebuild`; a ``kind: module`` export needs it: its module
            class cannot be rebuilt from files, so without it the module is checked ONNX-only).
            Its outputs are not modified.
        source: the model folder the export was made from, when it is no longer where
            ``sinq_export.json`` says (``--source``).
        seed: seed of the random float inputs of ``kind: module`` exports.

    Every problem with the folder or the arguments raises `ValidationError` (exit 2) before
    any verdict exists; a report is returned only once every provider has run, and only if
    ``out_dir`` did not change meanwhile (`snapshot.FolderChanged` otherwise).
    """
    info = read_export(out_dir)
    names = parse_providers(providers)
    refuse_custom_ops(names, info.custom_domains)
    if tokens < 2 or decode_steps < 0:
        raise ValidationError(f"tokens must be >= 2 and decode_steps >= 0 (got {tokens}, {decode_steps})")
    if info.kind not in ("causal-lm", "module"):
        raise ValidationError(f"{out_dir}: unknown export kind {info.kind!r}")
    is_lm = info.kind == "causal-lm"
    context = context_length(info) if is_lm else None
    n_prefill = tokens if token_ids is None else min(tokens, len(np.asarray(token_ids).reshape(-1)))
    if context is not None and n_prefill + decode_steps > context:
        raise ValidationError(f"--tokens {n_prefill} + --decode-steps {decode_steps} exceed the "
                              f"model's context of {context} tokens")
    model = load_graph(info.onnx_path)
    tensors = OnnxTensors(model, info.data_dir)
    check_loadable(info)
    src = resolve_source(info.out_dir, info.meta, source) if reference is None and is_lm else None
    has_ref = reference is not None or src is not None
    report = ValidationReport(out_dir=str(out_dir), mode="reference" if has_ref else "onnx-only",
                              kind=info.kind, n_prefill=0, n_decode=decode_steps if is_lm else 0)
    if src is not None:
        report.notes.append(src.note or f"reference: {src.path} ({src.kind}) + the ONNX tensors")
    if not has_ref:
        why = (f"no source folder or {REFERENCE_DIR}/ for {out_dir}" if is_lm else
               "a kind 'module' export needs the module class (Python API: "
               "validate(..., reference=load_quantized(path, model=YourModule())[0]))")
        report.notes.append(
            f"{why}: ONNX-only checks - every quantized node is compared with a NumPy "
            "dequantisation of its own initializers on captured inputs; this proves the kernels, "
            "not that the weights match the PyTorch model")
    changed = _changed_tensors(info, tensors, report)
    level = info.accuracy_level if accuracy_level is None else int(accuracy_level)
    if accuracy_level is not None:
        report.notes.append(f"accuracy_level overridden to {level} on every quantized node")

    prefill = feeds = None
    if is_lm:
        if token_ids is None:
            tok = _check_tokenizers(info.out_dir, src.path if src is not None else None)
            try:
                prefill = validation_tokens(tok, tokens, text)
            except ValueError as exc:  # unknown text id, text shorter than the window
                raise ValidationError(str(exc)) from exc
        else:
            prefill = np.asarray(token_ids, dtype=np.int64).reshape(-1)[:tokens]
        report.n_prefill = len(prefill)
    else:
        feeds = module_feeds(model, tokens, seed)
        report.n_prefill = max(int(np.prod(v.shape[:-1])) if v.ndim > 1 else 1 for v in feeds.values())

    # --- torch reference (once, shared by every provider)
    ref_run, decode_tokens, ref_layers, weight_check = None, None, {}, {}
    if has_ref:
        if reference is None:
            reference = _load_reference(src, info, model, tensors)
        from ..nn import quantized_layers

        ref_layers = quantized_layers(reference)
        if src is not None and src.kind == "source":  # ONNX weights vs the source weights
            weight_check = weight_steps(Checkpoint.open(src.path), info.layers, ref_layers,
                                        compensated=_gptq_layers(info), tensors=tensors,
                                        folded_t=read_folded_t(info.out_dir, info.meta))
        missing = sorted(n for n, m in info.layers.items()
                         if m.get("op", QUANT_OPS[0]) in QUANT_OPS and n not in ref_layers)
        if missing:
            raise ValidationError(f"layers in {EXPORT_META_FILE} but not in the reference: {missing[:5]}")
        if is_lm:
            _check_lengths(reference, prefill, decode_steps)
            ref_run, decode_tokens = run_torch_lm(reference, prefill, decode_steps, ref_layers)
        else:
            ref_run = run_torch_module(reference, feeds, model, ref_layers)
        del reference  # the layers the checks need stay referenced by ref_layers

    sites = locate_layers(model, info) if has_ref else _sites_from_graph(model, info)
    exact_faults = exact_channel_faults(sites, tensors)
    if not sites:
        report.notes.append("the graph has no quantized (MatMulNBits / SinqMatMulNBits) node")
    expose = list(dict.fromkeys(t for s in sites for t in (s.output, s.local_input)))
    plain = instrumented_copy(model, [], level) if accuracy_level is not None else info.onnx_path
    probe = instrumented_copy(model, expose, level if accuracy_level is not None else None)
    model_for_js = model if any(n in JS_PROVIDERS for n in names) else None
    del model

    available = set(available_providers())
    for name in names:
        if name in JS_PROVIDERS:  # end to end only: the layers are checked in Python onnxruntime
            pr = js_provider_result(name, info, model_for_js, prefill, decode_tokens, ref_run,
                                    level, None if isinstance(plain, Path) else graph_bytes(plain),
                                    weight_check)
            if pr.end_to_end is not None:
                _flag_faults(pr, changed, exact_faults, info.layers)
                _verdict(pr, report.mode)
            report.providers.append(pr)
            continue
        pr = ProviderResult(provider=name, ort_provider=PROVIDERS[name], status="skipped",
                            accuracy_level=level, dtype=info.dtype)
        report.providers.append(pr)
        if name not in available:
            pr.reason = (f"{PROVIDERS[name]} is not available in this onnxruntime build "
                         f"(available: {', '.join(sorted(available)) or 'none'})")
            continue
        start = time.perf_counter()
        pr.tolerance = tolerance_for(name, level, info.dtype)
        run = run_ort_lm if is_lm else run_ort_module
        inputs = (prefill, decode_steps if decode_tokens is None else decode_tokens) if is_lm \
            else (feeds,)
        ort_run = _provider_run(plain, info, name, pr, "a session", run, inputs)
        if ort_run is None:
            continue
        if is_lm:  # ONNX-only: greedy tokens from the first provider's own logits
            decode_tokens = ort_run.fed
        inputs = (prefill, decode_tokens) if is_lm else (feeds,)
        probe_run = _provider_run(probe, info, name, pr, "the probe session", run, inputs,
                                  capture=expose)
        if probe_run is None:
            continue
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
        layer_tol = {s.name: tolerance_for(name, level if accuracy_level is not None
                                           else node_accuracy_level(s.node), info.dtype)
                     for s in sites}
        pr.layers = _check_layers(sites, probe_run.captures, tensors, ref_layers,
                                  ref_run.captures if ref_run else {}, layer_tol, weight_check)
        _flag_faults(pr, changed, exact_faults, info.layers)
        _verdict(pr, report.mode)
        pr.seconds = time.perf_counter() - start
    return report


def _changed_tensors(info: ExportInfo, tensors: OnnxTensors, report: ValidationReport
                     ) -> dict[str, str]:
    """Initializers whose bytes differ from the sha256 the export recorded (see
    `OnnxTensors.changed`). Every tensor is covered, also those the source check cannot read
    back (a layer whose t is folded into another layer's rows)."""
    recorded = info.meta.get("tensor_sha256")
    if recorded is None:
        report.notes.append(f"{EXPORT_META_FILE} has no tensor_sha256 (an older export): "
                            "tensor bytes are checked only where the source weights can be")
        return {}
    if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
        raise ValidationError(f"{info.out_dir / EXPORT_META_FILE}: tensor_sha256 is not an "
                              "object of hex digests")
    return tensors.changed(recorded)


def _flag_faults(pr: ProviderResult, changed: dict[str, str], exact_faults: dict[str, str],
                 layers: dict[str, dict]) -> None:
    """What the graph's tensors show whatever runtime ran them: tensors whose bytes changed
    (`_flag_changed`) and exact channels that are not what they claim
    (`graph.exact_channel_faults`) fail their layer, or the provider where it has no result for
    that layer (a JavaScript runtime checks its layers only against the source weights)."""
    _flag_changed(pr, changed, layers)
    sites = {la.name: la for la in pr.layers}
    for name, fault in exact_faults.items():
        if name in sites:
            sites[name].passed, sites[name].note = False, fault
        else:
            pr.failures.append(f"layer {name}: {fault}")


def _flag_changed(pr: ProviderResult, changed: dict[str, str], layers: dict[str, dict]) -> None:
    """Fail each layer whose tensor changed (named with the tensor); a changed tensor of no
    checked layer (a norm, a quantized embedding table) fails the provider, named."""
    owners: dict[str, list[str]] = {}
    for name, meta in layers.items():
        for tensor in (meta.get("initializers") or {}).values():
            if tensor:
                owners.setdefault(tensor, []).append(name)
    sites = {part: la for la in pr.layers for part in la.name.split("+")}  # packed: a+b
    for tensor, what in changed.items():
        hit = [sites[n] for n in owners.get(tensor, []) if n in sites]
        for la in hit:
            la.passed = False
            la.note = f"tensor {tensor} {what}"
        if not hit:
            where = "".join(f"layer {n}: " for n in owners.get(tensor, [])[:1])
            pr.failures.append(f"{where}tensor {tensor} {what}")


def _load_reference(src: ReferenceSource, info: ExportInfo, model: onnx.ModelProto,
                    tensors: OnnxTensors) -> torch.nn.Module:
    """The torch reference: rebuilt from the source folder, or OUT_DIR/reference."""
    if src.kind == "source":
        try:
            ckpt = Checkpoint.open(src.path)
        except ModelLoadError as exc:
            raise ValidationError(f"source model: {exc}") from exc
        nodes = {n.name: n for n in model.graph.node}
        return build_reference(ckpt, info.layers, nodes, tensors, norm_folds(info.layers))
    from ..nn import load_quantized

    try:
        return load_quantized(src.path)[0]
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ValidationError(f"{src.path}: cannot load the reference ({exc})") from exc


def _check_lengths(reference: torch.nn.Module, prefill: np.ndarray, decode_steps: int) -> None:
    """Token ids inside the vocabulary, prefill + decode inside the model's context."""
    config = getattr(reference, "config", None)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab and int(prefill.max()) >= vocab:
        raise ValidationError(f"token id {int(prefill.max())} >= reference vocab {vocab}: "
                              "mismatched tokenizer")
    context = int(getattr(config, "max_position_embeddings", 0) or 0)
    if context and len(prefill) + decode_steps > context:
        raise ValidationError(f"--tokens {len(prefill)} + --decode-steps {decode_steps} exceed the "
                              f"model's context of {context} tokens")


def _provider_run(model: onnx.ModelProto | Path, info: ExportInfo, name: str, pr: ProviderResult,
                  what: str, run: Callable[..., _Run], inputs: tuple, **kwargs: Any) -> _Run | None:
    """One session's run on provider ``name`` (the session is freed on return: one holds the
    prepacked weights at a time); None, with ``pr.reason``, when it cannot be created."""
    try:
        sess = _session(model, info, name)
    except RuntimeError as exc:
        pr.reason = f"cannot create {what} on {PROVIDERS[name]}: {exc}"
        return None
    return _run_ort(run, sess, *inputs, **kwargs)


def _run_ort(run: Callable[..., _Run], sess: ort.InferenceSession, *args: Any, **kwargs: Any) -> _Run:
    """onnxruntime failing to run an export it loaded means the folder is broken (exit 2)."""
    try:
        return run(sess, *args, **kwargs)
    except ValidationError:
        raise
    except Exception as exc:  # onnxruntime's Fail / InvalidArgument / RuntimeException
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValidationError(f"onnxruntime cannot run the export: {first}") from exc


def _sites_from_graph(model, info: ExportInfo) -> list[_LayerSite]:
    """ONNX-only mode: every quantized node, named by sinq_export.json when it lists it."""
    by_node: dict[str, tuple[str, dict]] = {}
    for n, m in info.layers.items():  # a packed node (qkv) is named by all its linears
        name, _ = by_node.get(layer_node_name(m), (None, None))
        by_node[layer_node_name(m)] = (n if name is None else f"{name}+{n}", m)
    sites = []
    for i, node in enumerate(model.graph.node):
        if node.op_type not in QUANT_OPS:
            continue
        name, meta = by_node.get(node.name, (node.name, {}))
        sites.append(_LayerSite(name, node, node.output[0], node.input[0], True, None, i, meta))
    return sites


def _check_layers(sites, captures, inits, ref_layers, ref_captures, tol: dict[str, Tolerance],
                  weight_check: dict[str, float | None] | None = None) -> list[LayerResult]:
    """Local error of every site (see module docstring), propagated error where hooked; each
    site is held to ``tol[name]``, the tolerance of the accuracy level its node runs at (an
    export with levels chosen per layer mixes exact fp32 layers and int8-activation ones).

    The local reference runs in float32 (torch, multi-threaded): its own rounding (~1e-7
    relative) is far below every tolerance row.
    """
    import torch

    from ..quant.core import tied_rows

    weight_check = weight_check or {}
    results = []
    for s in sites:
        got = captures[s.output]
        if s.rows is not None:  # this linear's columns of a packed node (e.g. qkv)
            got = got[:, s.rows[0]:s.rows[1]]
        x = torch.from_numpy(np.ascontiguousarray(captures[s.local_input], dtype=np.float32))
        res = LayerResult(name=s.name, op=s.node.op_type, bits=s.meta.get("bits"),
                          layer_rel_limit=tol[s.name].layer_rel)
        if s.name in ref_layers:  # reference weights, applied to onnxruntime's own input
            layer = ref_layers[s.name]
            w = layer.grouped_weight().float()
            t = None if s.input_has_col_scale or layer.col_scale is None else layer.col_scale.float()
            bias = layer.bias.float() if s.output_has_bias and layer.bias is not None else None
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
        other = ref_layers.get(s.output_scaled_by) if s.output_scaled_by else None
        if other is not None and other.col_scale is not None:
            # a reference/ folder keeps t on the consumer; the graph (and a reference rebuilt
            # from its tensors) has it in this layer's scales (one query head's slice of a
            # GQA-tied t per kv head for v_proj)
            rows = tied_rows(other.col_scale.float(), int(s.meta.get("output_scale_heads") or 1),
                             y.shape[-1])
            row_scale = rows.numpy()
            y = y * rows
        ref = y.numpy()
        if ref.shape != got.shape:
            res.passed, res.note = False, f"shape {got.shape} vs reference {ref.shape}"
            results.append(res)
            continue
        err = layer_error(ref, got, cosine=False)
        res.local_rel, res.local_max_abs = err["rel"], err["max_abs"]
        if s.name in ref_captures:
            hooked = ref_captures[s.name]
            layer = ref_layers[s.name]
            if not s.output_has_bias and layer.bias is not None:  # the graph adds it after the node
                hooked = hooked - layer.bias.float().numpy()
            if row_scale is not None:
                hooked = hooked * row_scale
            if hooked.shape == got.shape:
                perr = layer_error(hooked, got)
                res.propagated_rel, res.propagated_cosine = perr["rel"], perr["cosine"]
        res.passed = bool(res.local_rel <= tol[s.name].layer_rel)
        steps = weight_check.get(s.name)
        if steps is not None:
            res.weight_steps = steps
            if not steps <= WEIGHT_STEP_LIMIT:
                res.passed = False
                res.note = (f"weights {steps:.1f} quantization steps from the source "
                            f"(limit {WEIGHT_STEP_LIMIT})")
        results.append(res)
    return results


def _verdict(pr: ProviderResult, mode: str) -> None:
    tol, e = pr.tolerance, pr.end_to_end
    failing = [la for la in pr.layers if not la.passed]
    if failing:
        pr.first_diverging_layer = failing[0].name
        pr.failures.append(
            f"{len(failing)} layer(s) past their level's local rel limit or {WEIGHT_STEP_LIMIT} "
            f"quantization steps from the source weights; first diverging layer: "
            f"{failing[0].name} (local rel {_fmt(failing[0].local_rel)} > "
            f"{_fmt(failing[0].layer_rel_limit)}"
            + (f", {failing[0].note})" if failing[0].note else ")"))
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


# ------------------------------------------------------------------------------ for eval


def reference_model(out_dir: str | Path, source: str | Path | None = None):
    """The torch reference of a causal-LM export (what ``eval --backend torch`` scores)."""
    info = read_export(out_dir)
    model = load_graph(info.onnx_path)
    tensors = OnnxTensors(model, info.data_dir)
    src = resolve_source(info.out_dir, info.meta, source)
    if src is None:
        raise ValidationError(f"{out_dir}: no source folder or {REFERENCE_DIR}/ to build the "
                              "torch reference from; pass --source DIR")
    return _load_reference(src, info, model, tensors)


def context_length(info: ExportInfo) -> int | None:
    """Longest sequence the export runs: genai_config.json's ``context_length``, else the
    source config's ``max_position_embeddings`` (None when neither is known)."""
    import json

    candidates = [(info.out_dir / "genai_config.json", ("model", "context_length"))]
    path = (info.meta.get("source") or {}).get("path")
    if path:
        candidates.append((Path(path) / "config.json", ("max_position_embeddings",)))
    for file, keys in candidates:
        try:
            value: Any = json.loads(file.read_text())
            for key in keys:
                value = value[key]
            return int(value)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def check_export_runs(info: ExportInfo) -> None:
    """The graph parses, its external data is all there and the runtimes can load the folder
    (`check_loadable`); before any session."""
    OnnxTensors(load_graph(info.onnx_path), info.data_dir)
    check_loadable(info)


def _gptq_layers(info: ExportInfo) -> set[str]:
    """Layers whose codes GPTQ moved off round-to-nearest: every layer of a ``calibrate``
    export, the head of a ``calibrate_head`` one, and a table that shares a calibrated head's
    record."""
    from ..config import SinqConfig

    meta = info.meta.get("config")
    if not meta:
        return set()
    config = SinqConfig.from_dict(meta)
    if not config.gptq:
        return set()
    names = {n for n in info.layers if config.is_calibrated(n)}
    return names | {m["shared_with"] for n, m in info.layers.items()
                    if n in names and m.get("shared_with")}
