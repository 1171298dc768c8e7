"""`sinq-export` command line: a thin shell over the library API.

Each subcommand has an ``_add_<name>`` (argparse) and a ``_run_<name>`` (calls the library,
prints a table or JSON, returns the exit code). `main` turns every error into one line on
stderr and the exit code of `EXIT_CODES_HELP`; SIGINT and SIGTERM raise `Interrupted` so that
every ``finally`` and context manager runs (temp folders are removed) before it exits.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import signal
import sys
import traceback
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import NoReturn

from . import __version__, verbosity
from .config import (
    CALIBRATION_DTYPES,
    ENERGY_REFIT,
    METHODS,
    PROBE_TOKENS,
    QUANT_BITS,
    SHARED_COL_SCALES,
    ConfigError,
    SinqConfig,
)
from .gguf import resolve_model_input
from .presets import DEFAULT_PRESET, PRESETS, Preset, get_preset

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_OUTPUT, EXIT_INTERNAL = 0, 1, 2, 3, 4
EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM  # 130, 143, as shells do
MODEL_HELP = ("HF causal-LM folder, or a GGUF file / a folder holding one (converted once into "
              "the cache); default: the bundled SmolLM2-135M-Instruct")
PRESETS_HELP = "presets (--preset NAME; every other flag overrides one of its settings):\n" + "\n".join(
    f"  {name:<11} {p.summary}" for name, p in PRESETS.items())
VERBOSE_HELP = "also show the dependencies' warnings, log lines and progress bars (default: only ours)"

EXIT_CODES_HELP = """\
exit codes (model, quantize, validate, eval):
  0    success
  1    the numbers disagree (validate: parity past tolerance) and nothing else
  2    bad usage or bad input: flags, a missing/damaged/unsupported model or export folder,
       an output folder that exists (without --overwrite) or is not ours to replace
  3    the output cannot be written: permission denied, read-only file system, disk full or
       file too large, a parent path that is a file (the line names the path and the errno)
  4    internal error (a bug: the traceback is printed; please report it)
  130  interrupted by SIGINT (Ctrl-C)
  143  interrupted by SIGTERM (kill, timeout, a CI cancel)
       on 130/143 the partial output and temp folders are removed; an earlier output stays
"""


class UsageError(ValueError):
    """Bad command-line input that argparse cannot catch by itself."""


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bits", type=int, choices=QUANT_BITS, help="code width (default 4)")
    p.add_argument("--group-size", type=int,
                   help="block size along K (16-256, power of 2; default 64)")
    p.add_argument("--method", choices=METHODS, help="sinq (default) or rtn baseline")
    p.add_argument("--symmetric", action="store_true", default=None,
                   help="fixed mid-range zero point")
    p.add_argument("--kurtosis-gate", type=float, default=None,
                   help="fall back to RTN for layers whose kurtosis exceeds this (off by default)")
    p.add_argument("--exclude", action="append", default=None, metavar="REGEX",
                   help="keep matching modules in float (default: lm_head); repeatable")
    p.add_argument("--override", action="append", default=[], metavar="REGEX=BITS",
                   help="per-layer bit width, e.g. 'down_proj=8'; repeatable")
    p.add_argument("--energy-refit", type=int, default=None, metavar="N",
                   help="weighted scale refits per group, each weight weighted by its input "
                        "channel's energy, measured on random token ids (default "
                        f"{ENERGY_REFIT}; 0 = weight-only SINQ, no forward pass)")
    p.add_argument("--probe-tokens", type=int, default=None, metavar="N",
                   help=f"random token ids that give the input energies (default "
                        f"{PROBE_TOKENS})")
    p.add_argument("--calibrate", action="store_true",
                   help="calibrated SINQ: A-SINQ activation-aware t + GPTQ rounding, from "
                        "Wikipedia windows disjoint from the evaluation windows (opt-in)")
    p.add_argument("--calibration-windows", type=int, default=None, metavar="N",
                   help="calibration windows of 512 tokens (default 8, or enough for 1.5x "
                        "the widest calibrated linear's inputs)")
    p.add_argument("--calibration-dtype", choices=CALIBRATION_DTYPES, default=None,
                   help="precision of the calibration forwards (default auto: bfloat16 where "
                        "the CPU has bfloat16 instructions, else float32)")
    p.add_argument("--avg-bits", type=float, default=None, metavar="B",
                   help="pick a width and group size per linear for the bytes of uniform B-bit "
                        "codes at --group-size: the widest width that fits and the next one, at "
                        "half / once / twice the group (overrides --bits per layer)")
    p.add_argument("--max-size", type=float, default=None, metavar="MB",
                   help="pick widths and group sizes per linear so the quantized linears fit "
                        "in MB megabytes")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of a table")


def _parse_overrides(items: Sequence[str]) -> tuple[tuple[str, int], ...]:
    out = []
    for item in items:
        pattern, sep, bits = item.rpartition("=")
        if not sep or not pattern or not bits.isdigit():
            raise UsageError(f"--override {item!r}: expected REGEX=BITS, e.g. 'down_proj=8'")
        out.append((pattern, int(bits)))
    return tuple(out)


# flags that set a SinqConfig / GraphConfig field of the same name when given
_SINQ_FLAGS = ("bits", "group_size", "method", "symmetric", "kurtosis_gate", "exclude",
               "lm_head_group_size", "calibration_windows", "calibration_dtype", "avg_bits",
               "energy_refit", "probe_tokens", "calibrate_head", "shared_col_scale")
_GRAPH_FLAGS = ("runtime", "accuracy_level", "dtype", "col_scale", "embedding_bits")


def _sinq_fields(args: argparse.Namespace) -> dict:
    """The `SinqConfig` fields the command line sets (flags left out are not in it)."""
    fields = {n: getattr(args, n) for n in _SINQ_FLAGS if getattr(args, n, None) is not None}
    if "exclude" in fields:
        fields["exclude"] = tuple(fields["exclude"])
    if args.override:
        fields["overrides"] = _parse_overrides(args.override)
    if getattr(args, "lm_head_bits", None) is not None:
        fields["lm_head_bits"] = _or_float(args.lm_head_bits)
    if getattr(args, "calibrate", False):
        fields["calibrate"] = True
    if getattr(args, "max_size", None) is not None:
        fields["max_size_mb"] = args.max_size
    return fields


def config_from_args(args: argparse.Namespace) -> SinqConfig:
    """`quantize`: the one config object from parsed flags (validated once, by SinqConfig)."""
    return SinqConfig(**_sinq_fields(args))


def preset_from_args(args: argparse.Namespace) -> Preset:
    """`model`: the preset ``--preset`` names, with each flag given setting its field."""
    graph = {n: _or_float(getattr(args, n)) for n in _GRAPH_FLAGS
             if getattr(args, n, None) is not None}
    return get_preset(args.preset).override(sinq=_sinq_fields(args), graph=graph,
                                            tie_o_proj=args.tie_o_proj or None)


FLOAT = "float"


def _or_float(value: int | str) -> int | None:
    return None if value == FLOAT else value


def _width(choices: Sequence[int]):  # noqa: ANN202
    """argparse type: a bit width from ``choices`` or 'float' (keep the tensor in float)."""
    def parse(text: str) -> int | str:
        if text == FLOAT:
            return FLOAT
        if text.isdigit() and int(text) in choices:
            return int(text)
        raise argparse.ArgumentTypeError(f"{text!r}: choose one of {', '.join(map(str, choices))} "
                                         "or 'float'")
    return parse


# --- quantize: PyTorch-only quantization, saved as safetensors + JSON ---------------------

def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a model in PyTorch and save it (no ONNX)")
    p.add_argument("model_dir", nargs="?", default=None, help=MODEL_HELP)
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true")
    _add_quant_args(p)


def _run_quantize(args: argparse.Namespace) -> int:
    from .io import atomic_output_dir
    from .models import default_model_dir, load_causal_lm
    from .nn import QUANTIZED_MARKER, plan_quantization, quantize_model, write_quantized

    config = config_from_args(args)
    source = resolve_model_input(args.model_dir) or default_model_dir()
    # The output is checked and its temp folder made before the minutes of work, so a refused
    # or unwritable -o fails at once; the temp folder goes on any error or signal.
    with atomic_output_dir(args.output, args.overwrite, marker=QUANTIZED_MARKER,
                           protect=[source]) as tmp:
        model, tokenizer = load_causal_lm(source)
        plan = plan_quantization(model, tokenizer, config)
        config = plan.config
        report = quantize_model(model, config, progress=not args.json, measure_error=True,
                                calibration=plan.calibration)
        write_quantized(model, tmp, config, tokenizer=tokenizer)
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
    from .config import ACCURACY_LEVELS, COL_SCALE_MODES, DTYPES, EMBEDDING_BITS, RUNTIMES

    p = sub.add_parser("model", help="quantize a model and export it to ONNX",
                       description=PRESETS_HELP)
    p.add_argument("model_dir", nargs="?", default=None, help=MODEL_HELP)
    p.add_argument("--preset", choices=PRESETS, default=DEFAULT_PRESET,
                   help="the settings every other flag overrides (default: default; see above)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--target", choices=["onnx"], default="onnx")
    p.add_argument("--overwrite", action="store_true")
    _add_quant_args(p)
    p.add_argument("--runtime", choices=RUNTIMES, default=None,
                   help="stock: MatMulNBits only (3/5/6-bit codes in 4/8-bit containers); "
                        "custom: sinq.ops::SinqMatMulNBits where stock cannot run the width")
    p.add_argument("--accuracy-level", type=int, choices=ACCURACY_LEVELS,
                   help="MatMulNBits accuracy_level (0 = fp32 compute, exact; 4 = int8 "
                        "activations, the default: ~2x faster decode)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="graph float type (default fp32)")
    p.add_argument("--col-scale", choices=COL_SCALE_MODES,
                   help="column scale t: explicit Mul, fold into norms / up_proj rows where "
                        "exact (default), or fused into the custom op")
    p.add_argument("--shared-col-scale", nargs="?", const="all", choices=SHARED_COL_SCALES,
                   default=None,
                   help="one Sinkhorn t for gate/up ('mlp', the default; 'none' with --calibrate) "
                        "or also for q/k/v ('all', the value without argument; packs q/k/v into "
                        "one node), or a t per linear ('none'); a shared t folds into the norms")
    p.add_argument("--tie-o-proj", action="store_true",
                   help="tie o_proj's t across the query heads of each kv head, so it folds into "
                        "v_proj's rows: one Mul less per layer (+0.16 perplexity on SmolLM2)")
    p.add_argument("--lm-head-bits", type=_width(QUANT_BITS),
                   help="quantize lm_head at this width, or 'float' (default 4, calibrated)")
    p.add_argument("--lm-head-group-size", type=int, default=None,
                   help="block size for lm_head (default 32 below 8 bits, else --group-size)")
    p.add_argument("--calibrate-head", action=argparse.BooleanOptionalAction, default=None,
                   help="calibrate the lm_head alone (A-SINQ + GPTQ on the final hidden states "
                        "of the calibration-free decoder; a 4-bit head then costs +0.4 "
                        "perplexity instead of +2.6; default: on below 8 bits)")
    p.add_argument("--embedding-bits", type=_width(EMBEDDING_BITS),
                   help="store the token embedding quantized at 4 or 8 bits (GatherBlockQuantized; "
                        "one table with a tied lm_head of the same width), or 'float' (default 8)")
    p.add_argument("--with-reference", action="store_true",
                   help="also write OUT_DIR/reference (the PyTorch model) for validating the "
                        "export away from the source folder; loads the float model")
    p.add_argument("--allow-unquantized", action="store_true",
                   help="accept an export in which no linear is quantized")


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.1f} MB"


def _print_model_summary(s: dict) -> None:
    c, g = s["config"], s["graph"]
    bits = ", ".join(f"{b}-bit: {n}" for b, n in s["layers_by_bits"].items())
    before, after = s["linear_weight_bytes_before"], s["linear_weight_bytes_after"]
    ratio = f" ({after / before:.3f}x)" if before else ""
    rows = [
        ("output", s["output"]),
        ("model", f"{s['source_model']} ({s['kind']})"),
        ("method", f"{c['method']} {c['bits']}-bit, group {c['group_size']}, runtime {g['runtime']}, "
                   f"accuracy_level {g['accuracy_level']}, {g['dtype']}, col_scale {g['col_scale']}"),
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
    print("sinq-export model: done")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def _require_custom_ops(graph: Mapping[str, object]) -> None:
    """Fail before any work when the graph needs the optional sinq.ops library and it is not built."""
    wants = [flag for flag, on in (("--runtime custom", graph.get("runtime") == "custom"),
                                   ("--col-scale fused", graph.get("col_scale") == "fused"))
             if on]
    if wants:
        from . import runtime_ops

        runtime_ops.require(" / ".join(wants))


def _run_model(args: argparse.Namespace) -> int:
    from .export import ExportError, export_causal_lm

    preset = preset_from_args(args)
    preset.configs()  # a bad combination of flags is refused before the model is looked at
    _require_custom_ops(preset.graph)
    source = resolve_model_input(args.model_dir)
    try:
        result = export_causal_lm(
            source, args.output, preset=preset, overwrite=args.overwrite, progress=not args.json,
            with_reference=args.with_reference, allow_unquantized=args.allow_unquantized,
        )
    except ExportError as exc:
        raise UsageError(str(exc)) from exc
    summary = result.summary()
    if summary["warnings"]:  # one line, like an error
        print(f"sinq-export model: warning: {'; '.join(summary['warnings'])}", file=sys.stderr)
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
                   help="comma list of cpu, cuda, tensorrt, rocm, dml, ... or 'all' (default cpu); "
                        "JavaScript runtimes: node (onnxruntime-node), wasm and web-webgpu "
                        "(onnxruntime-web in headless Chromium; docs/runtimes.md)")
    p.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4), default=None,
                   help="override MatMulNBits accuracy_level (default: as exported)")
    p.add_argument("--tokens", type=int, default=256, help="prefill tokens of real text (default 256)")
    p.add_argument("--decode-steps", type=int, default=8, help="greedy decode steps (default 8)")
    p.add_argument("--text", default="wikipedia", help="real text id (default wikipedia)")
    p.add_argument("--source", metavar="DIR", default=None,
                   help="the model folder the export was made from (default: the path recorded "
                        "in sinq_export.json, else OUT_DIR/reference)")
    p.add_argument("--json", metavar="PATH", default=None, help="write the report as JSON ('-': stdout)")
    p.add_argument("--plot", metavar="PATH", default=None, help="write a PNG of per-layer error")


def _check_report_path(path: str | None, flag: str) -> None:
    """Refuse a report path that cannot be a file *before* minutes of work (exit 2; exit 3
    when a parent of it is a file)."""
    from .io import check_parents

    if path is None or path == "-":
        return
    if Path(path).is_dir():
        raise UsageError(f"{flag} {path}: is a folder (expected a file path)")
    check_parents(Path(path).expanduser().absolute())


def _run_validate(args: argparse.Namespace) -> int:
    from .validate import ValidationError, format_report, plot_layers, validate

    _check_report_path(args.json, "--json")
    _check_report_path(args.plot, "--plot")
    try:
        report = validate(args.out_dir, providers=args.providers, accuracy_level=args.accuracy_level,
                          tokens=args.tokens, decode_steps=args.decode_steps, text=args.text,
                          source=args.source)
    except ValidationError as exc:
        raise UsageError(str(exc)) from exc
    # Files first, verdict last: a failing write (exit 3) never follows a printed PASSED.
    text = json.dumps(report.to_dict(), indent=2)
    if args.json and args.json != "-":
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    if args.plot:
        plot_layers(report, args.plot)
    if args.json == "-":
        print(text)
    else:
        print(format_report(report))
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
                   help="HF model folder or GGUF file (default: bundled SmolLM2), or a "
                        "`sinq-export model` folder")
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
            table = ev.compare(resolve_model_input(args.model), methods=ev.parse_methods(args.compare),
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
    for add, _ in COMMANDS.values():
        add(sub)
    for p in sub.choices.values():  # also accepted after the subcommand
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help=VERBOSE_HELP)
        p.epilog = EXIT_CODES_HELP
        p.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived. A KeyboardInterrupt, so ``except Exception`` never eats it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# Signals received during this `main` call. The handler's exception can be swallowed on its
# way up: raised inside a C extension's call (numpy's ``tofile`` under onnx_ir's writer), it
# comes out as that extension's own error (a TypeError). Whatever surfaces after a signal is
# therefore reported as the interruption it is.
_RECEIVED: list[int] = []


def _raise_interrupted(signum: int, frame: object) -> None:
    # One signal is enough: later ones are ignored so that the cleanup it starts can finish.
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    _RECEIVED.append(signum)
    raise Interrupted(signum)


@contextlib.contextmanager
def _signals_as_exceptions() -> Iterator[None]:
    """SIGINT/SIGTERM -> `Interrupted`; SIGXFSZ ignored so a ``ulimit -f`` is an EFBIG error.

    Installed only in the main thread (Python delivers signals there); restored on exit.
    """
    wanted = {signal.SIGINT: _raise_interrupted, signal.SIGTERM: _raise_interrupted}
    if hasattr(signal, "SIGXFSZ"):
        wanted[signal.SIGXFSZ] = signal.SIG_IGN
    old = {}
    try:
        for s, handler in wanted.items():
            old[s] = signal.signal(s, handler)
    except ValueError:  # not the main thread: leave the process's handlers alone
        pass
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _known_errors() -> tuple[type[BaseException], ...]:
    from .calibration.forward import NonFiniteActivations
    from .io import OutputExistsError, UnsafeOutputError
    from .models import ModelLoadError
    from .quant.core import QuantizationError
    from .runtime_ops import RuntimeOpsUnavailable

    return (UsageError, ConfigError, QuantizationError, OutputExistsError, UnsafeOutputError,
            ModelLoadError, FileNotFoundError, RuntimeOpsUnavailable, NonFiniteActivations)


def _output_paths(args: argparse.Namespace) -> list[Path]:
    """The paths a command writes (an OS error under one of them is an output error)."""
    paths = [getattr(args, name, None) for name in ("output", "plot")]
    if getattr(args, "json", None) not in (None, False, True, "-"):
        paths.append(args.json)
    return [Path(p).expanduser().absolute() for p in paths if p]


def _output_side_error(exc: BaseException, args: argparse.Namespace):  # noqa: ANN202
    """The `OutputError` for an OS error on the output side of this command, else None."""
    from .io import OUTPUT_ERRNOS, output_error

    outputs = _output_paths(args)
    err = output_error(exc, outputs[0] if outputs else None)
    if err is None:
        return None
    if err.errno in OUTPUT_ERRNOS:
        return err
    named = Path(err.path).absolute() if err.path else None
    if named is not None and any(named == p or p in named.parents or named in p.parents
                                 for p in outputs):
        return err
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; every outcome is an exit code (see `EXIT_CODES_HELP`)."""
    from .io import OutputError

    parser = build_parser()
    args = parser.parse_args(argv)
    _, run = COMMANDS[args.command]
    prefix = f"sinq-export {args.command}: error:"

    def say(msg: object) -> None:  # one line, whatever the message (library texts span lines)
        print(f"{prefix} {' '.join(str(msg).split())}", file=sys.stderr)

    def interrupted(signum: int) -> int:
        print(f"sinq-export {args.command}: interrupted by {signal.Signals(signum).name}; "
              "partial output removed", file=sys.stderr)
        return EXIT_SIGTERM if signum == signal.SIGTERM else EXIT_SIGINT

    _RECEIVED.clear()
    with _signals_as_exceptions(), verbosity.cli_output(args.verbose):
        try:
            try:
                return run(args)
            except Exception:
                if _RECEIVED:  # the signal's exception was replaced on its way up (_RECEIVED)
                    raise Interrupted(_RECEIVED[0]) from None
                raise
        except KeyboardInterrupt as exc:
            return interrupted(getattr(exc, "signum", signal.SIGINT))
        except OutputError as exc:
            say(exc)
            return EXIT_OUTPUT
        except _known_errors() as exc:
            say(exc)
            return EXIT_USAGE
        except Exception as exc:
            err = _output_side_error(exc, args)
            if err is not None:
                say(err)
                return EXIT_OUTPUT
            if isinstance(exc, OSError):  # not the output's: an unreadable input
                code = errno.errorcode.get(exc.errno or 0, "?")
                say(f"cannot read {exc.filename or 'the input'}: [{code}] {exc.strerror or exc}")
                return EXIT_USAGE
            traceback.print_exc()
            say(f"internal error ({type(exc).__name__}: {exc}); please report it")
            return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
