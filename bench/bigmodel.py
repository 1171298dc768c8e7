"""Big-model benchmark (issue 10): streaming export memory and time on Qwen2.5-shaped checkpoints.

Builds random-weight bf16 checkpoints of the real Qwen2.5 shapes (0.5B, 1.5B, 3B; q/k/v bias,
untied lm_head, vocab 151,936, two safetensors shards + index), exports each at 4 bits in a
fresh subprocess under ``/usr/bin/time -v`` (peak RSS of that process alone, wall time), then
runs ``validate`` on the 1.5B export the same way, and records OUT_DIR's size against the ONNX
files. Writes ``bench/results/bigmodel.{md,json}``. Not a test: minutes of CPU, GBs of disk.

    python bench/bigmodel.py [--sizes 0.5B,1.5B,3B] [--method sinq|rtn] [--work DIR] [--keep]
                             [--no-validate]

Why a hand-written safetensors writer (`write_checkpoint`): ``safetensors.torch.save_file``
takes every tensor at once, so generating a 6 GB checkpoint would need 6 GB of RAM. The format
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
RESULTS = ROOT / "bench" / "results"

# Qwen2.5 shapes (config.json of the released models), lm_head untied for all three.
SHAPES = {
    "0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2),
    "1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2),
    "3B": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
               num_attention_heads=16, num_key_value_heads=2),
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
            "stdout": proc.stdout[-4000:], "stderr_tail": tail}


def worker_export(src: str, out: str, method: str = "sinq") -> None:
    """In the subprocess: the default 4-bit export, stage summary as JSON on stdout."""
    import torch

    torch.set_num_threads(2)
    from sinq_export.config import SinqConfig
    from sinq_export.export import export_causal_lm

    result = export_causal_lm(src, out, SinqConfig(bits=4, method=method), overwrite=True,
                              progress=False)
    print(json.dumps({"timings_s": {k: round(v, 2) for k, v in result.timings.items()}}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="0.5B,1.5B,3B")
    ap.add_argument("--work", default="/tmp/sinq-bigmodel")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints and exports")
    ap.add_argument("--no-validate", action="store_true")
    ap.add_argument("--method", default="sinq", choices=("sinq", "rtn"),
                    help="quantizer (default sinq; rtn: same memory path, a fraction of the CPU)")
    ap.add_argument("--worker", nargs=3, metavar=("SRC", "OUT", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker_export(*args.worker)
        return 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    rows = []
    for size in args.sizes.split(","):
        src, out = work / f"qwen2.5-{size}-random", work / f"qwen2.5-{size}-sinq4"
        t0 = time.perf_counter()
        if not (src / "config.json").is_file():
            write_checkpoint(src, size)
        gen_s = time.perf_counter() - t0
        shutil.rmtree(out, ignore_errors=True)
        run = timed([sys.executable, str(Path(__file__).resolve()), "--worker", str(src), str(out),
                     args.method], env)
        params = sum(math.prod(s) for s in tensor_shapes(qwen2_config(size)).values())
        row = {"size": size, "method": args.method, "params": params,
               "checkpoint_bytes": _folder_bytes(src), "generate_s": round(gen_s, 1), "export": run}
        try:
            row["export"]["summary"] = json.loads(run["stdout"].strip().splitlines()[-1])
        except (ValueError, IndexError):
            pass
        if run["rc"] == 0:
            onnx_bytes = sum(p.stat().st_size for p in (out / "onnx").iterdir())
            row["out_dir_bytes"], row["onnx_bytes"] = _folder_bytes(out), onnx_bytes
        if size == "1.5B" and run["rc"] == 0 and not args.no_validate:
            row["validate"] = timed([sys.executable, "-m", "sinq_export.cli", "validate", str(out),
                                     "--tokens", "128", "--decode-steps", "4", "--json",
                                     str(work / "validate-1.5B.json")], env)
        rows.append(row)
        write_results(rows)  # after every size: a long run keeps what it measured
        print(json.dumps(row, default=str)[:2000], flush=True)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(src, ignore_errors=True)
    return 0


def write_results(rows: list[dict]) -> None:
    """Merge ``rows`` into bench/results/bigmodel.{json,md} (rows of other sizes are kept)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    try:
        old = json.loads((RESULTS / "bigmodel.json").read_text())["rows"]
    except (OSError, ValueError, KeyError):
        old = []
    sizes = {r["size"] for r in rows}
    order = list(SHAPES)
    rows = sorted([r for r in old if r["size"] not in sizes] + rows,
                  key=lambda r: order.index(r["size"]) if r["size"] in order else 99)
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores (quiet: no other job "
                       "ran while measured)",
            "command": "python bench/bigmodel.py", "rows": rows}
    (RESULTS / "bigmodel.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
    lines = ["# Streaming export of Qwen2.5-shaped random checkpoints (bf16, 2 shards, untied lm_head)",
             "", f"Machine: {meta['machine']}. Export: default 4-bit SINQ, group 64, one fresh "
             "process each, measured by `/usr/bin/time -v`.", "",
             "| shape | params | checkpoint | export wall | export CPU (user+sys) | export peak RSS | "
             "OUT_DIR | ONNX files | validate (1.5B) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e, v = r["export"], r.get("validate")
        val = "-" if v is None else (f"rc {v['rc']}, {v['wall_s']} s, {v['peak_rss_mb']} MB peak")
        lines.append(
            f"| {r['size']} ({r.get('method', 'sinq')}) | {r['params'] / 1e9:.2f} B | "
            f"{r['checkpoint_bytes'] / 1e9:.2f} GB | "
            f"{e['wall_s']} s (rc {e['rc']}, {e.get('cpu_percent')}% CPU) | {e.get('cpu_s')} s | "
            f"{e['peak_rss_mb']} MB | "
            f"{r.get('out_dir_bytes', 0) / 1e9:.3f} GB | {r.get('onnx_bytes', 0) / 1e9:.3f} GB | {val} |")
    lines.append("")
    for r in rows:
        if r.get("validate", {}).get("result"):
            lines.append(f"- {r['size']} validate: {r['validate']['result']}")
        if r.get("note"):
            lines.append(f"- {r['size']}: {r['note']}")
    (RESULTS / "bigmodel.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
