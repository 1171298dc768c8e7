"""Operator benchmark: sinq.ops::SinqMatMulNBits vs stock com.microsoft::MatMulNBits vs MatMul.

Measures microseconds per call, on CPU with a fixed intra-op thread count (default 2), for
    * ours (SinqMatMulNBits) at bits 2..8, without and with the fused col_scale input;
    * stock MatMulNBits at bits 2/4/8, accuracy_level 0 and 4 (the same packed weights);
    * fp32 MatMul (the float weight),
at K = N = 4096 and SmolLM2-135M's linear shapes, M = 1 (decode) and M = 128 (prefill).

Method. Every variant is an ONNX graph of L identical-shape nodes, each with its own
weights (so small shapes are not timed from a hot L1/L2 with one weight, and per-Run overhead
is amortised), all reading the same input A, outputs bound once with IO binding. One "round"
runs every variant back to back; the reported time is the median over rounds of
(round time / (iterations x L)). Interleaving the variants round by round means a load change
on the (shared) machine hits all variants alike, so ratios from one run are comparable.
Weights: random codes, asymmetric (packed uint8 zero points), block size 64 by default.

Writes ``bench/results/op_bench.md`` and ``op_bench.json``.

    python bench/op_bench.py                 # full run (a few minutes on 2 cores)
    python bench/op_bench.py --quick         # fewer rounds, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sinq_export import runtime_ops as ro  # noqa: E402
from sinq_export.quant import packing  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _sysinfo import cpu_name  # noqa: E402

# (label, N, K): weight shape [N, K] = [out_features, in_features]
SHAPES = [
    ("4096x4096", 4096, 4096),
    ("q/o_proj 576x576", 576, 576),
    ("gate/up 1536x576", 1536, 576),
    ("down 576x1536", 576, 1536),
    ("k/v 192x576", 192, 576),
]


def _weights(bits: int, bs: int, n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (n, k), generator=g)
    nb = packing.n_blocks(k, bs)
    z = torch.randint(0, 2**bits, (n, nb), generator=g)
    s = (torch.rand(n, nb, generator=g) * 0.02 + 0.001).numpy().astype(np.float32)
    return packing.pack_codes(q, bits, bs).numpy(), s, packing.pack_zero_points(z, bits).numpy()


def _graph(nodes, inits, n_out, out_dim):
    g = helper.make_graph(
        nodes,
        "bench",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", None])],
        [helper.make_tensor_value_info(f"Y{i}", TensorProto.FLOAT, ["M", out_dim]) for i in range(n_out)],
        inits,
    )
    m = helper.make_model(
        g,
        opset_imports=[
            helper.make_opsetid("", 21),
            helper.make_opsetid("com.microsoft", 1),
            helper.make_opsetid(ro.DOMAIN, ro.OPSET_VERSION),
        ],
        ir_version=10,
    )
    return m.SerializeToString()


def build_model(kind: str, bits: int, bs: int, n: int, k: int, copies: int, col: bool, acc: int = 0) -> bytes:
    nodes, inits = [], []
    rng = np.random.default_rng(0)
    for i in range(copies):
        if kind == "matmul":
            w = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
            inits.append(numpy_helper.from_array(w, f"W{i}"))
            nodes.append(helper.make_node("MatMul", ["A", f"W{i}"], [f"Y{i}"]))
            continue
        packed, scales, zps = _weights(bits, bs, n, k, seed=i)
        inits += [
            numpy_helper.from_array(packed, f"B{i}"),
            numpy_helper.from_array(scales, f"S{i}"),
            numpy_helper.from_array(zps, f"Z{i}"),
        ]
        if kind == "sinq":
            ins = ["A", f"B{i}", f"S{i}", f"Z{i}"]
            if col:
                c = rng.uniform(0.5, 2.0, k).astype(np.float32)
                inits.append(numpy_helper.from_array(c, f"C{i}"))
                ins.append(f"C{i}")
            nodes.append(ro.make_node(ins, f"Y{i}", K=k, N=n, bits=bits, block_size=bs))
        else:
            nodes.append(
                helper.make_node(
                    "MatMulNBits",
                    ["A", f"B{i}", f"S{i}", f"Z{i}"],
                    [f"Y{i}"],
                    domain="com.microsoft",
                    K=k,
                    N=n,
                    bits=bits,
                    block_size=bs,
                    accuracy_level=acc,
                )
            )
    return _graph(nodes, inits, copies, n)


class Runner:
    """One session (all M share it: the graph's M is dynamic); IO binding per M."""

    def __init__(self, model: bytes, n: int, copies: int, threads: int, spin: bool):
        so = ro.session_options(intra_op_num_threads=threads)
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        self.n, self.copies = n, copies

    def bind(self, a: np.ndarray) -> None:
        self.binding = self.sess.io_binding()
        self.a = ort.OrtValue.ortvalue_from_numpy(a)
        self.binding.bind_ortvalue_input("A", self.a)
        self.outs = []
        for i in range(self.copies):
            y = ort.OrtValue.ortvalue_from_numpy(np.zeros((a.shape[0], self.n), np.float32))
            self.outs.append(y)
            self.binding.bind_ortvalue_output(f"Y{i}", y)

    def __call__(self, iters: int) -> tuple[float, float]:
        """(wall us, process CPU us) per call of one node."""
        c, t = time.process_time(), time.perf_counter()
        for _ in range(iters):
            self.sess.run_with_iobinding(self.binding)
        t, c = time.perf_counter() - t, time.process_time() - c
        return t / (iters * self.copies) * 1e6, c / (iters * self.copies) * 1e6


def variants(bits_list):
    out = [("fp32 MatMul", "matmul", 32, False, 0)]
    for b in (2, 4, 8):
        for acc in (0, 4):
            out.append((f"stock {b}-bit acc{acc}", "stock", b, False, acc))
    for b in bits_list:
        out.append((f"sinq {b}-bit", "sinq", b, False, 0))
        out.append((f"sinq {b}-bit +col", "sinq", b, True, 0))
    return out


def bench_shape(n, k, ms, args, vlist):
    """{M: {"best"|"median"|"max"|"cpu_best": {variant: us}}} for one weight shape."""
    copies = max(1, min(args.max_copies, round(4096 * 4096 / (n * k))))
    runners = {
        name: Runner(
            build_model(kind, bits, args.block_size, n, k, copies, col, acc),
            n,
            copies,
            args.threads,
            args.spin,
        )
        for name, kind, bits, col, acc in vlist
    }
    out = {}
    for m in ms:
        a = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
        iters = {}
        for name, r in runners.items():  # calibrate: one variant-round takes ~target ms
            r.bind(a)
            r(1)
            us = r(1)[0]
            iters[name] = max(1, int(args.target_ms * 1e3 / max(us * copies, 1.0)))
            r(iters[name])  # warm-up
        samples = {name: [] for name in runners}
        cpu = {name: [] for name in runners}
        for _ in range(args.rounds):
            for name, r in runners.items():
                wall, c = r(iters[name])
                samples[name].append(wall)
                cpu[name].append(c)
        out[m] = {
            "best": {name: min(v) for name, v in samples.items()},
            "median": {name: statistics.median(v) for name, v in samples.items()},
            "max": {name: max(v) for name, v in samples.items()},
            "cpu_best": {name: min(v) for name, v in cpu.items()},
            "paired": paired_ratios(runners, args, bits_list_of(vlist)),
        }
    del runners
    return out, copies


def bits_list_of(vlist):
    return sorted({bits for _, kind, bits, _, _ in vlist if kind == "sinq"})


def paired_ratios(runners, args, bits_list):
    """Target ratios measured as pairs run back to back (A B A B ...), ~args.pair_ms each.

    The median over pairs of (B / A) is insensitive to the load drift of a shared machine,
    which a ratio of two separately taken times is not.
    """

    def ratio(a_name, b_name):
        ra, rb = runners[a_name], runners[b_name]
        n_a = max(1, int(args.pair_ms * 1e3 / max(ra(1)[0] * ra.copies, 1.0)))
        n_b = max(1, int(args.pair_ms * 1e3 / max(rb(1)[0] * rb.copies, 1.0)))
        wall, cpu = [], []
        for _ in range(args.pairs):
            wa, ca = ra(n_a)
            wb, cb = rb(n_b)
            wall.append(wb / wa)
            cpu.append(cb / ca)
        return {
            "wall": statistics.median(wall),
            "cpu": statistics.median(cpu),
            "wall_q": statistics.quantiles(wall, n=4),
            "cpu_q": statistics.quantiles(cpu, n=4),
        }

    out = {}
    if "sinq 3-bit" in runners:
        out["3-bit/stock4acc0"] = ratio("stock 4-bit acc0", "sinq 3-bit")
    for b in bits_list:
        out[f"col/{b}"] = ratio(f"sinq {b}-bit", f"sinq {b}-bit +col")
    return out


_CHILD = """
import sys, numpy as np, onnxruntime as ort
model, lib, m, k, n, iters = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.register_custom_ops_library(lib)
sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
a = np.random.default_rng(0).standard_normal((m, k)).astype(np.float32)
for _ in range(iters):
    sess.run(None, {"A": a})
"""


def count_instructions(args, shape, bits_list, ms) -> dict:
    """Instructions per call of the op (callgrind, only inside the kernel's compute), +col vs not.

    Instruction counts do not depend on the machine's load, so they pin down the fused
    col_scale's cost where timings on a shared machine cannot (valgrind emulates no AVX-512:
    this counts the AVX2 path).
    """
    import subprocess
    import tempfile

    label, n, k = shape
    jobs = []
    tmp = Path(tempfile.mkdtemp(prefix="sinq_ops_ir."))
    for bits in bits_list:
        for col in (False, True):
            path = tmp / f"b{bits}_c{int(col)}.onnx"
            path.write_bytes(build_model("sinq", bits, args.block_size, n, k, 1, col))
            for m in ms:
                jobs.append((bits, col, m, path))
    counts = {}
    procs = []

    def launch(job, iters):
        bits, col, m, path = job
        out = tmp / f"cg.{bits}.{int(col)}.{m}.{iters}"
        cmd = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            "--toggle-collect=*CpuKernel*compute*",
            sys.executable,
            "-c",
            _CHILD,
            str(path),
            str(ro.library_path()),
            str(m),
            str(k),
            str(n),
            str(iters),
        ]
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    # Two runs per job (1 and 3 calls): the difference / 2 is the per-call count, free of any
    # one-off cost (first-call allocations).
    work = [(job, it) for job in jobs for it in (1, 3)]
    results = {}
    while work or procs:
        while work and len(procs) < max(1, args.threads):
            job, it = work.pop(0)
            procs.append((job, it, launch(job, it)))
        job, it, proc = procs.pop(0)
        _, err = proc.communicate()
        mm = re.search(r"Collected : (\d+)", err)
        if proc.returncode != 0 or not mm:
            raise RuntimeError(f"valgrind run failed: {err[-2000:]}")
        results[(job[0], job[1], job[2], it)] = int(mm.group(1))
    for bits, col, m, _ in jobs:
        per_call = (results[(bits, col, m, 3)] - results[(bits, col, m, 1)]) / 2
        counts[f"{bits}/{int(col)}/{m}"] = per_call
    return {"shape": label, "N": n, "K": k, "per_call": counts}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--target-ms", type=float, default=25.0, help="time per variant per round")
    ap.add_argument("--max-copies", type=int, default=32)
    ap.add_argument("--bits", default="2,3,4,5,6,7,8")
    ap.add_argument("--shapes", default="all", help="comma-separated labels' first word, or all")
    ap.add_argument("--m", default="1,128")
    ap.add_argument("--pairs", type=int, default=31, help="A/B pairs per target ratio")
    ap.add_argument("--pair-ms", type=float, default=15.0, help="time per side of one pair")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--instructions",
        action="store_true",
        help="only count instructions per call with callgrind (+col vs not) for the "
        "down 576x1536 shape and write op_bench_instructions.{md,json}",
    )
    ap.add_argument(
        "--spin",
        action="store_true",
        help="let onnxruntime's pool threads spin (off by default: on a shared machine "
        "spinning threads steal the cores the other thread needs)",
    )
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.target_ms, args.pairs = 3, 10.0, 5
    bits_list = [int(b) for b in args.bits.split(",")]
    ms = [int(x) for x in args.m.split(",")]
    shapes = (
        SHAPES if args.shapes == "all" else [s for s in SHAPES if s[0].split()[0] in args.shapes.split(",")]
    )
    ro.ensure_built()
    vlist = variants(bits_list)
    if args.instructions:
        return instructions_main(args, bits_list, ms)

    results = []
    for label, n, k in shapes:
        t0 = time.perf_counter()
        per_m, copies = bench_shape(n, k, ms, args, vlist)
        for m, res in per_m.items():
            results.append(
                {
                    "shape": label,
                    "N": n,
                    "K": k,
                    "M": m,
                    "copies": copies,
                    "us": res["best"],
                    "median_us": res["median"],
                    "max_us": res["max"],
                    "cpu_us": res["cpu_best"],
                    "paired": res["paired"],
                }
            )
            print(
                f"{label:>18} M={m:<4} ({time.perf_counter() - t0:.0f}s, {copies} copies): "
                + ", ".join(f"{k_}={v:.1f}" for k_, v in res["best"].items()),
                file=sys.stderr,
                flush=True,
            )

    meta = {
        "onnxruntime": ort.__version__,
        "threads": args.threads,
        "block_size": args.block_size,
        "rounds": args.rounds,
        "pairs": args.pairs,
        "spin": args.spin,
        "cpu": cpu_name(),
        "machine": platform.machine(),
        "isa": os.environ.get("SINQ_OPS_ISA", "auto"),
        "library": str(ro.library_path()),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "op_bench.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    md = render(meta, results, vlist, bits_list)
    (out / "op_bench.md").write_text(md)
    print(md)
    return 0


def instructions_main(args, bits_list, ms) -> int:
    shape = next(s for s in SHAPES if s[0].startswith("down"))
    res = count_instructions(args, shape, bits_list, ms)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "op_bench_instructions.json").write_text(json.dumps(res, indent=1))
    lines = [
        "# SinqMatMulNBits: instructions per call, fused col_scale vs none",
        "",
        f"callgrind (`valgrind --tool=callgrind`), counting only inside the kernel's compute "
        f"(1 thread, AVX2 path: valgrind has no AVX-512), shape {res['shape']} "
        f"(N={res['N']}, K={res['K']}), block size {args.block_size}; per call = "
        "(3 calls - 1 call) / 2. Deterministic: independent of the machine's load.",
        "",
        "| bits | M | instructions, no col_scale | with col_scale | overhead |",
        "|---:|---:|---:|---:|---:|",
    ]
    for bits in bits_list:
        for m in ms:
            a = res["per_call"][f"{bits}/0/{m}"]
            b = res["per_call"][f"{bits}/1/{m}"]
            lines.append(f"| {bits} | {m} | {a:,.0f} | {b:,.0f} | {(b / a - 1) * 100:+.3f}% |")
    md = "\n".join(lines) + "\n"
    (out / "op_bench_instructions.md").write_text(md)
    print(md)
    return 0


def render(meta, results, vlist, bits_list) -> str:
    lines = [
        "# SinqMatMulNBits operator benchmark",
        "",
        f"onnxruntime {meta['onnxruntime']}, CPU `{meta['cpu']}`, {meta['threads']} intra-op "
        f"threads (spinning {'on' if meta['spin'] else 'off'}), block size {meta['block_size']}, "
        "asymmetric (uint8 zero points), fp32 activations, random codes; "
        f"kernel ISA: {meta['isa']}; {meta['date_utc']} UTC. Produced by `bench/op_bench.py`.",
        "",
        f"Every variant runs once per round, {meta['rounds']} interleaved rounds. **Wall** = "
        "best round's wall time per call (the machine is shared with other jobs; the best round is "
        "the least disturbed one; medians are in the JSON). **CPU** = best round's process CPU "
        "time per call (all threads), which other jobs' load barely affects.",
        "Cells: µs per call (ratio to stock 4-bit MatMulNBits accuracy_level 0, same shape, same "
        "metric). Shapes are weight [N, K] = [out, in]; `+col` = fused col_scale input.",
        "",
    ]
    for key, title in (("us", "Wall"), ("cpu_us", "CPU")):
        for m in sorted({r["M"] for r in results}):
            rows = [r for r in results if r["M"] == m]
            lines += [
                f"## {title}, M = {m}",
                "",
                "| variant | " + " | ".join(r["shape"] for r in rows) + " |",
                "|---|" + "---:|" * len(rows),
            ]
            for name, *_ in vlist:
                cells = []
                for r in rows:
                    us, ref = r[key][name], r[key]["stock 4-bit acc0"]
                    cells.append(f"{us:,.1f} ({us / ref:.2f})")
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += [
        "## Targets",
        "",
        "Measured as A/B pairs run back to back (median of per-pair ratios over "
        f"{meta['pairs']} pairs; in brackets the interquartile range), which a shared machine's "
        "load drift does not bias. Target 1: sinq 3-bit at M = 1 no slower than stock 4-bit "
        "acc0 (ratio <= 1). Target 2: fused col_scale costs <= 3% (ratio +col / no-col <= 1.03).",
        "",
        "| shape | M | 3-bit / stock 4-bit acc0, wall | CPU | col_scale: +col / no-col, wall, "
        "per bits 2..8 | CPU, per bits 2..8 |",
        "|---|---:|---:|---:|---|---|",
    ]
    for r in results:
        pr = r["paired"]
        t1 = pr.get("3-bit/stock4acc0")

        def fmt(d, key):
            q = d[key + "_q"]
            return f"{d[key]:.2f} [{q[0]:.2f}-{q[2]:.2f}]"

        cols = [pr[f"col/{b}"] for b in bits_list]
        lines.append(
            f"| {r['shape']} | {r['M']} | {fmt(t1, 'wall') if t1 else '-'} | "
            f"{fmt(t1, 'cpu') if t1 else '-'} | "
            + " ".join(f"{c['wall']:.3f}" for c in cols)
            + " | "
            + " ".join(f"{c['cpu']:.3f}" for c in cols)
            + " |"
        )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
