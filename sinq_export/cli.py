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
                 "lm_head_bits"):
        if getattr(args, name, None) is not None:
            fields[name] = getattr(args, name)
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
    from .nn import quantize_model, save_quantized

    config = config_from_args(args)
    model, tokenizer = load_causal_lm(args.model_dir)
    report = quantize_model(model, config, progress=not args.json, measure_error=True)
    save_quantized(model, args.output, config, tokenizer=tokenizer, overwrite=args.overwrite)
    errors = [la.rel_error for la in report.layers]
    summary = {
        "output": str(args.output),
        "layers": report.n_layers,
        "seconds": round(report.seconds, 3),
        "mean_rel_error": sum(errors) / max(len(errors), 1),
        "config": config.to_dict(),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"quantized {summary['layers']} linears in {summary['seconds']} s, mean relative "
              f"error {summary['mean_rel_error']:.4f} -> {args.output}")
    return EXIT_OK


# --- model: quantize + export to ONNX (issue: exporter) ------------------------------------

def _add_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="quantize a model and export it to ONNX")
    p.add_argument("model_dir", nargs="?", default=None,
                   help="HF causal-LM folder (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--target", choices=["onnx"], default="onnx")
    p.add_argument("--overwrite", action="store_true")
    _add_quant_args(p)


def _run_model(args: argparse.Namespace) -> int:
    raise UsageError("the ONNX exporter is not available in this build yet")


# --- validate: parity torch vs onnxruntime (issue: validator) ------------------------------

def _add_validate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check an exported model against its PyTorch reference")
    p.add_argument("out_dir", help="a folder written by `sinq-export model`")


def _run_validate(args: argparse.Namespace) -> int:
    raise UsageError("the validator is not available in this build yet")


# --- eval: perplexity on real text (issue: validator) -------------------------------------

def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity on real text")
    p.add_argument("model", nargs="?", default=None, help="model folder or export folder")


def _run_eval(args: argparse.Namespace) -> int:
    raise UsageError("eval is not available in this build yet")


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
