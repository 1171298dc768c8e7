"""The library call behind each `sinq-export` subcommand.

Each function takes configs and paths, checks what can be checked before minutes of work, does
the work, and returns what the command prints; the CLI only turns flags into these arguments
and the result into text. Errors are the library's own (`outcome` maps them to exit codes).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import eval as ev
from . import runtime_ops
from .config import ConfigError, SinqConfig
from .contract import MANIFEST_FILE
from .export import ExportResult, export_causal_lm
from .gguf import resolve_model_input
from .io import atomic_output_dir, check_parents
from .models import default_model_dir, load_causal_lm
from .nn import QUANTIZED_MARKER, plan_quantization, quantize_model, write_quantized
from .outcome import UsageError
from .presets import Preset
from .validate import ValidationError, ValidationReport, plot_layers, validate

# ------------------------------------------------------------------------------ quantize


def quantize_to_folder(model_dir: str | Path | None, output: str | Path, config: SinqConfig, *,
                       overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Quantize a model in PyTorch and save it to ``output`` (safetensors + JSON); the summary.

    The output is checked and its temp folder made before the minutes of work, so a refused or
    unwritable output fails at once; the temp folder goes on any error or signal.
    """
    source = resolve_model_input(model_dir) or default_model_dir()
    with atomic_output_dir(output, overwrite, marker=QUANTIZED_MARKER, protect=[source]) as tmp:
        model, tokenizer = load_causal_lm(source)
        plan = plan_quantization(model, tokenizer, config)
        config = plan.config
        report = quantize_model(model, config, progress=progress, measure_error=True,
                                calibration=plan.calibration)
        write_quantized(model, tmp, config, tokenizer=tokenizer)
    errors = [la.rel_error for la in report.layers]
    return {
        "output": str(output),
        "layers": report.n_layers,
        "seconds": round(report.seconds, 3),
        "mean_rel_error": sum(errors) / max(len(errors), 1),
        "config": config.to_dict(),
        "calibration": plan.manifest.get("calibration"),
    }


def quantize_summary_line(s: Mapping[str, Any]) -> str:
    """`quantize_to_folder`'s summary as the line `sinq-export quantize` prints."""
    return (f"quantized {s['layers']} linears in {s['seconds']} s, mean relative error "
            f"{s['mean_rel_error']:.4f} -> {s['output']}")


# ------------------------------------------------------------------------------ model


def require_custom_ops(graph: Mapping[str, object]) -> None:
    """Fail before any work when the graph needs the optional sinq.ops library and it is not built."""
    wants = [flag for flag, on in (("--runtime custom", graph.get("runtime") == "custom"),
                                   ("--col-scale fused", graph.get("col_scale") == "fused"))
             if on]
    if wants:
        runtime_ops.require(" / ".join(wants))


def export_model(model_dir: str | Path | None, output: str | Path, preset: Preset, *,
                 overwrite: bool = False, progress: bool = True, with_reference: bool = False,
                 allow_unquantized: bool = False) -> ExportResult:
    """`export_causal_lm` after refusing, before the model is looked at, a bad combination of
    settings and a graph that needs a custom-op library that is not built."""
    preset.configs()
    require_custom_ops(preset.graph)
    return export_causal_lm(resolve_model_input(model_dir), output, preset=preset,
                            overwrite=overwrite, progress=progress, with_reference=with_reference,
                            allow_unquantized=allow_unquantized)


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.1f} MB"


def _levels_text(graph: Mapping[str, Any], per_level: Mapping[int, int] | None) -> str:
    """``auto (4: 200, 0: 11 layers)`` for levels chosen per layer, else the one level."""
    if not per_level:
        return str(graph["accuracy_level"])
    counts = ", ".join(f"{lv}: {n}" for lv, n in sorted(per_level.items(), reverse=True))
    return f"{graph['accuracy_level']} ({counts} layers)"


def model_summary_lines(s: Mapping[str, Any]) -> list[str]:
    """An export's summary (`ExportResult.summary`) as the lines `sinq-export model` prints."""
    c, g = s["config"], s["graph"]
    bits = ", ".join(f"{b}-bit: {n}" for b, n in s["layers_by_bits"].items())
    before, after = s["linear_weight_bytes_before"], s["linear_weight_bytes_after"]
    ratio = f" ({after / before:.3f}x)" if before else ""
    rows = [
        ("output", s["output"]),
        ("model", f"{s['source_model']} ({s['kind']})"),
        ("method", f"{c['method']} {c['bits']}-bit, group {c['group_size']}, runtime {g['runtime']}, "
                   f"accuracy_level {_levels_text(g, s.get('layers_per_accuracy_level'))}, "
                   f"{g['dtype']}, col_scale {g['col_scale']}"),
        ("layers quantized", f"{s['layers_quantized']} ({bits}); ops {', '.join(s['ops'])}"),
        ("col-scale Mul nodes", str(s["mul_nodes"])),
        ("linear weights", f"{_mb(before)} -> {_mb(after)}{ratio}"),
        ("ONNX files", _mb(s["onnx_bytes_after"])),
    ]
    t = s["timings_s"]
    rows.append(("time", " | ".join(f"{k} {v:.1f} s" for k, v in t.items())
                 + f" | total {sum(t.values()):.1f} s"))
    if s.get("peak_rss_mb"):
        rows.append(("peak RSS", f"{max(s['peak_rss_mb'].values()):.0f} MiB"))
    width = max(len(k) for k, _ in rows)
    return ["sinq-export model: done", *(f"  {k:<{width}}  {v}" for k, v in rows)]


# ------------------------------------------------------------------------------ validate


def check_report_path(path: str | None, flag: str) -> None:
    """Refuse a report path that cannot be a file *before* minutes of work (a `UsageError`; an
    `OutputError` when a parent of it is a file)."""
    if path is None or path == "-":
        return
    if Path(path).is_dir():
        raise UsageError(f"{flag} {path}: is a folder (expected a file path)")
    check_parents(Path(path).expanduser().absolute())


def validate_to_files(out_dir: str | Path, *, json_path: str | None = None,
                      plot_path: str | None = None, **options: Any) -> ValidationReport:
    """`validate` an export, writing the JSON report (``json_path``; ``-``: none, the caller
    prints it) and the per-layer plot. Files first, verdict after: a failing write never
    follows a printed PASSED."""
    check_report_path(json_path, "--json")
    check_report_path(plot_path, "--plot")
    report = validate(out_dir, **options)
    if json_path and json_path != "-":
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    if plot_path:
        plot_layers(report, plot_path)
    return report


# ------------------------------------------------------------------------------ eval


def evaluate(model: str | None, *, backend: str | None = None, text: str = "wikipedia",
             n_windows: int = 4, length: int = 512, methods: str | Sequence[str] = "float,rtn,sinq",
             bits: str | Sequence[int] = "4", group_size: int = 64,
             provider: str = "cpu") -> ev.PplTable:
    """Perplexity of an export folder (onnxruntime, or ``backend="torch"``: its PyTorch
    reference) or of a model folder (PyTorch, for each method and width). Every bad value is a
    `UsageError` naming it."""
    if n_windows < 1 or length < 2:
        raise UsageError("--windows must be >= 1 and --length >= 2")
    is_export = model is not None and (Path(model) / MANIFEST_FILE).is_file()
    try:
        if is_export:
            return ev.evaluate_export(model, backend=backend or "onnxruntime", text=text,
                                      n_windows=n_windows, length=length, provider=provider)
        if backend == "onnxruntime":
            raise UsageError(f"{model or 'the default model'} is not an export folder; "
                             "export it first (`sinq-export model ... -o OUT`) and pass OUT")
        checked = SinqConfig(group_size=group_size)  # validates the group size
        return ev.compare(resolve_model_input(model), methods=ev.parse_methods(methods),
                          bits=ev.parse_bits(bits), group_size=checked.group_size, text=text,
                          n_windows=n_windows, length=length)
    except (ValueError, ValidationError) as exc:
        if isinstance(exc, (UsageError, ConfigError)):
            raise
        raise UsageError(str(exc)) from exc
