"""Where one decode step's time goes, per onnxruntime op type, for built `bench/e2e.py` variants.

`bench/decode_step.py` says how long a step takes; this says which kernels take it, from
onnxruntime's own profiler (the per-node ``*_kernel_time`` events of ``enable_profiling``),
so a gap to the genai builder's model can be traced to node types (e.g. the col-scale
``Mul`` nodes, the MatMulNBits count) instead of guessed. Profiling adds a little per node;
compare variants within one run.

    python bench/op_profile.py [--only a,b,...] [--past 128] [--steps 200] [--threads 2]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import onnxruntime as ort

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def op_times(folder: Path, threads: int, past: int, steps: int, warmup: int = 20
             ) -> tuple[float, dict[str, tuple[float, float]]]:
    """(ms per step, {op type: (ms per step, nodes per step)}) over ``steps`` profiled steps."""
    from decode_step import feeds, session

    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.gettempdir()) / f"op_profile_{folder.name}")
    sess = session(folder, threads, so)
    f = feeds(sess, folder, past)
    for _ in range(warmup + steps):
        sess.run(None, f)
    path = Path(sess.end_profiling())
    try:
        events = json.loads(path.read_text())
    finally:
        path.unlink()
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    cutoff = starts[warmup]  # the warm-up runs' events are left out
    total, runs = 0.0, 0
    per_op: dict[str, float] = collections.defaultdict(float)
    count: collections.Counter = collections.Counter()
    for e in (e for e in events if e.get("ts", -1) >= cutoff):
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
        elif e.get("cat") == "Session" and e["name"] == "model_run":
            total += e["dur"]
            runs += 1
    runs = max(runs, 1)
    return total / runs / 1e3, {op: (t / runs / 1e3, count[op] / runs) for op, t in per_op.items()}


def main(argv: list[str] | None = None) -> int:
    from decode_step import built_variants
    from e2e import VARIANTS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=None, help="comma list of built variants (default: all built)")
    ap.add_argument("--past", type=int, default=128)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "op_profile"))
    args = ap.parse_args(argv)
    built, names = built_variants(args.only)
    results = {n: op_times(built / n, args.threads, args.past, args.steps) for n in names}
    ops = sorted({op for _, per in results.values() for op in per},
                 key=lambda op: -max(per.get(op, (0, 0))[0] for _, per in results.values()))
    shown = [op for op in ops if max(r[1].get(op, (0, 0))[0] for r in results.values()) >= 0.05]
    lines = [f"One decode step at past length {args.past} by op type (onnxruntime profiler, "
             f"{args.threads} intra-op threads, {args.steps} steps per variant): "
             "ms per step (nodes per step).", "",
             "| variant | step ms | " + " | ".join(shown) + " |",
             "|---|---|" + "---|" * len(shown)]
    for name, (step, per) in results.items():
        cells = [f"{per[op][0]:.2f} ({per[op][1]:.0f})" if op in per else "-" for op in shown]
        lines.append(f"| {VARIANTS[name][0]} | {step:.2f} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(
        {"past": args.past, "threads": args.threads, "steps": args.steps,
         "results": {n: {"step_ms": s, "ops": {op: {"ms": t, "nodes": c} for op, (t, c) in p.items()}}
                     for n, (s, p) in results.items()}}, indent=2))
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
