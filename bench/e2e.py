#!/usr/bin/env python
"""End-to-end benchmark: our built SINQ exports against onnxruntime-genai's builder int4.

    python bench/e2e.py                       # every variant
    python bench/e2e.py --only genai-int4,sinq4-lmh4-emb4

On the bundled SmolLM2-135M-Instruct, CPU. Every model runs through the *same* loops, each in
its own process (so its peak RSS is its own): onnxruntime-genai's generator
(``_e2e_genai.py``: ``append_tokens`` of a ``--prompt-tokens`` (128) prefill of the Wikipedia
text, then ``--decode-steps`` (128; at 32 one round is a half-second sample that this VM's
neighbours move by +-20 %) greedy steps, shared KV buffer) and a plain onnxruntime
loop (``_e2e_worker.py``: numpy KV cache that grows by one token per step). Reported per
variant: file size, export wall time, prefill and decode tok/s (median of ``--rounds``), peak
RSS, perplexity (the shared protocol: 4 x 512-token windows of the cleaned Wikipedia text,
``add_special_tokens=False``, each window from an empty cache, ``sinq_export.eval.ort_nll``),
weight bytes read per decoded token (every initializer except the rows-only embedding gather
tables and the rotary caches) and the effective bandwidth tok/s x bytes/token next to the
machine's measured single-thread read bandwidth (numpy sum over 512 MiB).

The genai models are built with ``python -m onnxruntime_genai.models.builder -i HF -o OUT -p int4
-e cpu`` in this interpreter (needs transformers >= 5), ``genai-kqm`` with ``--extra_options
algo_config=k_quant_mixed`` added. Exports are cached under
``<cache>/bench-built/<variant>`` keyed by the variant's arguments and the source tree;
``--rebuild`` rebuilds. Writes ``bench/results/e2e.{md,json}``. Timings on a shared machine
are noisy: the table says how many rounds and the load average when it ran.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

# the genai builder's models: name -> its `--extra_options`
BUILDER_VARIANTS: dict[str, tuple[str, ...]] = {
    "genai-int4": (),
    "genai-kqm": ("--extra_options", "algo_config=k_quant_mixed"),
}

# name -> (label, `sinq-export model` arguments, or the builder's extra options)
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "genai-int4": ("onnxruntime-genai builder int4 (-p int4 -e cpu)", ()),
    "genai-kqm": ("onnxruntime-genai builder int4 k_quant_mixed (8-bit head, table, and q/k/v and "
                  "down_proj in 14 of 30 layers)", BUILDER_VARIANTS["genai-kqm"]),
    "sinq4": ("SINQ 4-bit g64, lm_head + embedding float, acc4",
              ("--lm-head-bits", "float", "--embedding-bits", "float")),
    "sinq4-acc0": ("SINQ 4-bit g64, lm_head + embedding float, acc0",
                   ("--lm-head-bits", "float", "--embedding-bits", "float", "--accuracy-level", "0")),
    "sinq4-lmh8": ("SINQ 4-bit, lm_head 8-bit, embedding float, acc4",
                   ("--lm-head-bits", "8", "--embedding-bits", "float")),
    "default": ("the `sinq-export model` default", ()),
    "sinq4g32-lmh4c-emb8": ("the default with an 8-bit table",
                            ("--group-size", "32", "--embedding-bits", "8")),
    "sinq4-lmh4c-emb8": ("SINQ 4-bit g64, lm_head 4-bit g32 calibrated alone, embedding 8-bit, "
                         "gate/up share one t, t folded where exact, acc auto: the default "
                         "before 32-wide groups", ()),
    "sinq4-lmh4c-emb4": ("the default with the embedding 4-bit too (one shared table: the "
                         "calibrated head's record)", ("--embedding-bits", "4")),
    "sinq4-lmh4c-emb4-packed": ("all 4-bit: the default + `--embedding-bits 4` + q/k/v and "
                                "gate/up sharing one t (folded), q/k/v packed into one node",
                                ("--embedding-bits", "4", "--shared-col-scale", "all")),
    "sinq4-lmh4c-emb4-packed-tied": ("all 4-bit packed + o_proj's t tied per GQA group and folded "
                                     "into v_proj's rows (`--tie-o-proj`): genai's graph plus "
                                     "the embedding's one Mul",
                                     ("--embedding-bits", "4", "--shared-col-scale", "all",
                                      "--tie-o-proj")),
    "sinq4-lmh4c-emb4-packed-tied-sym": ("the same with symmetric codes (no zero-point inputs: "
                                         "onnxruntime's zero-point-free kernels)",
                                         ("--embedding-bits", "4", "--shared-col-scale", "all",
                                          "--tie-o-proj", "--symmetric")),
    "sinq4g128-lmh4c-emb4-packed-tied": ("all 4-bit packed + tied, decoder g128 (fewer scales)",
                                         ("--embedding-bits", "4", "--shared-col-scale", "all",
                                          "--tie-o-proj", "--group-size", "128")),
    "sinq4-lmh4c-emb8-tied": ("the default + `--tie-o-proj` (o_proj's t in v_proj's rows)",
                              ("--tie-o-proj",)),
    "sinq4-lmh8-emb8": ("SINQ 4-bit, lm_head + embedding 8-bit (one shared table), gate/up share "
                        "one t, t folded where exact, acc4: the default before the calibrated head",
                        ("--lm-head-bits", "8")),
    "sinq4-lmh8-emb8-none": ("the same with a t per linear (q's and gate's t in the norms, k/v/up "
                             "multiply by a ratio)", ("--lm-head-bits", "8",
                                                      "--shared-col-scale", "none")),
    "sinq4-lmh8-emb8-mul": ("the 8-bit-head export with every t as a Mul",
                            ("--lm-head-bits", "8", "--col-scale", "mul")),
    "sinq4-lmh8-emb8-packed": ("the 8-bit-head export + q/k/v and gate/up sharing one t (folded), "
                               "q/k/v packed into one node",
                               ("--lm-head-bits", "8", "--shared-col-scale", "all")),
    "sinq4-lmh4-emb4": ("SINQ 4-bit, lm_head + embedding 4-bit g64 calibration-free (one shared "
                        "table), t folded where exact, acc4",
                        ("--lm-head-bits", "4", "--embedding-bits", "4", "--no-calibrate-head",
                         "--lm-head-group-size", "64")),
    "sinq4-lmh4-emb4-packed": ("SINQ 4-bit all calibration-free + shared t folded, q/k/v packed",
                               ("--lm-head-bits", "4", "--embedding-bits", "4",
                                "--no-calibrate-head", "--lm-head-group-size", "64",
                                "--shared-col-scale", "all")),
    "sinq4-cal-lmh4": ("SINQ calibrated (--calibrate), lm_head 4-bit g32 calibrated, embedding "
                       "8-bit, acc4", ("--calibrate", "--lm-head-bits", "4",
                                       "--lm-head-group-size", "32")),
    "sinq4-cal-lmh4-emb4": ("SINQ calibrated, lm_head + embedding 4-bit g32 (one shared table: the "
                            "calibrated head's record), acc4",
                            ("--calibrate", "--lm-head-bits", "4", "--lm-head-group-size", "32",
                             "--embedding-bits", "4")),
    "sinq4-cal-all4-packed": ("SINQ calibrated all 4-bit (head + table g32, one shared table), "
                              "q/k/v and gate/up sharing one t, q/k/v packed, acc4",
                              ("--calibrate", "--lm-head-bits", "4", "--lm-head-group-size", "32",
                               "--embedding-bits", "4", "--shared-col-scale", "all")),
    # a t per linear: gate/up sharing one costs +1.0 perplexity at g32 symmetric (docs/quality.md)
    "sinq4g32s": ("SINQ 4-bit g32 symmetric (no zero-point input), head + embedding 8-bit, acc4",
                  ("--group-size", "32", "--symmetric", "--shared-col-scale", "none",
                   "--lm-head-bits", "8")),
    "sinq4g32s-lmh4-emb4": ("SINQ 4-bit g32 symmetric all, head + embedding 4-bit, acc4",
                            ("--group-size", "32", "--symmetric", "--lm-head-bits", "4",
                             "--embedding-bits", "4", "--shared-col-scale", "none",
                             "--no-calibrate-head")),
}

# Variants first measured beside the earlier default (64-wide groups, an 8-bit table) keep those
# two fields unless they set them, so each name keeps meaning the export its results measured.
_EARLIER_DEFAULT = {"--group-size": "64", "--embedding-bits": "8"}


def _pinned(args: tuple[str, ...]) -> tuple[str, ...]:
    return args + tuple(x for flag, value in _EARLIER_DEFAULT.items() if flag not in args
                        for x in (flag, value))


VARIANTS = {name: (label, args if name in BUILDER_VARIANTS or name == "default" else _pinned(args))
            for name, (label, args) in VARIANTS.items()}


def rotated(names: list[str], k: int) -> list[str]:
    """``names`` started at position ``k`` (mod len): round ``k``'s order, so no variant always
    runs first (or right after the same neighbour)."""
    k %= len(names)
    return names[k:] + names[:k]


def log(msg: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def source_key(args: tuple[str, ...]) -> str:
    h = hashlib.sha256(json.dumps(args).encode())
    for p in sorted((ROOT / "sinq_export").rglob("*.py")):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def build(name: str, hf_dir: Path, cache: Path, rebuild: bool) -> tuple[Path, float | None]:
    """The variant's folder (built now or cached) and its build wall time (None: cached)."""
    args = VARIANTS[name][1]
    out = cache / name
    stamp = out / "bench_key.txt"
    key = "genai" + " ".join(args) if name in BUILDER_VARIANTS else source_key(args)
    if not rebuild and stamp.is_file() and stamp.read_text() == key:
        return out, None
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    if name in BUILDER_VARIANTS:
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir),
                        "-o", str(out), "-p", "int4", "-e", "cpu", *args], check=True,
                       capture_output=True, cwd=cache)
    else:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        subprocess.run([sys.executable, "-m", "sinq_export.console", "model", str(hf_dir), "-o", str(out),
                        "--json", *args], check=True, capture_output=True, env=env)
    seconds = time.perf_counter() - t
    stamp.write_text(key)
    return out, seconds


def onnx_file(folder: Path) -> Path:
    """The graph: at the top (the genai builder's folders) or under onnx/ (ours)."""
    return next(p for p in sorted(folder.glob("*.onnx")) + sorted(folder.glob("onnx/*.onnx")))


def size_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and (
        p.suffix in (".onnx", ".data") or p.name.endswith((".onnx.data", ".onnx_data"))
        or ".onnx_data_" in p.name))


def bytes_per_token(folder: Path) -> int:
    """Initializer bytes a decode step reads: all but gather-only tables and rotary caches."""
    import onnx

    model = onnx.load(str(onnx_file(folder)), load_external_data=False)
    readers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for i in node.input:
            readers.setdefault(i, set()).add(node.op_type)
    total = 0
    for t in model.graph.initializer:
        ops = readers.get(t.name, set())
        if not ops or ops <= {"Gather", "GatherBlockQuantized"} or "cos_cache" in t.name \
                or "sin_cache" in t.name:
            continue
        length = next((int(e.value) for e in t.external_data if e.key == "length"), None)
        total += length if length is not None else len(t.raw_data)
    return total


def read_bandwidth_gbs() -> float:
    a = np.ones(128 << 20, dtype=np.float32)  # 512 MiB
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        float(a.sum())
        best = max(best, a.nbytes / (time.perf_counter() - t) / 1e9)
    return best


def run_worker(script: str, args: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(HERE))
    proc = subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True,
                          text=True, env=env, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ops_library(folder: Path) -> list[str]:
    lib = folder / "libsinq_ops.so"
    return ["--ops-library", str(lib)] if lib.is_file() else []


def perplexity(folder: Path, windows: np.ndarray) -> float:
    import math

    import onnxruntime as ort

    from sinq_export.eval import ort_nll

    so = ort.SessionOptions()
    for lib in ops_library(folder)[1:]:
        so.register_custom_ops_library(lib)
    sess = ort.InferenceSession(str(onnx_file(folder)), so, providers=["CPUExecutionProvider"])
    total, count = ort_nll(_ConcretePast(sess, folder), windows)
    return math.exp(total / count)


class _ConcretePast:
    """A session whose past inputs report concrete kv-head / head dims (the genai builder
    leaves them symbolic; `ort_nll` sizes the empty prefill cache from them)."""

    def __init__(self, sess, folder: Path) -> None:
        from types import SimpleNamespace

        dec = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
        dims = (dec["num_key_value_heads"], dec["head_size"])
        self._sess = sess
        self._inputs = [
            SimpleNamespace(name=i.name, type=i.type,
                            shape=[i.shape[0], dims[0], i.shape[2], dims[1]]
                            if i.name.startswith("past_key_values") else i.shape)
            for i in sess.get_inputs()]

    def get_inputs(self):
        return self._inputs

    def __getattr__(self, name: str):
        return getattr(self._sess, name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=None, help="comma list of variants")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=128)
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "e2e"))
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from sinq_export.eval import text_windows
    from sinq_export.models import cache_dir, default_model_dir

    names = args.only.split(",") if args.only else list(VARIANTS)
    hf_dir = default_model_dir()
    cache = cache_dir() / "bench-built"
    cache.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    windows = np.asarray(text_windows(tok, n_windows=4, length=512))
    tokens_file = cache / "tokens.json"
    tokens_file.write_text(json.dumps(windows[0][: args.prompt_tokens + args.decode_steps + 8].tolist()))
    bandwidth = read_bandwidth_gbs()
    log(f"measured single-thread read bandwidth {bandwidth:.1f} GB/s")
    # Build everything first, then time in interleaved rounds (each round runs every variant
    # once, in a rotated order) and compare each variant with genai int4 *of the same round*:
    # the machine's speed drifts by +-30 % over minutes, a paired ratio does not.
    rows, folders = {}, {}
    for name in names:
        log(f"{name}: build")
        folders[name], build_s = build(name, hf_dir, cache, args.rebuild)
        rows[name] = {"variant": name, "label": VARIANTS[name][0], "build_s": build_s,
                      "size_mb": size_bytes(folders[name]) / 1e6,
                      "bytes_per_token": bytes_per_token(folders[name])}
    common = ["--tokens", str(tokens_file), "--prompt-tokens", str(args.prompt_tokens),
              "--decode-steps", str(args.decode_steps)]
    runs: dict[tuple[str, str], list[dict]] = {}
    for r in range(args.rounds):
        log(f"round {r + 1}/{args.rounds}")
        for name in rotated(names, r):
            folder = folders[name]
            for loop, script, extra in (
                    ("genai", "_e2e_genai.py", ["--model-dir", str(folder)]),
                    ("ort", "_e2e_worker.py", ["--model", str(onnx_file(folder)), "--threads", "2",
                                               *ops_library(folder)])):
                runs.setdefault((name, loop), []).append(run_worker(script, [*extra, *common]))
    def decode_rates(name: str, loop: str) -> list[float]:
        return [args.decode_steps / min(x["decode_s"]) for x in runs[name, loop]]

    results = []
    for name in names:
        row = rows[name]
        for loop in ("genai", "ort"):
            decode = decode_rates(name, loop)
            prefill = [args.prompt_tokens / min(x["prefill_s"]) for x in runs[name, loop]]
            row[loop] = {"decode_tok_s": statistics.median(decode),
                         "prefill_tok_s": statistics.median(prefill),
                         "decode_rounds": decode,
                         "peak_rss_mb": max(x["peak_rss_kb"] for x in runs[name, loop]) / 1024,
                         "effective_gbs": statistics.median(decode) * row["bytes_per_token"] / 1e9}
            if "genai-int4" in names:
                base = decode_rates("genai-int4", loop)
                row[loop]["x_genai_int4"] = statistics.median(d / b for d, b in zip(decode, base))
        log(f"{name}: perplexity")
        row["ppl"] = perplexity(folders[name], windows)
        results.append(row)
        log(json.dumps(row))
    meta = {"model": hf_dir.name, "read_bandwidth_gbs": bandwidth, "rounds": args.rounds,
            "load_average": os.getloadavg(), "cpus": os.cpu_count(),
            "prompt_tokens": args.prompt_tokens, "decode_steps": args.decode_steps}
    write_results(Path(args.out), meta, results, markdown(results, meta))
    return 0


def write_results(out: Path, meta: dict, results: list[dict], table: str) -> None:
    """``out``.json (meta + rows) and ``out``.md (the table), which is also printed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    out.with_suffix(".md").write_text(table)
    print(table)


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        f"SmolLM2-135M-Instruct, CPU ({meta['cpus']} cores, load average "
        f"{', '.join(f'{x:.1f}' for x in meta['load_average'])} at the end: shared machine, "
        f"median of {meta['rounds']} interleaved rounds; x int4 = median of per-round ratios), "
        f"prefill {meta['prompt_tokens']} tokens, "
        f"{meta['decode_steps']} decode steps. ppl: 4 x 512 Wikipedia tokens. Measured read "
        f"bandwidth {meta['read_bandwidth_gbs']:.1f} GB/s (one thread).",
        "",
        "| variant | size MB | export s | genai decode tok/s (x int4) | genai prefill tok/s | "
        "ort decode tok/s | peak RSS MB (genai) | MB/token | eff. GB/s | ppl |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        g, o = r["genai"], r["ort"]
        ratio = f" ({g['x_genai_int4']:.2f}x)" if "x_genai_int4" in g else ""
        build = "cached" if r["build_s"] is None else f"{r['build_s']:.0f}"
        lines.append(
            f"| {r['label']} | {r['size_mb']:.1f} | {build} | {g['decode_tok_s']:.0f}{ratio} | "
            f"{g['prefill_tok_s']:.0f} | {o['decode_tok_s']:.0f} | {g['peak_rss_mb']:.0f} | "
            f"{r['bytes_per_token'] / 1e6:.1f} | {g['effective_gbs']:.1f} | {r['ppl']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
