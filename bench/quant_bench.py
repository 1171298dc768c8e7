"""Our quantizer alone on the real SmolLM2: does SINQ beat RTN per layer, and what does it cost?

Why: SINQ's claim is a lower weight reconstruction error than plain group RTN at the same
bits and group size, for a modest quantization-time overhead. This measures both on every
``nn.Linear`` but lm_head (210 layers) through the public entry point ``quantize_model``, at
3 and 4 bits, group size 64 (the GGUF source is a Q4_1 g32 grid, so 4-bit g32 would prove
nothing), with the kurtosis gate off (our default) and on (the reference's default, 5.0).

Also measured: how many weight groups have values of one sign only - the only groups where our
rule "the quantization range always contains 0" (see ``sinq_export/quant/rtn.py``) loses
resolution against plain min/max.

Timing: whole-model ``quantize_model`` wall time with ``--threads`` torch threads; the machine is
shared with other jobs, so each number is the median of ``--repeats`` runs, configurations
interleaved round by round so that load changes hit all of them alike.

Usage: ``.venv/bin/python bench/quant_bench.py [--repeats 3] [--threads 2]``
Writes ``bench/results/quant_bench.{md,json}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sinq_export.config import SinqConfig  # noqa: E402
from sinq_export.models import load_causal_lm  # noqa: E402
from sinq_export.nn import SinqLinear, quantize_model  # noqa: E402
from sinq_export.quant.core import relative_error  # noqa: E402

BITS = (3, 4)
GROUP_SIZE = 64
GATE = 5.0  # the reference's default kurtosis threshold
VARIANTS: dict[str, dict] = {
    "rtn": {"method": "rtn"},
    "sinq": {"method": "sinq"},
    "sinq_gate": {"method": "sinq", "kurtosis_gate": GATE},
}
SIGN_GROUP_SIZES = (16, 32, 64)  # 128 does not divide K = 576
RESULTS = REPO / "bench" / "results"


@dataclass(frozen=True)
class Run:
    """One whole-model quantization: wall time and, for the first run, per-layer errors."""

    seconds: float
    errors: dict[str, float]
    gated: int  # layers the kurtosis gate sent to RTN


def make_config(variant: str, bits: int, include: str) -> SinqConfig:
    return SinqConfig(bits=bits, group_size=GROUP_SIZE, include=(include,), **VARIANTS[variant])


def float_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Module name -> fp32 weight of every linear, kept aside to measure reconstruction errors."""
    return {n: m.weight.detach().float().clone() for n, m in model.named_modules()
            if isinstance(m, nn.Linear)}


def run_once(model: nn.Module, config: SinqConfig, originals: dict[str, torch.Tensor],
             with_errors: bool) -> Run:
    """Quantize a fresh copy (``quantize_model`` works in place); only the call is timed."""
    work = copy.deepcopy(model)
    t0 = time.perf_counter()
    report = quantize_model(work, config, progress=False)
    seconds = time.perf_counter() - t0
    gated = sum(layer.method == "rtn(gated)" for layer in report.layers)
    errors = {}
    if with_errors:
        errors = {n: relative_error(originals[n], m.record) for n, m in work.named_modules()
                  if isinstance(m, SinqLinear)}
    return Run(seconds, errors, gated)


def same_sign_groups(weights: dict[str, torch.Tensor], names: list[str]) -> dict[int, list[int]]:
    """Group size -> [groups of one sign only, all groups] over the quantized layers."""
    out = {}
    for g in SIGN_GROUP_SIZES:
        same = total = 0
        for n in names:
            w = weights[n]
            grouped = w.reshape(w.shape[0], -1, g)
            same += int(((grouped.amin(-1) > 0) | (grouped.amax(-1) < 0)).sum())
            total += grouped.shape[0] * grouped.shape[1]
        out[g] = [same, total]
    return out


def layer_kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def compare(sinq: dict[str, float], rtn: dict[str, float]) -> dict:
    """Win rate (strictly lower error) and ties of SINQ vs RTN, overall and per layer kind."""
    names = list(sinq)
    kinds = sorted({layer_kind(n) for n in names})

    def rate(subset: list[str]) -> float:
        return sum(sinq[n] < rtn[n] for n in subset) / len(subset)

    ratios = [sinq[n] / rtn[n] for n in names]
    return {
        "win_rate": rate(names),
        "ties": sum(sinq[n] == rtn[n] for n in names) / len(names),
        "by_kind": {k: rate([n for n in names if layer_kind(n) == k]) for k in kinds},
        "mean_ratio": statistics.fmean(ratios),
        "min_ratio": min(ratios),
        "max_ratio": max(ratios),
    }


def summarise(runs: dict[str, list[Run]]) -> dict:
    errors = {key: r[0].errors for key, r in runs.items()}
    out: dict = {"errors": {}, "sinq_vs_rtn": {}, "times": {}}
    for key, e in errors.items():
        vals = list(e.values())
        out["errors"][key] = {"mean": statistics.fmean(vals), "median": statistics.median(vals),
                              "gated_layers": runs[key][0].gated}
    for bits in BITS:
        rtn = errors[f"rtn_{bits}bit"]
        for variant in ("sinq", "sinq_gate"):
            out["sinq_vs_rtn"][f"{variant}_{bits}bit"] = compare(errors[f"{variant}_{bits}bit"], rtn)
    for key, r in runs.items():
        secs = [x.seconds for x in r]
        out["times"][key] = {"median": statistics.median(secs), "runs": secs}
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def markdown(res: dict) -> str:
    meta, s = res["meta"], res["summary"]
    lines = [
        "# Quantizer benchmark: SINQ vs RTN on SmolLM2-135M-Instruct (ours only)",
        "",
        f"Generated by `bench/quant_bench.py` on {meta['date']}: {meta['n_layers']} linears "
        f"(all but lm_head) via `quantize_model`, group size {GROUP_SIZE}, fp32 CPU, "
        f"{meta['threads']} torch threads. Error = ||W - W_hat||_F / ||W||_F per layer. "
        f"`sinq_gate` = whole-matrix kurtosis > {GATE} falls back to RTN (reference default).",
        "",
        "## Reconstruction error",
        "",
        "| config | mean | median | gated layers |",
        "|---|---|---|---|",
    ]
    for key, e in s["errors"].items():
        lines.append(f"| {key} | {e['mean']:.5f} | {e['median']:.5f} | {e['gated_layers']} |")
    kinds = list(next(iter(s["sinq_vs_rtn"].values()))["by_kind"])
    lines += ["", "## SINQ vs RTN per layer: fraction of layers where SINQ's error is lower", "",
              "| config | all layers | ties | mean sinq/rtn | min..max | "
              + " | ".join(kinds) + " |", "|---" * (5 + len(kinds)) + "|"]
    for key, c in s["sinq_vs_rtn"].items():
        lines.append(f"| {key} | {_pct(c['win_rate'])} | {_pct(c['ties'])} | {c['mean_ratio']:.4f} "
                     f"| {c['min_ratio']:.3f}..{c['max_ratio']:.3f} | "
                     + " | ".join(_pct(c["by_kind"][k]) for k in kinds) + " |")
    lines += ["", f"## Whole-model quantization time, median of {meta['repeats']} runs (s)", "",
              "The 2-core machine was shared with other jobs while this ran: medians, with "
              "all runs listed, and configurations interleaved round by round.", "",
              "| bits | rtn | sinq | sinq_gate | sinq / rtn | runs (rtn; sinq; sinq_gate) |",
              "|---|---|---|---|---|---|"]
    for bits in BITS:
        t = {v: s["times"][f"{v}_{bits}bit"] for v in VARIANTS}
        runs = "; ".join(", ".join(f"{x:.1f}" for x in t[v]["runs"]) for v in VARIANTS)
        lines.append(f"| {bits} | {t['rtn']['median']:.1f} | {t['sinq']['median']:.1f} "
                     f"| {t['sinq_gate']['median']:.1f} "
                     f"| {t['sinq']['median'] / t['rtn']['median']:.1f}x | {runs} |")
    lines += ["", "## Groups whose values all share one sign", "",
              "Only in such groups does our range-includes-0 rule differ from plain min/max "
              "(Sinkhorn scales are positive, so the count also holds after normalisation).", "",
              "| group size | one-sign groups | all groups |", "|---|---|---|"]
    for g, (same, total) in res["same_sign_groups"].items():
        lines.append(f"| {g} | {same} | {total} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--include", default=r".*", help="regex of layers to quantize (smoke tests)")
    p.add_argument("--out", type=Path, default=RESULTS / "quant_bench")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, _ = load_causal_lm(None)
    originals = float_weights(model)
    keys = [(v, b) for b in BITS for v in VARIANTS]
    runs: dict[str, list[Run]] = {f"{v}_{b}bit": [] for v, b in keys}
    for r in range(args.repeats):
        for variant, bits in keys:
            key = f"{variant}_{bits}bit"
            run = run_once(model, make_config(variant, bits, args.include), originals, r == 0)
            runs[key].append(run)
            print(f"round {r + 1}: {key} {run.seconds:.1f} s", flush=True)
        # Written after every round, so an interrupted run keeps what it measured.
        write_results(args, runs, originals, rounds=r + 1)


def write_results(args: argparse.Namespace, runs: dict[str, list[Run]],
                  originals: dict[str, torch.Tensor], rounds: int) -> None:
    names = sorted(runs[f"rtn_{BITS[0]}bit"][0].errors)
    res = {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "n_layers": len(names), "threads": args.threads, "repeats": rounds,
            "group_size": GROUP_SIZE, "torch": torch.__version__, "platform": platform.platform(),
        },
        "summary": summarise(runs),
        "same_sign_groups": same_sign_groups(originals, names),
        "layers": {key: r[0].errors for key, r in runs.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(res))
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
