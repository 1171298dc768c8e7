"""`sinq-export` command line: a thin shell over the library API.

Each subcommand has an ``_add_<name>`` (argparse) and a ``_run_<name>`` (calls the library,
prints a table or JSON, returns the exit code). Exit codes: 0 success, 1 check failed
(e.g. parity past tolerance), 2 bad usage or bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from . import __version__
from .config import METHODS, QUANT_BITS, ConfigError, SinqConfig

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(ValueError):
    """Bad command-line input that argparse cannot catch by itself."""


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bits", type=int, default=4, choices=QUANT_BITS, help="code width (default 4)")
    p.add_argument("--group-size", type=int, default=64, help="block size along K (16-256, power of 2)")
    p.add_argument("--method", choices=METHODS, default="sinq", help="sinq (default) or rtn baseline")
    p.add_argument("--symmetric", action="store_true", help="fixed mid-range zero point")
    p.add_argument("--kurtosis-gate", type=float, default=None,
                   help="fall back to RTN for layers whose kurtosis exceeds this (off by default)")
    p.add_argument("--exclude", action="append", default=None, metavar="REGEX",
                   help="keep matching modules in float (default: lm_head); repeatable")
    p.add_argument("--override", action="append", default=[], metavar="REGEX=BITS",
                   help="per-layer bit width, e.g. 'down_proj=8'; repeatable")
    p.add_argument("--calibrate", action="store_true",
                   help="calibrated SINQ: A-SINQ activation-aware t + GPTQ rounding, from "
                        "Wikipedia windows disjoint from the evaluation windows (opt-in)")
    p.add_argument("--calibration-windows", type=int, default=None, metavar="N",
                   help="calibration windows of 512 tokens (default 8)")
    p.add_argument("--avg-bits", type=float, default=None, metavar="B",
                   help="pick a width per linear from {2,3,4,5,6,8} for the bytes of B bits "
                        "per weight (overrides --bits per layer)")
    p.add_argument("--max-size", type=float, default=None, metavar="MB",
                   help="pick widths per linear so the quantized linears fit in MB megabytes")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of a table")


def _parse_overrides(items: Sequence[str]) -> tuple[tuple[str, int], ...]:
    out = []
    for item in items:
        pattern, sep, bits = item.rpartition("=")
        if not sep or not pattern or not bits.isdigit():
            raise UsageError(f"--override {item!r}: expected REGEX=BITS, e.g. 'down_proj=8'")
        out.append((pattern, int(bits)))
    return tuple(out)


def config_from_args(args: argparse.Namespace) -> SinqConfig:
    """Build the one config object from parsed flags (validated once, by SinqConfig)."""
    fields = dict(
        bits=args.bits,
        group_size=args.group_size,
        method=args.method,
        symmetric=args.symmetric,
        kurtosis_gate=args.kurtosis_gate,
        overrides=_parse_overrides(args.override),
    )
    if args.exclude is not None:
        fields["exclude"] = tuple(args.exclude)
    for name in ("runtime", "accuracy_level", "dtype", "col_scale", "shared_col_scale",
                 "lm_head_bits", "lm_head_group_size", "calibration_windows", "avg_bits"):
        if getattr(args, name, None) is not None:
            fields[name] = getattr(args, name)
    if getattr(args, "calibrate", False):
        fields["calibrate"] = True
    if getattr(args, "max_size", None) is not None:
        fields["max_size_mb"] = args.max_size
    return SinqConfig(**fields)


# --- quantize: PyTorch-only quantization, saved as safetensors + JSON ---------------------

def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a model in PyTorch and save it (no ONNX)")
    p.add_argument("model_dir", nargs="?", default=None,
                   help="HF causal-LM folder (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true")
    _add_quant_args(p)


def _run_quantize(args: argparse.Namespace) -> int:
    from .models import load_causal_lm
    from .nn import plan_quantization, quantize_model, save_quantized

    config = config_from_args(args)
    model, tokenizer = load_causal_lm(args.model_dir)
    plan = plan_quantization(model, tokenizer, config)
    config = plan.config
    report = quantize_model(model, config, progress=not args.json, measure_error=True,
                            calibration=plan.calibration)
    save_quantized(model, args.output, config, tokenizer=tokenizer, overwrite=args.overwrite)
    errors = [la.rel_error for la in report.layers]
    summary = {
        "output": str(args.output),
        "layers": report.n_layers,
        "seconds": round(report.seconds, 3),
        "mean_rel_error": sum(errors) / max(len(errors), 1),
        "config": config.to_dict(),
        "calibration": plan.manifest.get("calibration"),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"quantized {summary['layers']} linears in {summary['seconds']} s, mean relative "
              f"error {summary['mean_rel_error']:.4f} -> {args.output}")
    return EXIT_OK


# --- model: quantize + export to ONNX (issue: exporter) ------------------------------------

def _add_model(sub: argparse._SubParsersAction) -> None:
    from .config import ACCURACY_LEVELS, COL_SCALE_MODES, DTYPES, RUNTIMES

    p = sub.add_parser("model", help="quantize a model and export it to ONNX")
    p.add_argument("model_dir", nargs="?", default=None,
                   help="HF causal-LM folder (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--target", choices=["onnx"], default="onnx")
    p.add_argument("--overwrite", action="store_true")
    _add_quant_args(p)
    p.add_argument("--runtime", choices=RUNTIMES, default=None,
                   help="stock: MatMulNBits only (3/5/6-bit codes in 4/8-bit containers); "
                        "custom: sinq.ops::SinqMatMulNBits where stock cannot run the width")
    p.add_argument("--accuracy-level", type=int, choices=ACCURACY_LEVELS, default=None,
                   help="MatMulNBits accuracy_level (0 = fp32 compute, 4 = int8 activations)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="graph float type (default fp32)")
    p.add_argument("--col-scale", choices=COL_SCALE_MODES, default=None,
                   help="column scale t: explicit Mul (default), fold into norms / up_proj rows "
                        "where exact, or fused into the custom op")
    p.add_argument("--shared-col-scale", action="store_true",
                   help="one Sinkhorn t for q/k/v and for gate/up (lets --col-scale fold "
                        "fold it into the norm weights)")
    p.add_argument("--lm-head-bits", type=int, choices=QUANT_BITS, default=None,
                   help="also quantize lm_head at this width (default: keep it float)")
    p.add_argument("--lm-head-group-size", type=int, default=None,
                   help="block size for lm_head (default: --group-size)")
    p.add_argument("--no-reference", action="store_true",
                   help="do not write OUT_DIR/reference (the PyTorch model `validate` uses)")
    p.add_argument("--float-export", default=None, metavar="DIR",
                   help="keep / reuse optimum's float ONNX export of the model in DIR "
                        "(saves ~30-60 s when exporting the same model again)")


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.1f} MB"


def _print_model_summary(s: dict) -> None:
    c = s["config"]
    bits = ", ".join(f"{b}-bit: {n}" for b, n in s["layers_by_bits"].items())
    before, after = s["linear_weight_bytes_before"], s["linear_weight_bytes_after"]
    ratio = f" ({after / before:.3f}x)" if before else ""
    rows = [
        ("output", s["output"]),
        ("model", f"{s['source_model']} ({s['kind']})"),
        ("method", f"{c['method']} {c['bits']}-bit, group {c['group_size']}, runtime {c['runtime']}, "
                   f"accuracy_level {c['accuracy_level']}, {c['dtype']}, col_scale {c['col_scale']}"),
        ("layers quantized", f"{s['layers_quantized']} ({bits}); ops {', '.join(s['ops'])}"),
        ("col-scale Mul nodes", str(s["mul_nodes"])),
        ("linear weights", f"{_mb(before)} -> {_mb(after)}{ratio}"),
        ("ONNX files", f"{_mb(s['onnx_bytes_before'])} (float) -> {_mb(s['onnx_bytes_after'])}"),
    ]
    t = s["timings_s"]
    rows.append(("time", " | ".join(f"{k} {v:.1f} s" for k, v in t.items())
                 + f" | total {sum(t.values()):.1f} s"))
    width = max(len(k) for k, _ in rows)
    print("sinq-export model: done")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def _run_model(args: argparse.Namespace) -> int:
    from .export import ExportError, export_causal_lm

    config = config_from_args(args)
    try:
        result = export_causal_lm(
            args.model_dir, args.output, config, overwrite=args.overwrite,
            progress=not args.json, reference=not args.no_reference,
            float_export_dir=args.float_export,
        )
    except ExportError as exc:
        raise UsageError(str(exc)) from exc
    summary = result.summary()
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        _print_model_summary(summary)
    return EXIT_OK


# --- validate: parity torch vs onnxruntime (issue: validator) ------------------------------

def _add_validate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate", help="check an exported model against its PyTorch reference",
        description="Feed identical real-text tokens (prefill, then greedy decode steps through "
                    "the KV cache) to OUT_DIR/reference (PyTorch) and OUT_DIR/model.onnx "
                    "(onnxruntime); compare logits end to end and every quantized layer. Exit 0: "
                    "every provider that ran passed (unavailable ones are reported as skipped, "
                    "never as passed); 1: parity failure; 2: bad usage, or none of the "
                    "requested providers is available. Without reference/ it falls back to "
                    "ONNX-only per-op NumPy checks and says so.")
    p.add_argument("out_dir", help="a folder written by `sinq-export model`")
    p.add_argument("--providers", default="cpu",
                   help="comma list of cpu, cuda, tensorrt, rocm, dml, ... or 'all' (default cpu)")
    p.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4), default=None,
                   help="override MatMulNBits accuracy_level (default: as exported)")
    p.add_argument("--tokens", type=int, default=256, help="prefill tokens of real text (default 256)")
    p.add_argument("--decode-steps", type=int, default=8, help="greedy decode steps (default 8)")
    p.add_argument("--text", default="wikipedia", help="real text id (default wikipedia)")
    p.add_argument("--json", metavar="PATH", default=None, help="write the report as JSON ('-': stdout)")
    p.add_argument("--plot", metavar="PATH", default=None, help="write a PNG of per-layer error")


def _run_validate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .validate import ValidationError, format_report, plot_layers, validate

    try:
        report = validate(args.out_dir, providers=args.providers, accuracy_level=args.accuracy_level,
                          tokens=args.tokens, decode_steps=args.decode_steps, text=args.text)
    except ValidationError as exc:
        raise UsageError(str(exc)) from exc
    if args.json != "-":
        print(format_report(report))
    if args.json:
        text = json.dumps(report.to_dict(), indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(text + "\n")
    if args.plot:
        plot_layers(report, args.plot)
    if report.status == "skipped":
        print("sinq-export validate: error: none of the requested providers is available "
              f"({', '.join(p.provider for p in report.providers)}); nothing was validated",
              file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK if report.status == "passed" else EXIT_FAILED


# --- eval: perplexity on real text (issue: validator) -------------------------------------

def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="perplexity on real text",
        description="Perplexity on the first --windows non-overlapping --length-token windows "
                    "(stride = length) of a real text, add_special_tokens=False, each window "
                    "scored from an empty context. A model folder (or none: the bundled "
                    "SmolLM2) is evaluated in PyTorch for each --compare method and --bits; an "
                    "export folder is evaluated in onnxruntime (or --backend torch: its "
                    "reference/).")
    p.add_argument("model", nargs="?", default=None,
                   help="HF model folder (default: bundled SmolLM2) or a `sinq-export model` folder")
    p.add_argument("--backend", choices=("torch", "onnxruntime"), default=None,
                   help="default: onnxruntime for an export folder, torch for a model folder")
    p.add_argument("--text", default="wikipedia", help="real text id (default wikipedia)")
    p.add_argument("--windows", type=int, default=4, help="number of windows (default 4)")
    p.add_argument("--length", type=int, default=512, help="tokens per window = stride (default 512)")
    p.add_argument("--compare", default="float,rtn,sinq",
                   help="methods for a model folder: float,rtn,sinq (default all three)")
    p.add_argument("--bits", default="4", help="comma list of widths for rtn/sinq (default 4)")
    p.add_argument("--group-size", type=int, default=64, help="group size (default 64)")
    p.add_argument("--provider", default="cpu", help="onnxruntime provider (default cpu)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _run_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import eval as ev
    from .validate import EXPORT_META_FILE, ValidationError

    if args.windows < 1 or args.length < 2:
        raise UsageError("--windows must be >= 1 and --length >= 2")
    is_export = args.model is not None and (Path(args.model) / EXPORT_META_FILE).is_file()
    try:
        if is_export:
            table = ev.evaluate_export(args.model, backend=args.backend or "onnxruntime",
                                       text=args.text, n_windows=args.windows, length=args.length,
                                       provider=args.provider)
        else:
            if args.backend == "onnxruntime":
                raise UsageError(f"{args.model or 'the default model'} is not an export folder; "
                                 "export it first (`sinq-export model ... -o OUT`) and pass OUT")
            check_group = SinqConfig(group_size=args.group_size)  # validates the group size
            table = ev.compare(args.model, methods=ev.parse_methods(args.compare),
                               bits=ev.parse_bits(args.bits), group_size=check_group.group_size,
                               text=args.text, n_windows=args.windows, length=args.length)
    except (ValueError, ValidationError) as exc:
        if isinstance(exc, (UsageError, ConfigError)):
            raise
        raise UsageError(str(exc)) from exc
    if args.json:
        print(json.dumps(table.to_dict(), indent=2))
    else:
        print(table.to_markdown())
    return EXIT_OK


COMMANDS = {
    "quantize": (_add_quantize, _run_quantize),
    "model": (_add_model, _run_model),
    "validate": (_add_validate, _run_validate),
    "eval": (_add_eval, _run_eval),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sinq-export",
        description="SINQ-quantize a PyTorch / Hugging Face model and export it to onnxruntime.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def _known_errors() -> tuple[type[BaseException], ...]:
    from .io import OutputExistsError
    from .quant.core import QuantizationError

    errors: list[type[BaseException]] = [
        UsageError, ConfigError, QuantizationError, OutputExistsError, FileNotFoundError,
    ]
    try:
        from .models import ModelLoadError

        errors.append(ModelLoadError)
    except ImportError:
        pass
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _, run = COMMANDS[args.command]
    try:
        return run(args)
    except _known_errors() as exc:
        print(f"sinq-export {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
