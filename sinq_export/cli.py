"""`sinq-export` command line: flags -> configs / preset -> one library call (`api`) -> print.

Each subcommand has an ``_add_<name>`` (argparse) and a ``_run_<name>`` (calls the library,
prints a table or JSON, returns the exit code). `main` runs it through `outcome.run_command`,
which turns every error into one line on stderr and the exit code of `EXIT_CODES_HELP`.

The library (`api`) is imported by each ``_run_<name>``, not here: it loads onnx, onnxruntime
and transformers, which ``--help`` and a bad flag do not need (lazy for start-up time).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, NoReturn

from . import __version__, config, outcome, verbosity
from .contract import CUSTOM_DOMAIN, CUSTOM_OP, MANIFEST_FILE, REFERENCE_DIR
from .outcome import EXIT_CODES_HELP, EXIT_OK, EXIT_USAGE
from .presets import DEFAULT_PRESET, PRESETS, Preset, get_preset

MODEL_HELP = ("HF causal-LM folder, or a GGUF file / a folder holding one (converted once into "
              "the cache); default: the bundled SmolLM2-135M-Instruct")
PRESETS_HELP = "presets (--preset NAME; every other flag overrides one of its settings):\n" + "\n".join(
    f"  {name:<11} {p.summary}" for name, p in PRESETS.items())
VERBOSE_HELP = "also show the dependencies' warnings, log lines and progress bars (default: only ours)"


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bits", type=int, choices=config.QUANT_BITS, help="code width (default 4)")
    p.add_argument("--group-size", type=int, help="block size along K (16-256, power of 2; default 64)")
    p.add_argument("--method", choices=config.METHODS, help="sinq (default) or rtn baseline")
    p.add_argument("--symmetric", action="store_true", default=None, help="fixed mid-range zero point")
    p.add_argument("--kurtosis-gate", type=float,
                   help="fall back to RTN for layers whose kurtosis exceeds this (off by default)")
    p.add_argument("--exclude", action="append", metavar="REGEX",
                   help="keep matching modules in float (default: lm_head); repeatable")
    p.add_argument("--override", action="append", dest="overrides", metavar="REGEX=BITS",
                   help="per-layer bit width, e.g. 'down_proj=8'; repeatable")
    p.add_argument("--energy-refit", type=int, metavar="N",
                   help="weighted scale refits per group, each weight weighted by its input channel's "
                        f"energy, measured on random token ids (default {config.ENERGY_REFIT}; 0 = "
                        "weight-only SINQ, no forward pass)")
    p.add_argument("--probe-tokens", type=int, metavar="N", help="random token ids that give the input "
                   f"energies (default {config.PROBE_TOKENS})")
    p.add_argument("--calibrate", action="store_true", default=None,
                   help="calibrated SINQ: A-SINQ activation-aware t + GPTQ rounding, from Wikipedia "
                        "windows disjoint from the evaluation windows (opt-in)")
    p.add_argument("--calibration-windows", type=int, metavar="N", help="calibration windows of 512 "
                   "tokens (default 4 for a head calibrated alone; with --calibrate 8, or enough "
                   "for 1.5x the widest linear's inputs)")
    p.add_argument("--calibration-dtype", choices=config.CALIBRATION_DTYPES,
                   help="precision of the calibration forwards (default auto: bfloat16 where the CPU "
                        "has bfloat16 instructions, else float32)")
    p.add_argument("--avg-bits", type=float, metavar="B",
                   help="pick a width and group size per linear for the bytes of uniform B-bit codes at "
                        "--group-size: the widest width that fits and the next one, at half / once / "
                        "twice the group (overrides --bits per layer)")
    p.add_argument("--max-size", type=float, dest="max_size_mb", metavar="MB", help="pick widths and "
                   "group sizes per linear so the quantized linears fit in MB megabytes")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of a table")


def _given(args: argparse.Namespace, config_class: type) -> dict[str, Any]:
    """The fields of ``config_class`` the flags set (each flag's dest is its field's name)."""
    return config.given_fields({f.name: getattr(args, f.name, None) for f in fields(config_class)})


def config_from_args(args: argparse.Namespace) -> config.SinqConfig:
    """`quantize`: the one config object from parsed flags (validated once, by SinqConfig)."""
    return config.SinqConfig(**_given(args, config.SinqConfig))


def preset_from_args(args: argparse.Namespace) -> Preset:
    """`model`: the preset ``--preset`` names, with each flag given setting its field."""
    return get_preset(args.preset).override(sinq=_given(args, config.SinqConfig),
                                            graph=_given(args, config.GraphConfig),
                                            tie_o_proj=args.tie_o_proj)


# --- quantize: PyTorch-only quantization, saved as safetensors + JSON ---------------------

def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a model in PyTorch and save it (no ONNX)")
    p.add_argument("model_dir", nargs="?", help=MODEL_HELP)
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true")
    _add_quant_args(p)


def _run_quantize(args: argparse.Namespace) -> int:
    from . import api  # lazy for start-up time (see the module docstring)

    summary = api.quantize_to_folder(args.model_dir, args.output, config_from_args(args),
                                     overwrite=args.overwrite, progress=not args.json)
    print(json.dumps(summary, indent=2) if args.json else api.quantize_summary_line(summary))
    return EXIT_OK


# --- model: quantize + export to ONNX -------------------------------------------------------

def _add_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="quantize a model and export it to ONNX",
                       description=PRESETS_HELP)
    p.add_argument("model_dir", nargs="?", help=MODEL_HELP)
    p.add_argument("--preset", choices=PRESETS, default=DEFAULT_PRESET,
                   help="the settings every other flag overrides (default: default; see above)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--target", choices=["onnx"], default="onnx")
    p.add_argument("--overwrite", action="store_true")
    _add_quant_args(p)
    p.add_argument("--runtime", choices=config.RUNTIMES, help="stock: MatMulNBits only (3/5/6-bit "
                   f"codes in 4/8-bit containers); custom: {CUSTOM_DOMAIN}::{CUSTOM_OP} where stock "
                   "cannot run the width")
    p.add_argument("--accuracy-level", type=config.arg_type(config.parse_accuracy_level),
                   metavar="{auto,0,1,2,3,4}",
                   help="MatMulNBits accuracy_level (0 = fp32 compute, exact; 4 = int8 activations: ~2x "
                        "faster decode; auto, the default: 4 on each linear whose measured int8 error "
                        "is within tolerance, 0 on the others)")
    p.add_argument("--dtype", choices=config.DTYPES, help="graph float type (default fp32)")
    p.add_argument("--col-scale", choices=config.COL_SCALE_MODES, help="column scale t: explicit Mul, "
                   "fold into norms / up_proj rows where exact (default), or fused into the custom op")
    p.add_argument("--shared-col-scale", nargs="?", const="all", choices=config.SHARED_COL_SCALES,
                   help="one Sinkhorn t for gate/up ('mlp', the default; 'none' with --calibrate) or also "
                        "for q/k/v ('all', the value without argument; packs q/k/v into one node), or a "
                        "t per linear ('none'); a shared t folds into the norms")
    p.add_argument("--tie-o-proj", action="store_true", default=None,
                   help="tie o_proj's t across the query heads of each kv head, so it folds into "
                        "v_proj's rows: one Mul less per layer (+0.16 perplexity on SmolLM2)")
    p.add_argument("--lm-head-bits", type=config.arg_type(config.parse_width, config.QUANT_BITS),
                   help="quantize lm_head at this width, or 'float' (default 4, calibrated)")
    p.add_argument("--lm-head-group-size", type=int,
                   help="block size for lm_head (default 32 below 8 bits, else --group-size)")
    p.add_argument("--calibrate-head", action=argparse.BooleanOptionalAction,
                   help="calibrate the lm_head alone (A-SINQ + GPTQ on the final hidden states of the "
                        "calibration-free decoder; a 4-bit head then costs +0.4 perplexity instead of "
                        "+2.6; default: on below 8 bits)")
    p.add_argument("--embedding-bits", type=config.arg_type(config.parse_width, config.EMBEDDING_BITS),
                   help="store the token embedding quantized at 4 or 8 bits (GatherBlockQuantized; one "
                        "table with a tied lm_head of the same width), or 'float' (default 4)")
    p.add_argument("--table-ops", choices=config.TABLE_OPS_CHOICES,
                   help="how the graph reads a quantized table: 'contrib' (onnxruntime's "
                        "GatherBlockQuantized, default) or 'standard' (Gather and standard ONNX ops: "
                        "for runtimes without that op, e.g. transformers.js in a browser)")
    p.add_argument("--with-reference", action="store_true", help="also write OUT_DIR/reference (the "
                   "PyTorch model) for validating the export away from the source folder; loads the "
                   "float model")
    p.add_argument("--allow-unquantized", action="store_true",
                   help="accept an export in which no linear is quantized")


def _run_model(args: argparse.Namespace) -> int:
    from . import api  # lazy for start-up time (see the module docstring)

    result = api.export_model(args.model_dir, args.output, preset_from_args(args),
                              overwrite=args.overwrite, progress=not args.json,
                              with_reference=args.with_reference,
                              allow_unquantized=args.allow_unquantized)
    summary = result.summary()
    if summary["warnings"]:  # one line, like an error
        print(f"sinq-export model: warning: {'; '.join(summary['warnings'])}", file=sys.stderr)
    print(json.dumps(summary, indent=2, sort_keys=True) if args.json
          else "\n".join(api.model_summary_lines(summary)))
    return EXIT_OK


# --- validate: parity torch vs onnxruntime -------------------------------------------------

def _add_validate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate", help="check an exported model against its PyTorch reference",
        description="Feed identical real-text tokens (prefill, then greedy decode steps through the KV "
                    "cache) to the PyTorch reference (the source model with the export's own quantized "
                    "weights) and the exported graph (onnxruntime); compare logits end to end and every "
                    "quantized layer. Exit 0: every provider that ran passed (unavailable ones are "
                    "reported as skipped, never as passed); 1: parity failure; 2: bad usage, or none of "
                    "the requested providers is available. Without the source model (or "
                    "OUT_DIR/reference) it falls back to ONNX-only per-op NumPy checks and says so.")
    p.add_argument("out_dir", help="a folder written by `sinq-export model`")
    p.add_argument("--providers", default="cpu",
                   help="comma list of cpu, cuda, tensorrt, rocm, dml, ... or 'all' (default cpu); "
                        "JavaScript runtimes: node (onnxruntime-node), wasm and web-webgpu "
                        "(onnxruntime-web in headless Chromium; docs/runtimes.md)")
    p.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4),
                   help="override MatMulNBits accuracy_level (default: as exported)")
    p.add_argument("--tokens", type=int, default=256, help="prefill tokens of real text (default 256)")
    p.add_argument("--decode-steps", type=int, default=8, help="greedy decode steps (default 8)")
    p.add_argument("--text", default="wikipedia", help="real text id (default wikipedia)")
    p.add_argument("--source", metavar="DIR", help="the model folder the export was made from (default: "
                   f"the path recorded in {MANIFEST_FILE}, else OUT_DIR/{REFERENCE_DIR} of an export made "
                   "--with-reference)")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON ('-': stdout)")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of per-layer error")


def _run_validate(args: argparse.Namespace) -> int:
    from . import api  # lazy for start-up time (see the module docstring)
    from .validate import format_report  # lazy for start-up time, as api

    report = api.validate_to_files(
        args.out_dir, json_path=args.json, plot_path=args.plot, providers=args.providers,
        accuracy_level=args.accuracy_level, tokens=args.tokens, decode_steps=args.decode_steps,
        text=args.text, source=args.source)
    print(json.dumps(report.to_dict(), indent=2) if args.json == "-" else format_report(report))
    end = outcome.validation_exit(report.status, [p.provider for p in report.providers])
    if end.message:
        print(f"sinq-export validate: error: {end.message}", file=sys.stderr)
    return end.code


# --- eval: perplexity on real text ---------------------------------------------------------

def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="perplexity on real text",
        description="Perplexity on the first --windows non-overlapping --length-token windows (stride = "
                    "length) of a real text, add_special_tokens=False, each window scored from an empty "
                    "context. A model folder (or none: the bundled SmolLM2) is evaluated in PyTorch for "
                    "each --compare method and --bits; an export folder is evaluated in onnxruntime (or "
                    "--backend torch: its reference/).")
    p.add_argument("model", nargs="?", help="HF model folder or GGUF file (default: bundled SmolLM2), or "
                   "a `sinq-export model` folder")
    p.add_argument("--backend", choices=("torch", "onnxruntime"),
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
    from . import api  # lazy for start-up time (see the module docstring)

    table = api.evaluate(args.model, backend=args.backend, text=args.text, n_windows=args.windows,
                         length=args.length, methods=args.compare, bits=args.bits,
                         group_size=args.group_size, provider=args.provider)
    print(json.dumps(table.to_dict(), indent=2) if args.json else table.to_markdown())
    return EXIT_OK


COMMANDS = {
    "quantize": (_add_quantize, _run_quantize),
    "model": (_add_model, _run_model),
    "validate": (_add_validate, _run_validate),
    "eval": (_add_eval, _run_eval),
}


class _OneLineErrors(argparse.ArgumentParser):
    """argparse's own errors (a bad --bits, --dtype, ...) as the one line every other error
    is, exit 2; the usage block is what --help is for."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrors(
        prog="sinq-export",
        description="SINQ-quantize a PyTorch / Hugging Face model and export it to onnxruntime.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    for name, (add, run) in COMMANDS.items():
        add(sub)
        p = sub.choices[name]
        p.set_defaults(run=run)
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help=VERBOSE_HELP)  # also accepted after the subcommand
        p.epilog, p.formatter_class = EXIT_CODES_HELP, argparse.RawDescriptionHelpFormatter
    return parser


def _output_paths(args: argparse.Namespace) -> list[Path]:
    """The paths a command writes (an OS error under one of them is an output error)."""
    paths = [getattr(args, name, None) for name in ("output", "plot")]
    if getattr(args, "json", None) not in (None, False, True, "-"):
        paths.append(args.json)
    return [Path(p).expanduser().absolute() for p in paths if p]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; every outcome is an exit code (see `EXIT_CODES_HELP`)."""
    args = build_parser().parse_args(argv)
    with outcome.signals_as_exceptions(), verbosity.cli_output(args.verbose):
        return outcome.run_command(f"sinq-export {args.command}", lambda: args.run(args),
                                   lambda: _output_paths(args))


if __name__ == "__main__":
    sys.exit(main())
