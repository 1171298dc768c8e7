"""Decode-step microbenchmark: one-token steps at a fixed past length, every variant's session
in one process, interleaved in short blocks (so drift of the shared machine hits all alike).

`bench/e2e.py` times whole generation loops (genai's and a plain one) but on a 2-core VM its
rounds scatter by +-25 %; this isolates what our graph controls - the cost of one decode step -
with hundreds of samples per variant. Variants are folders `bench/e2e.py` built (under
``~/.cache/sinq-export/bench-built``). Prints and writes ``bench/results/decode_step.{md,json}``
(``decode_step_threads1`` with ``--threads 1``).

    python bench/decode_step.py [--only a,b,...] [--past 128] [--blocks 40] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def session(folder: Path, threads: int, so: ort.SessionOptions | None = None
            ) -> ort.InferenceSession:
    so = so or ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    lib = folder / "libsinq_ops.so"
    if lib.is_file():
        so.register_custom_ops_library(str(lib))
    model = next(iter(sorted(folder.glob("*.onnx")) + sorted(folder.glob("onnx/*.onnx"))))
    return ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])


def feeds(sess: ort.InferenceSession, folder: Path, past: int) -> dict[str, np.ndarray]:
    dec = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    heads, dim = dec["num_key_value_heads"], dec["head_size"]
    rng = np.random.default_rng(0)
    out = {}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values"):
            out[i.name] = rng.standard_normal((1, heads, past, dim), dtype=np.float32)
        elif i.name == "input_ids":
            out[i.name] = np.array([[42]], dtype=np.int64)
        elif i.name == "attention_mask":
            out[i.name] = np.ones((1, past + 1), dtype=np.int64)
        elif i.name == "position_ids":
            out[i.name] = np.array([[past]], dtype=np.int64)
        else:
            raise ValueError(f"{folder}: unexpected input {i.name}")
    return out


def built_variants(only: str | None) -> tuple[Path, list[str]]:
    """(the folder `bench/e2e.py` builds into, the ``--only`` variants or every built one)."""
    from e2e import VARIANTS

    from sinq_export.models import cache_dir

    built = cache_dir() / "bench-built"
    return built, only.split(",") if only else [n for n in VARIANTS if (built / n).is_dir()]


def main(argv: list[str] | None = None) -> int:
    from e2e import VARIANTS, rotated

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=None, help="comma list of built variants (default: all built)")
    ap.add_argument("--past", type=int, default=128)
    ap.add_argument("--blocks", type=int, default=40)
    ap.add_argument("--steps", type=int, default=10, help="steps per block")
    ap.add_argument("--threads", type=int, default=2,
                    help="intra-op threads; 1 also times each step's CPU time on the calling "
                         "thread (where onnxruntime then runs every kernel), which the other "
                         "guests of a shared VM cannot inflate")
    ap.add_argument("--out", default=None,
                    help="output path stem (default: bench/results/decode_step, "
                         "decode_step_threads1 with --threads 1: another clock, another table)")
    args = ap.parse_args(argv)
    built, names = built_variants(args.only)
    runs = {}
    for name in names:
        sess = session(built / name, args.threads)
        f = feeds(sess, built / name, args.past)
        for _ in range(5):
            sess.run(None, f)
        runs[name] = (sess, f, [])
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    for b in range(args.blocks):
        for name in rotated(names, b):
            sess, f, times = runs[name]
            for _ in range(args.steps):
                t = clock()
                sess.run(None, f)
                times.append(clock() - t)
    base = runs.get("genai-int4")
    rows = []
    for name in names:
        times = runs[name][2]
        row = {"variant": name, "label": VARIANTS[name][0],
               "median_ms": 1e3 * statistics.median(times),
               "p10_ms": 1e3 * float(np.percentile(times, 10))}
        if base is not None:
            per_block = [statistics.median(times[i:i + args.steps]) /
                         statistics.median(base[2][i:i + args.steps])
                         for i in range(0, len(times), args.steps)]
            row["x_genai_int4_speed"] = 1 / statistics.median(per_block)
        rows.append(row)
    what = "thread CPU time" if args.threads == 1 else "wall time"
    lines = [f"One decode step ({what}) at past length {args.past}, onnxruntime CPU, "
             f"{args.threads} intra-op thread(s), "
             f"{args.blocks} interleaved blocks x {args.steps} steps per variant.", "",
             "| variant | median ms/step | p10 ms | speed x genai int4 (paired) |",
             "|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['x_genai_int4_speed']:.2f}x" if "x_genai_int4_speed" in r else "-"
        lines.append(f"| {r['label']} | {r['median_ms']:.2f} | {r['p10_ms']:.2f} | {ratio} |")
    text = "\n".join(lines) + "\n"
    out = Path(args.out or HERE / "results" / (
        "decode_step_threads1" if args.threads == 1 else "decode_step"))
    out.with_suffix(".json").write_text(json.dumps(
        {"past": args.past, "threads": args.threads, "clock": what, "results": rows}, indent=2))
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
