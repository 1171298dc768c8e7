#!/usr/bin/env python
"""Browser speed: the web sample (samples/web/) driven headless on real SmolLM2 exports.

    python bench/browser.py --ours OUT_DIR --builder GENAI_INT4_DIR
    python bench/browser.py --ours OUT_DIR --builder GENAI_INT4_DIR --backends wasm1 --tokens 32
    python bench/browser.py --ours OUT_DIR --web WEB_DIR --builder GENAI_INT4_DIR

For each model and backend the sample page (the one a user opens) loads the folder from
``js/serve.py`` (127.0.0.1, cross-origin isolated), tokenizes the prompt, and generates
``--tokens`` greedy tokens (EOS ignored) in onnxruntime-web inside Debian's Chromium, headless:

* ``wasm1``: WASM, one thread;
* ``wasmN``: WASM, ``--threads`` threads (SharedArrayBuffer: needs the COOP/COEP headers);
* ``webgpu``: WebGPU; on a machine without a GPU Chromium's software adapter (SwiftShader)
  runs the WGSL kernels on the CPU - very slow, so it gets ``--webgpu-tokens`` tokens.

Models: ``--ours``, a ``sinq-export model`` folder (default export when created here),
optionally ``--web``, the ``web`` preset (``sinq-export model --preset web``), and
``--builder``, ``python -m onnxruntime_genai.models.builder -i HF -o OUT -p int4 -e cpu``.
A folder that does not exist is created with exactly those commands (HF: the converted SmolLM2
in the sinq-export cache). Reported: decode tok/s (tokens after the first / their time),
time to the first token (prefill of the prompt), load time, which backend and adapter ran.
Writes ``bench/results/browser.{md,json}``. Timings on a shared machine are noisy: the table
records the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

PROMPT = "The capital of France is"


def ensure_ours(folder: Path, preset: str = "default") -> None:
    if not folder.exists():
        subprocess.run([sys.executable, "-m", "sinq_export.console", "model", "--preset", preset,
                        "-o", str(folder)], check=True)


def ensure_builder(folder: Path) -> None:
    if folder.exists():
        return
    from sinq_export.models import default_model_dir

    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i",
                    str(default_model_dir()), "-o", str(folder), "-p", "int4", "-e", "cpu"],
                   check=True)


def run_page(url: str, backend: str, timeout: float) -> dict:
    """The page's result, or ``{"error": ...}`` (one table row either way)."""
    from sinq_export.validate import js
    from sinq_export.validate.providers import ValidationError

    try:
        return js.run_page(url, backend, timeout)
    except ValidationError as e:
        return {"error": str(e)}


def backends(spec: str, threads: int) -> list[tuple[str, str, int]]:
    """(label, page backend, threads) for ``wasm1,wasmN,webgpu``."""
    out = []
    for name in spec.split(","):
        if name == "wasm1":
            out.append(("WASM 1 thread", "wasm", 1))
        elif name == "wasmN":
            out.append((f"WASM {threads} threads", "wasm", threads))
        elif name == "webgpu":
            out.append(("WebGPU", "webgpu", 1))
        else:
            raise SystemExit(f"unknown backend {name!r}: wasm1, wasmN, webgpu")
    return out


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and (
        ".onnx" in p.name)) / 1e6


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"Browser decode speed, SmolLM2-135M-Instruct, `{meta['prompt']}` + greedy tokens "
             f"(EOS ignored); {meta['chromium']}, onnxruntime-web {meta['ort']}; {meta['cpu']}, "
             f"load average {meta['loadavg']} at start and per row (shared machine: noisy).", "",
             "| model | size MB | backend | tokens | decode tok/s | first token s | load s | ran on "
             "| load avg |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['size_mb']:.1f} | {r['label']} | - | error: "
                         f"{r['error']} | | | | |")
            continue
        ran = (f"WebGPU, {'software adapter' if r['adapter'].get('software') else 'GPU'} "
               f"({r['adapter'].get('vendor', '')} {r['adapter'].get('architecture', '')})"
               if r.get("adapter") else f"WASM, {r['threads']} thread(s), isolated={r['isolated']}")
        tps = r["decode_tokens_per_s"]
        lines.append(f"| {r['model']} | {r['size_mb']:.1f} | {r['label']} | {len(r['ids'])} | "
                     f"{tps:.3g} | {r['first_token_s']:.2f} | {r['load_s']:.1f} | {ran} | "
                     f"{r['loadavg']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ours", type=Path, required=True, help="a `sinq-export model` folder")
    ap.add_argument("--web", type=Path, help="a `sinq-export model --preset web` folder")
    ap.add_argument("--builder", type=Path, required=True, help="the genai builder's int4 folder")
    ap.add_argument("--backends", default="wasm1,wasmN,webgpu")
    ap.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--webgpu-tokens", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per page run")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "browser")
    args = ap.parse_args(argv)

    from sinq_export.validate import js

    for runtime in ("wasm", "web-webgpu"):
        if (why := js.missing(runtime)) is not None:
            raise SystemExit(f"bench/browser.py: {why}")
    ensure_ours(args.ours)
    if args.web is not None:
        ensure_ours(args.web, "web")
    ensure_builder(args.builder)
    sys.path.insert(0, str(HERE))
    from _sysinfo import cpu_name

    chromium = subprocess.run([js.chromium_path(), "--version"], capture_output=True,
                              text=True).stdout.strip()
    meta = {"prompt": PROMPT, "chromium": chromium, "cpu": f"{cpu_name()}, {os.cpu_count()} cores",
            "loadavg": " ".join(f"{x:.1f}" for x in os.getloadavg()), "ort": "",
            "tokens": args.tokens, "webgpu_tokens": args.webgpu_tokens}
    models = {"ours": ("sinq-export default", args.ours), "web": ("sinq-export web", args.web),
              "builder": ("genai builder int4", args.builder)}
    models = {name: entry for name, entry in models.items() if entry[1] is not None}
    server, url = js.load_server().start({name: folder for name, (_, folder) in models.items()})
    rows = []
    try:
        for label, backend, threads in backends(args.backends, args.threads):
            for name, (model, folder) in models.items():
                tokens = args.webgpu_tokens if backend == "webgpu" else args.tokens
                query = urllib.parse.urlencode({"autorun": 1, "model": name, "backend": backend,
                                                "threads": threads, "prompt": PROMPT,
                                                "tokens": tokens, "ignore_eos": 1})
                start, loadavg = time.perf_counter(), os.getloadavg()[0]
                result = run_page(f"{url}/samples/web/?{query}", backend, args.timeout)
                row = {**result, "model": model, "folder": str(folder),
                       "size_mb": folder_mb(folder), "label": label, "loadavg": loadavg,
                       "wall_s": time.perf_counter() - start}
                meta["ort"] = result.get("ort") or meta["ort"]
                print(json.dumps({k: v for k, v in row.items() if k not in ("ids", "prompt_ids")}),
                      flush=True)
                rows.append(row)
    finally:
        server.shutdown()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    table = markdown(rows, meta)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
