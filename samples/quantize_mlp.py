#!/usr/bin/env python
"""The Python API on a plain torch MLP: quantize, export to ONNX, check ONNX against torch.

    python samples/quantize_mlp.py                 # 4-bit, group 64, into a temp folder
    python samples/quantize_mlp.py --bits 3 --runtime custom -o out/mlp3 --json

Steps:
1. ``quantize_model`` on copies of the float MLP (SINQ and the RTN baseline): every
   ``nn.Linear`` becomes a ``SinqLinear``; we print each copy's output error against float.
2. ``sinq_export.export.export_module``: traces the float module, quantizes it with the same
   config and rewrites its MatMul/Gemm nodes to ``MatMulNBits`` (or ``sinq.ops::SinqMatMulNBits``
   for 3/5/6/7-bit) - ``OUT/model.onnx`` plus ``sinq_export.json`` and a PyTorch reference.
3. Validation: onnxruntime's output on fresh inputs against the quantized torch module
   (``result.model``), then ``sinq_export.validate.validate`` layer by layer.

Exit code 0 only when the ONNX model matches the quantized torch module.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sinq_export import GraphConfig, SinqConfig, quantize_model
from sinq_export.export import export_module
from sinq_export.validate import validate


class MLP(nn.Module):
    """A LLaMA-style gated MLP block with a residual, on [batch, tokens, d] activations."""

    def __init__(self, d: int = 256, hidden: int = 768) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def make_mlp(seed: int = 0) -> MLP:
    """Random weights with a few outlier input channels and rows, as trained LLM weights have."""
    torch.manual_seed(seed)
    mlp = MLP()
    with torch.no_grad():
        for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            w = torch.randn_like(lin.weight) * 0.02
            w[:, torch.randperm(w.shape[1])[:4]] *= 8.0  # outlier columns
            w[torch.randperm(w.shape[0])[:4]] *= 4.0  # outlier rows
            lin.weight.copy_(w)
    return mlp.eval()


def rel_error(ref: torch.Tensor | np.ndarray, test: torch.Tensor | np.ndarray) -> float:
    ref, test = np.asarray(ref, dtype=np.float64), np.asarray(test, dtype=np.float64)
    return float(np.linalg.norm(ref - test) / np.linalg.norm(ref))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--output", default=None, help="export folder (default: a temp folder)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--runtime", choices=("stock", "custom"), default="stock",
                    help="custom: 3/5/6/7-bit layers as sinq.ops::SinqMatMulNBits")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    mlp = make_mlp()
    x = torch.randn(2, 16, 256)
    with torch.no_grad():
        y_float = mlp(x)

    # 1. quantize in PyTorch: SINQ against the RTN baseline
    errors = {}
    for method in ("rtn", "sinq"):
        q = copy.deepcopy(mlp)
        quantize_model(q, SinqConfig(bits=args.bits, group_size=args.group_size, method=method),
                       progress=False)
        with torch.no_grad():
            errors[method] = rel_error(y_float, q(x))

    # 2. export: float trace + the same quantization + graph rewrite
    config = SinqConfig(bits=args.bits, group_size=args.group_size)
    tmp = None
    if args.output is None:
        tmp = tempfile.TemporaryDirectory(prefix="sinq-mlp-")
        out_dir = Path(tmp.name) / "mlp"
    else:
        out_dir = Path(args.output)
    result = export_module(mlp, x, out_dir, config, GraphConfig(runtime=args.runtime),
                           input_names=["x"], output_names=["y"],
                           dynamic_axes={"x": {0: "batch", 1: "tokens"}, "y": {0: "batch", 1: "tokens"}},
                           overwrite=args.output is not None, progress=False)
    meta = json.loads((out_dir / "sinq_export.json").read_text())

    # 3a. onnxruntime vs the quantized torch module, on inputs of another shape
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if "sinq.ops" in meta["onnx"]["custom_domains"]:
        from sinq_export import runtime_ops

        so = runtime_ops.session_options(so)
    sess = ort.InferenceSession(str(out_dir / "model.onnx"), so, providers=["CPUExecutionProvider"])
    x2 = torch.randn(3, 7, 256)
    with torch.no_grad():
        y_torch = result.model(x2).numpy()
    (y_onnx,) = sess.run(["y"], {"x": x2.numpy()})
    onnx_vs_torch = rel_error(y_torch, y_onnx)

    # 3b. the validator: every quantized node against its torch SinqLinear
    report = validate(out_dir, reference=result.model, tokens=8)

    ok = onnx_vs_torch < 1e-4 and report.passed
    summary = {
        "bits": args.bits, "group_size": args.group_size,
        "torch_rel_error_vs_float": errors,
        "onnx_rel_error_vs_quantized_torch": onnx_vs_torch,
        "ops": sorted({layer["op"] for layer in meta["layers"].values()}),
        "layers": len(meta["layers"]),
        "onnx_bytes": meta["sizes"]["onnx_bytes"],
        "float_linear_weight_bytes": meta["sizes"]["float_linear_weight_bytes"],
        "linear_weight_bytes": meta["sizes"]["linear_weight_bytes"],
        "validation": report.status, "ok": ok,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"output error vs float (torch): RTN {errors['rtn']:.4f}, SINQ {errors['sinq']:.4f}")
        print(f"exported {summary['layers']} linears as {', '.join(summary['ops'])} to {out_dir}: "
              f"{summary['linear_weight_bytes']} bytes of weights "
              f"(fp32: {summary['float_linear_weight_bytes']})")
        print(f"onnxruntime vs quantized torch: relative error {onnx_vs_torch:.2e}")
        print(report.format_table())
        print("OK" if ok else "MISMATCH")
    if tmp is not None:
        tmp.cleanup()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
