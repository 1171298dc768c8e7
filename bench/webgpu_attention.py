#!/usr/bin/env python
"""Does onnxruntime-web's WebGPU attention still need the prompt in runs of 16 tokens?

One `GroupQueryAttention` node (SmolLM2's 9 query / 3 kv heads of 64, rotary) with random
inputs, run in headless Chromium's WebGPU (SwiftShader where there is no GPU) and in Python
onnxruntime's CPU kernels: the whole prompt in one run at several lengths, and runs of 16 new
tokens on top of a past. `js/web_ort.mjs::prefillChunk` feeds prompts in runs of 16 on adapters
whose subgroups are narrower than 16 lanes because the one-run rows came out wrong there
(docs/runtimes.md); when this prints every row right for the installed onnxruntime-web, the
rule can go.

    python bench/webgpu_attention.py [--lengths 16,28,32,64] [--runs 16:48,16:224]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from sinq_export.validate import js  # noqa: E402  (the repo, not an install)

HEADS, KV_HEADS, HEAD = 9, 3, 64
TYPES = {np.dtype(np.float32): "float32", np.dtype(np.int32): "int32", np.dtype(np.int64): "int64"}


def attention(new: int, past: int, max_len: int = 512) -> tuple[bytes, dict[str, np.ndarray]]:
    """One GroupQueryAttention node and its feeds: ``new`` tokens on top of ``past``."""
    def value_info(name: str, dtype: int, shape: list[int]):
        return helper.make_tensor_value_info(name, dtype, shape)

    inv = 1.0 / (10000 ** (np.arange(0, HEAD, 2) / HEAD))
    angles = np.arange(max_len)[:, None] * inv[None]
    node = helper.make_node(
        "GroupQueryAttention", ["q", "k", "v", "past_k", "past_v", "seqlens_k", "total", "cos",
                                "sin"], ["y", "present_k", "present_v"], domain="com.microsoft",
        num_heads=HEADS, kv_num_heads=KV_HEADS, scale=HEAD ** -0.5, do_rotary=1)
    graph = helper.make_graph(
        [node], "attention",
        [value_info("q", TensorProto.FLOAT, [1, new, HEADS * HEAD]),
         value_info("k", TensorProto.FLOAT, [1, new, KV_HEADS * HEAD]),
         value_info("v", TensorProto.FLOAT, [1, new, KV_HEADS * HEAD]),
         value_info("past_k", TensorProto.FLOAT, [1, KV_HEADS, past, HEAD]),
         value_info("past_v", TensorProto.FLOAT, [1, KV_HEADS, past, HEAD]),
         value_info("seqlens_k", TensorProto.INT32, [1]), value_info("total", TensorProto.INT32, [])],
        [value_info("y", TensorProto.FLOAT, [1, new, HEADS * HEAD])],
        [numpy_helper.from_array(np.cos(angles).astype(np.float32), "cos"),
         numpy_helper.from_array(np.sin(angles).astype(np.float32), "sin")])
    model = helper.make_model(graph, ir_version=10, opset_imports=[
        helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    rng = np.random.default_rng(new * 1000 + past)
    feeds = {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in (
        ("q", (1, new, HEADS * HEAD)), ("k", (1, new, KV_HEADS * HEAD)),
        ("v", (1, new, KV_HEADS * HEAD)), ("past_k", (1, KV_HEADS, past, HEAD)),
        ("past_v", (1, KV_HEADS, past, HEAD)))}
    feeds["seqlens_k"] = np.array([past + new - 1], np.int32)
    feeds["total"] = np.array(past + new, np.int32)
    return model.SerializeToString(), feeds


def run_webgpu(graph: bytes, feeds: dict[str, np.ndarray], job: Path) -> tuple[np.ndarray, dict]:
    """The node's output ``y`` in onnxruntime-web's WebGPU (headless Chromium)."""
    (job / "graph.onnx").write_bytes(graph)
    specs = []
    for name, array in feeds.items():
        array.tofile(job / f"in_{name}.bin")
        specs.append({"name": name, "url": f"/job/in_{name}.bin", "type": TYPES[array.dtype],
                      "dims": list(array.shape)})
    (job / "job.json").write_text(json.dumps({"backend": "webgpu", "graph": "/job/graph.onnx",
                                              "feeds": specs, "put": "/job/out_"}))
    server, url = js.load_server().start({}, job=job)
    try:
        result = js.run_page(f"{url}/js/run_graph.html?job=/job/job.json", "webgpu", 600.0)
    finally:
        server.shutdown()
        server.server_close()
    meta = result["outputs"]["y"]
    y = np.fromfile(job / f"out_{meta['index']}.bin", np.float32).reshape(meta["dims"])
    return y, result["adapter"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="16,28,32,64", help="prompt lengths run in one go")
    ap.add_argument("--runs", default="16:48,16:224", help="NEW:PAST pairs (a run on a past)")
    args = ap.parse_args()
    cases = [(int(n), 0) for n in args.lengths.split(",") if n]
    cases += [tuple(int(x) for x in pair.split(":")) for pair in args.runs.split(",") if pair]
    adapter = None
    for new, past in cases:
        graph, feeds = attention(new, past)
        cpu = ort.InferenceSession(graph, providers=["CPUExecutionProvider"]).run(["y"], feeds)[0]
        with tempfile.TemporaryDirectory(prefix="webgpu-attention-") as job:
            web, adapter = run_webgpu(graph, feeds, Path(job))
        scale = float(np.abs(cpu).max())
        rows = np.abs(web - cpu).reshape(new, -1).max(axis=1) / scale
        wrong = np.nonzero(rows > 1e-3)[0]
        print(f"{new:4d} new tokens on a past of {past:4d}: max rel {rows.max():.1e}, "
              f"{len(wrong)} of {new} rows wrong" + (f" (first: {wrong[0]})" if len(wrong) else ""),
              flush=True)
    if adapter:
        print(f"adapter: {adapter.get('vendor')} {adapter.get('architecture')}, subgroups "
              f"{adapter.get('subgroupMaxSize')} lanes wide")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
