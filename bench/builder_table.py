#!/usr/bin/env python
"""The table that justifies the `sinq-export model` default: ours against onnxruntime-genai's
model builder (int4, and its strongest variant ``algo_config=k_quant_mixed``) on the three real
models.

    python bench/builder_table.py                          # smollm2, qwen, gemma3
    python bench/builder_table.py --models smollm2 --rounds 3

Per model and variant: ONNX size (MB: the graph file and every external-data file it
references), bits per weight (8 x those bytes over the source model's parameter count: every
stored tensor counts, so scales, zero points, t, norms and a float or quantized embedding are
all in it), perplexity in onnxruntime (the shared protocol, `sinq_export.eval.ort_nll` via
`bench.e2e.perplexity`: the first 4 x 512-token windows of the cleaned Wikipedia text,
add_special_tokens=False, each window from an empty context; no BOS, also for Gemma, so
compare Gemma's rows with each other, not with other models), and decode tok/s in
onnxruntime-genai's loop (`bench/_e2e_genai.py`: 128-token prefill, ``--decode-steps`` greedy
steps, best of ``--rounds`` interleaved rounds in a rotated order; x int4 = median of the
per-round ratios against the builder's int4 of the same round).

Variants:
  ours       ``sinq-export model HF -o OUT --json`` (the product's default, nothing else)
  int4       ``python -m onnxruntime_genai.models.builder -i HF -o OUT -p int4 -e cpu``
  kqm        the same with ``--extra_options algo_config=k_quant_mixed``

A variant that cannot be built (the builder refuses some models) is a row with the last line
of its error. Models: the bundled SmolLM2-135M-Instruct, Qwen2.5-Coder-0.5B-Instruct
(`bench/_qwen.py`) and Gemma3-270m (`sinq_export.models.gemma3_model_dir`), each the fp32
folder converted from its GGUF. Builds are cached under ``<cache>/bench-builder/<model>-<variant>``,
ours keyed by the source tree (``--rebuild`` rebuilds). Writes
``bench/results/builder_table.{md,json}``. The machine is shared: the table records the load
average of every round; timings move with it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from safetensors import safe_open
from transformers import AutoTokenizer

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
from _real_models import REAL_MODELS, real_model_dir  # noqa: E402  (bench/, beside this script)
from e2e import (  # noqa: E402  (bench/, beside this script)
    onnx_file,
    perplexity,
    run_worker,
    size_bytes,
    source_key,
    write_results,
)

from sinq_export.eval import text_windows  # noqa: E402  (the repo, not an install)
from sinq_export.models import cache_dir  # noqa: E402

VARIANTS = {
    "ours": "sinq-export model (default)",
    "int4": "genai builder int4",
    "kqm": "genai builder int4 k_quant_mixed",
}
BUILDER_EXTRA = {"int4": [], "kqm": ["--extra_options", "algo_config=k_quant_mixed"]}
BUILDER_KEY = "onnxruntime-genai builder"  # the builder's builds do not depend on our tree


def log(msg: str) -> None:
    print(f"[builder_table {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_command(variant: str, hf_dir: Path, out: Path) -> list[str]:
    if variant == "ours":
        return [sys.executable, "-m", "sinq_export.console", "model", str(hf_dir), "-o", str(out),
                "--json"]
    return [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir),
            "-o", str(out), "-p", "int4", "-e", "cpu", *BUILDER_EXTRA[variant]]


def build(variant: str, hf_dir: Path, out: Path, rebuild: bool) -> float | None:
    """Build ``variant`` into ``out`` (None: cached); returns the wall seconds."""
    key = source_key(()) if variant == "ours" else f"{BUILDER_KEY} {BUILDER_EXTRA[variant]}"
    stamp = out / "bench_key.txt"
    if not rebuild and stamp.is_file() and stamp.read_text() == key:
        return None
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT)) if variant == "ours" else dict(os.environ)
    start = time.perf_counter()
    try:  # the builder writes its ./cache_dir next to the output
        subprocess.run(build_command(variant, hf_dir, out), check=True, capture_output=True,
                       env=env, cwd=out.parent)
    except subprocess.CalledProcessError:
        shutil.rmtree(out, ignore_errors=True)  # no half-built folder left in the cache
        raise
    seconds = time.perf_counter() - start
    stamp.write_text(key)
    return seconds


def error_line(exc: subprocess.CalledProcessError) -> str:
    lines = (exc.stderr or b"").decode(errors="replace").strip().splitlines()
    return lines[-1].strip() if lines else f"exit {exc.returncode}"


def stored_bytes(folder: Path) -> int:
    """The graph file plus every external-data file its initializers reference."""
    graph = onnx_file(folder)
    model = onnx.load(str(graph), load_external_data=False)
    locations = {e.value for t in model.graph.initializer for e in t.external_data
                 if e.key == "location"}
    return graph.stat().st_size + sum((graph.parent / loc).stat().st_size for loc in locations)


def parameter_count(hf_dir: Path) -> int:
    total = 0
    for shard in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as fh:
            for name in fh.keys():
                total += int(np.prod(fh.get_slice(name).get_shape()))
    return total


def decode_rates(folder: Path, tokens_file: Path, decode_steps: int) -> dict:
    run = run_worker("_e2e_genai.py", ["--model-dir", str(folder), "--tokens", str(tokens_file),
                                       "--prompt-tokens", "128", "--decode-steps",
                                       str(decode_steps)])
    return {"decode_tok_s": decode_steps / min(run["decode_s"]),
            "prefill_tok_s": 128 / min(run["prefill_s"])}


def built_row(model: str, variant: str, folder: Path, seconds: float | None, params: int) -> dict:
    size = stored_bytes(folder)
    if size != size_bytes(folder):  # a file the graph does not reference, or one it misses
        log(f"{model} {variant}: graph + its data {size} B, ONNX files in the folder "
            f"{size_bytes(folder)} B")
    row = {"model": model, "variant": variant, "label": VARIANTS[variant], "build_s": seconds,
           "size_mb": size / 1e6, "bits_per_weight": 8 * size / params, "params": params}
    manifest = folder / "sinq_export.json"
    if manifest.is_file():
        accuracy = json.loads(manifest.read_text()).get("accuracy") or {}
        row["layers_per_accuracy_level"] = accuracy.get("layers_per_level")
    return row


def measure_model(model: str, variants: list[str], args: argparse.Namespace, root: Path,
                  loads: list[list[float]]) -> list[dict]:
    hf_dir = real_model_dir(model)
    params = parameter_count(hf_dir)
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    windows = np.asarray(text_windows(tok, n_windows=4, length=512))
    tokens_file = root / f"{model}-tokens.json"
    tokens_file.write_text(json.dumps(windows[0][: 128 + args.decode_steps + 8].tolist()))
    folders, rows, failed = {}, {}, []
    for variant in variants:
        folders[variant] = root / f"{model}-{variant}"
        log(f"{model} {variant}: build")
        try:
            seconds = build(variant, hf_dir, folders[variant], args.rebuild)
        except subprocess.CalledProcessError as exc:
            failed.append({"model": model, "variant": variant, "label": VARIANTS[variant],
                           "error": error_line(exc)})
            log(f"{model} {variant}: cannot build: {failed[-1]['error']}")
            continue
        rows[variant] = built_row(model, variant, folders[variant], seconds, params)
    built = [v for v in variants if v in rows]
    runs: dict[str, list[dict]] = {v: [] for v in built}
    for r in range(args.rounds):
        loads.append(list(os.getloadavg()))
        for variant in built[r % len(built):] + built[:r % len(built)]:
            log(f"{model} {variant}: decode round {r + 1} (load {loads[-1][0]:.1f})")
            runs[variant].append(decode_rates(folders[variant], tokens_file, args.decode_steps))
    for variant in built:
        row = rows[variant]
        row["decode_rounds_tok_s"] = [x["decode_tok_s"] for x in runs[variant]]
        row["decode_tok_s"] = max(row["decode_rounds_tok_s"])
        row["prefill_tok_s"] = max(x["prefill_tok_s"] for x in runs[variant])
        if "int4" in runs:
            row["x_int4"] = statistics.median(
                a["decode_tok_s"] / b["decode_tok_s"] for a, b in zip(runs[variant], runs["int4"]))
        log(f"{model} {variant}: perplexity")
        row["ppl"] = perplexity(folders[variant], windows)
        log(json.dumps(row))
    return [rows[v] for v in built] + failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(REAL_MODELS))
    ap.add_argument("--variants", default="ours,int4,kqm")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "builder_table"))
    args = ap.parse_args(argv)

    root = cache_dir() / "bench-builder"
    root.mkdir(parents=True, exist_ok=True)
    variants = args.variants.split(",")
    loads: list[list[float]] = []
    results = []
    for model in args.models.split(","):
        results += measure_model(model, variants, args, root, loads)
    meta = {"load_average_per_round": loads, "load_average_end": list(os.getloadavg()),
            "cpus": os.cpu_count(), "rounds": args.rounds, "decode_steps": args.decode_steps}
    write_results(Path(args.out), meta, results, markdown(results, meta))
    return 0


def markdown(results: list[dict], meta: dict) -> str:
    one_minute = [x[0] for x in meta["load_average_per_round"]] or [meta["load_average_end"][0]]
    lines = [
        f"CPU ({meta['cpus']} cores, shared machine: 1-minute load average "
        f"{min(one_minute):.1f}-{max(one_minute):.1f} over the decode rounds), genai loop, "
        f"128-token prefill + {meta['decode_steps']} decode steps, best of {meta['rounds']} "
        "interleaved rounds (x int4: median of the per-round ratios); ppl: 4 x 512 Wikipedia "
        "tokens in onnxruntime; bits/weight: 8 x (graph + external data) over the source "
        "model's parameters.",
        "",
        "| model | variant | size MB | bits/weight | ppl | decode tok/s (x int4) | "
        "prefill tok/s | accuracy levels |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['label']} | cannot build: `{r['error']}` |"
                         " | | | | |")
            continue
        ratio = f" ({r['x_int4']:.2f}x)" if "x_int4" in r else ""
        levels = r.get("layers_per_accuracy_level")
        levels = ", ".join(f"acc{k}: {v}" for k, v in sorted(levels.items(), reverse=True)) \
            if levels else ""
        lines.append(f"| {r['model']} | {r['label']} | {r['size_mb']:.1f} | "
                     f"{r['bits_per_weight']:.2f} | {r['ppl']:.2f} | {r['decode_tok_s']:.0f}"
                     f"{ratio} | {r['prefill_tok_s']:.0f} | {levels} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
