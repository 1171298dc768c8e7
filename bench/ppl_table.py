"""Perplexity table on real text: RTN, onnxruntime's own quantizers, SINQ calibration-free and
calibrated, quantized lm_head/embedding, and bit allocation to a size budget (g = 64).

    python bench/ppl_table.py                       # SmolLM2 (bundled): every row
    python bench/ppl_table.py --model qwen          # Qwen2.5-Coder-0.5B: headline rows
    python bench/ppl_table.py --rows sinq,calibrated --bits 3   # a subset, merged into the table

Protocol (sinq_export.eval): the first 4 non-overlapping 512-token windows (stride 512) of the
cleaned Wikipedia text shipped in gensim's wheel, add_special_tokens=False, each window scored
from an empty context, ppl = exp(mean NLL over 4 x 511 predictions). Every decoder nn.Linear is
quantized, group size 64, asymmetric integer zero points; lm_head float unless a row says so.
Calibrated rows use 8 x 512 tokens starting at token 65536 of the same text (disjoint from the
evaluation windows; `sinq_export.calibration.windows.calibration_windows`).

Rows (``--rows``):
  float, rtn           float model; plain min/max group RTN (no energy refit).
  ort                  onnxruntime's own quantizers applied to the same weights:
                       ``quantize_matmul_4bits`` (its RTN, 4-bit only) and its HQQ
                       (``HQQWeightOnlyQuantizer.quantize_internal``, float zero points), scored
                       in torch with the weights they produce.
  ort_gptq             onnxruntime's own GPTQ (``MatMulNBitsQuantizer`` with
                       ``GPTQWeightOnlyQuantConfig``: the neural-compressor code vendored in
                       onnxruntime, runs offline) on our float ONNX export of the same model,
                       calibrated on the same 8 x 512 tokens, lm_head kept float, 4-bit g64
                       *symmetric* (onnxruntime 1.32's asymmetric GPTQ packs the zero points
                       of a row with an odd number of groups wrongly and fails, e.g. K = 576
                       at g64), then scored *in onnxruntime* (acc0) with the same protocol.
                       Slow: one whole-model run per calibration window for each of the ~120
                       distinct MatMul inputs (33 min on 2 cores, measured).
  sinq                 calibration-free SINQ: weight-only (the paper's, ``energy_refit=0``)
                       and our default (scale refit weighted by input energies measured on
                       256 random token ids, no text; ``SinqConfig.energy_refit``).
  calibrated           SINQ --calibrate (A-SINQ + GPTQ).
  head_calibrated      the calibrated 4-bit decoder with a calibrated 4-bit head (g64 / g32),
                       also with the tied embedding quantized; compare with calibrated 4-bit.
  head                 4-bit calibration-free SINQ decoder with the lm_head at 8 bits, 4 bits
                       g64 / g32, and with the tied embedding quantized too (the embedding
                       table is the head record's dequantization: gather, then times t);
                       compare with the sinq 4-bit row (float head).
  alloc                bit allocation at the linear-weight bytes of uniform 3 and 4 bits
                       (calibration-free SINQ at the chosen widths; ``--alloc-calibrated``
                       adds the calibrated rows).
  cal_spread           the calibrated row on three disjoint calibration sets (tokens from
                       65,536 / 98,304 / 131,072), each also scored on the first 16 windows:
                       how much of a calibrated perplexity is the choice of calibration text
                       and of the 4 evaluation windows (a single calibrated number moves by
                       +-0.4 between sets or CPUs; the note gives the 16-window perplexity).

Every perplexity here is measured in PyTorch on the quantized modules (`SinqLinear` computes what
the exported MatMulNBits graph computes; bench/e2e.py and `sinq-export eval` score the ONNX
exports). Writes bench/results/ppl_table[_<model>].{md,json}; rows of earlier runs with other
keys are kept, so subsets can be run one by one on a busy machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
ALL_ROWS = ("float", "rtn", "ort", "ort_gptq", "sinq", "calibrated", "head", "head_calibrated", "alloc",
            "cal_spread")
CAL_SPREAD_OFFSETS = (65536, 98304, 131072)  # disjoint 4096-token calibration sets
HEADLINE_ROWS = ("float", "rtn", "sinq", "calibrated")
TARGETS = {"sinq": {4: 26.5, 3: 55.0}, "calibrated": {4: 25.5, 3: 40.0},
           "cal_spread": {4: 25.5, 3: 40.0}}


def _versions() -> dict[str, str]:
    import onnxruntime
    import transformers

    return {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def _replace_linears(model: nn.Module, make) -> float:
    """Replace every decoder linear by ``make(name, linear)``; returns the seconds it took."""
    from sinq_export.linear import set_module

    t0 = time.perf_counter()
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and not name.endswith("lm_head"):
            set_module(model, name, make(name, m))
    return time.perf_counter() - t0


def ort_rtn_linear(bits: int, g: int):
    """onnxruntime's C++ block quantizer (what MatMulNBitsQuantizer's default RTN writes)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    from sinq_export.nn import SinqLinear
    from sinq_export.quant import QuantizedWeight

    quantizer = DefaultWeightOnlyQuantizer(
        DefaultWeightOnlyQuantConfig(block_size=g, is_symmetric=False, bits=bits))

    def make(_name, lin):
        w = lin.weight.detach().float()
        packed, scales, zp = quantizer.qbits_block_quant(w.T.contiguous().numpy())
        rec = QuantizedWeight(packed=torch.from_numpy(packed), scales=torch.from_numpy(scales),
                              zero_points=torch.from_numpy(zp), col_scale=None, bits=bits,
                              group_size=g, shape=tuple(w.shape))
        return SinqLinear(rec, lin.bias)

    return make


def ort_hqq_linear(bits: int, g: int):
    """onnxruntime's HQQ (float zero points: scored as the dense weight it dequantizes to)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        HQQWeightOnlyQuantConfig,
        HQQWeightOnlyQuantizer,
    )

    quantizer = HQQWeightOnlyQuantizer(HQQWeightOnlyQuantConfig(block_size=g, bits=bits))

    def make(_name, lin):
        w = lin.weight.detach().float()
        q, s, z = quantizer.quantize_internal(w, bits=bits, group_size=g)
        n, k = w.shape
        deq = ((q.float().reshape(n, -1, g) - z.unsqueeze(-1)) * s.unsqueeze(-1)).reshape(n, -1)
        out = nn.Linear(k, n, bias=lin.bias is not None)
        out.weight.data = deq[:, :k].contiguous()
        if lin.bias is not None:
            out.bias.data = lin.bias.detach().clone()
        return out

    return make


def ort_gptq_export(model_dir, tmp: Path, calibration: torch.Tensor, group_size: int,
                    symmetric: bool = True) -> Path:
    """Our float export of ``model_dir`` quantized by onnxruntime's GPTQ into ``tmp/gptq``.

    Why through our export: onnxruntime's quantizer needs an ONNX model with float MatMuls, and
    the folder then carries our manifest and genai config, so `eval.perplexity_onnx` scores it
    like any export. The head is kept float as in every other row of the table.
    """
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        GPTQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    from sinq_export.config import GraphConfig, SinqConfig
    from sinq_export.export import export_causal_lm
    from sinq_export.validate import prefill_feed

    float_dir, out = tmp / "float", tmp / "gptq"
    export_causal_lm(model_dir, float_dir, SinqConfig(exclude=(r".*",)), GraphConfig(),
                     progress=False, allow_unquantized=True)
    session = ort.InferenceSession(str(float_dir / "model.onnx"))
    feeds = [prefill_feed(session, w.numpy()) for w in calibration]
    del session

    class Reader:  # onnxruntime's CalibrationDataReader protocol
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

        def __iter__(self):
            return iter(feeds)

    # the ModelProto with its weights inline (< 2 GB): given a path, the quantizer builds its
    # calibration session from bytes that point at external data it then cannot resolve
    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(float_dir / "model.onnx")), block_size=group_size, is_symmetric=symmetric,
        accuracy_level=0, algo_config=GPTQWeightOnlyQuantConfig(
            calibration_data_reader=Reader(), percdamp=0.01, block_size=128))
    # Its GPTQ branch ignores nodes_to_exclude; "fp32" in the per-node config is its own skip.
    per_node = quantizer._generate_q4_node_config
    head = [n.name for n in quantizer.model.model.graph.node
            if n.op_type == "MatMul" and n.name.startswith("lm_head")]
    quantizer._generate_q4_node_config = lambda: {**per_node(), **dict.fromkeys(head, "fp32")}
    quantizer.process()
    shutil.copytree(float_dir, out, ignore=shutil.ignore_patterns("model.onnx*"))
    quantizer.model.save_model_to_file(str(out / "model.onnx"), use_external_data_format=True)
    return out


class Bench:
    """Model, tokenizer, evaluation and calibration windows; one method per kind of row."""

    def __init__(self, model_dir, group_size: int, n_windows: int, length: int,
                 cal_windows: int) -> None:
        from sinq_export import eval as ev
        from sinq_export.calibration.windows import calibration_windows
        from sinq_export.models import load_causal_lm

        self.model, self.tok = load_causal_lm(model_dir)
        self.model_dir = model_dir
        self.g = group_size
        self.windows = ev.text_windows(self.tok, "wikipedia", n_windows, length)
        self.cal, self.cal_info = calibration_windows(self.tok, cal_windows, length)
        self.protocol = ev.protocol("wikipedia", n_windows, length)
        self.rows: list[dict] = []
        self.alloc_calibrated = False

    def score(self, model: nn.Module, key: str, label: str, bits, seconds=None,
              **extra) -> dict:
        from sinq_export import eval as ev

        r = ev.perplexity_torch(model, self.windows)
        row = {"key": key, "kind": self.kind, "label": label, "bits": bits, "group_size": self.g,
               "backend": "torch", "ppl": r.ppl, "quantize_seconds": seconds,
               "eval_seconds": r.seconds, **extra}
        print(f"{label:55s} {bits!s:>4}  ppl {r.ppl:8.3f}  quantize "
              f"{'-' if seconds is None else f'{seconds:.1f} s'}", flush=True)
        self.rows.append(row)
        return row

    def config(self, bits: int, **kw):
        from sinq_export.config import SinqConfig

        return SinqConfig(bits=bits, group_size=self.g, **kw)

    def quantized(self, cfg, calibration=None):
        from sinq_export.nn import quantize_model

        q = copy.deepcopy(self.model)
        windows = self.cal if calibration is None else calibration
        report = quantize_model(q, cfg, progress=False,
                                calibration=windows if cfg.calibrate else None)
        return q, report

    def run(self, kind: str, bits: list[int]) -> None:
        self.kind = kind
        getattr(self, f"row_{kind}")(bits)

    def row_float(self, _bits) -> None:
        self.score(self.model, "float", "float", None)

    def row_rtn(self, bits) -> None:
        for b in bits:
            q, rep = self.quantized(self.config(b, method="rtn", energy_refit=0))
            self.score(q, f"rtn/{b}", "rtn (min/max)", b, rep.seconds)

    def row_ort(self, bits) -> None:
        for b in bits:
            if b in (2, 4, 8):
                q = copy.deepcopy(self.model)
                dt = _replace_linears(q, ort_rtn_linear(b, self.g))
                self.score(q, f"ort-rtn/{b}", "onnxruntime RTN (quantize_matmul_4bits)", b, dt)
            q = copy.deepcopy(self.model)
            dt = _replace_linears(q, ort_hqq_linear(b, self.g))
            self.score(q, f"ort-hqq/{b}", "onnxruntime HQQ (float zero points)", b, dt)

    def row_ort_gptq(self, bits) -> None:
        """onnxruntime's GPTQ on a float export, scored in onnxruntime (4-bit only: its
        MatMulNBits path; other widths become fake-quantized float weights)."""
        import tempfile

        from sinq_export import eval as ev

        if 4 not in bits:
            return
        with tempfile.TemporaryDirectory(prefix="ort-gptq-") as tmp:
            t0 = time.perf_counter()
            folder = ort_gptq_export(self.model_dir, Path(tmp), self.cal, self.g)
            seconds = time.perf_counter() - t0
            r = ev.perplexity_onnx(folder, self.windows)
        row = {"key": "ort-gptq/4", "kind": self.kind, "bits": 4, "group_size": self.g,
               "label": "onnxruntime GPTQ, symmetric (MatMulNBitsQuantizer, in onnxruntime)",
               "backend": "onnxruntime", "ppl": r.ppl, "quantize_seconds": seconds,
               "calibration": self.cal_info}
        print(f"{row['label']:55s}    4  ppl {r.ppl:8.3f}  quantize {seconds:.1f} s", flush=True)
        self.rows.append(row)

    def row_sinq(self, bits) -> None:
        for b in bits:
            q, rep = self.quantized(self.config(b, energy_refit=0))
            self.score(q, f"sinq-wo/{b}", "SINQ weight-only (the paper's; energy_refit=0)", b,
                       rep.seconds)
            q, rep = self.quantized(self.config(b))
            self.score(q, f"sinq/{b}", "SINQ calibration-free (energy refit, random-id probe)",
                       b, rep.seconds)
            q, rep = self.quantized(self.config(b, shared_col_scale="mlp"))
            self.score(q, f"sinq-mlp/{b}", "SINQ calibration-free, gate/up one t (model default)",
                       b, rep.seconds)

    def row_calibrated(self, bits) -> None:
        for b in bits:
            q, rep = self.quantized(self.config(b, calibrate=True))
            self.score(q, f"cal/{b}", "SINQ calibrated (A-SINQ + GPTQ)", b, rep.seconds,
                       calibration=self.cal_info)

    def row_head(self, _bits) -> None:
        from sinq_export.nn import quantized_layers

        for head_bits, head_g in ((8, None), (4, None), (4, 32)):
            cfg = self.config(4, lm_head_bits=head_bits, lm_head_group_size=head_g)
            q, rep = self.quantized(cfg)
            label = f"SINQ, lm_head {head_bits}-bit g{head_g or self.g}"
            self.score(q, f"head/{head_bits}/{head_g or self.g}", label, 4, rep.seconds)
            emb = q.get_input_embeddings()
            if getattr(q.config, "tie_word_embeddings", False) and head_bits == 4:
                rec = quantized_layers(q)["lm_head"].record
                emb.weight = nn.Parameter(rec.dequantize(), requires_grad=False)
                self.score(q, f"head+emb/{head_bits}/{head_g or self.g}",
                           label + " + tied embedding", 4, rep.seconds)

    def row_head_calibrated(self, _bits) -> None:
        """The calibrated 4-bit decoder with the head calibrated too (GPTQ on the final norm's
        output): the decoder's records are the ``calibrated`` row's (same windows, the head is
        quantized last), so the difference to that row is the head's alone."""
        from sinq_export.nn import quantized_layers

        for head_g in (None, 32):
            cfg = self.config(4, calibrate=True, lm_head_bits=4, lm_head_group_size=head_g)
            q, rep = self.quantized(cfg)
            label = f"SINQ calibrated, lm_head 4-bit g{head_g or self.g} calibrated"
            self.score(q, f"head-cal/4/{head_g or self.g}", label, 4, rep.seconds,
                       calibration=self.cal_info)
            if getattr(q.config, "tie_word_embeddings", False):
                rec = quantized_layers(q)["lm_head"].record
                q.get_input_embeddings().weight = nn.Parameter(rec.dequantize(), requires_grad=False)
                self.score(q, f"head-cal+emb/4/{head_g or self.g}", label + " + tied embedding",
                           4, rep.seconds, calibration=self.cal_info)

    def row_alloc(self, _bits) -> None:
        from sinq_export.calibration.sensitivity import allocatable_shapes, quantization_costs
        from sinq_export.quant.allocate import allocation_options, budget_bytes, plan_overrides

        base = self.config(4)
        shapes = allocatable_shapes(self.model, base)
        for uniform in (3, 4):
            budget = budget_bytes(shapes, uniform, self.g)
            t0 = time.perf_counter()
            options = allocation_options(shapes, budget, self.g)
            costs = quantization_costs(self.model, base, self.cal[:4], options, list(shapes))
            measure = time.perf_counter() - t0
            overrides, groups, chosen = plan_overrides(costs, shapes, budget)
            widths = [f"{b}/g{g}" for b, g in chosen.values()]
            for calibrate in (False, True) if self.alloc_calibrated else (False,):
                cfg = self.config(uniform, overrides=overrides, group_overrides=groups,
                                  calibrate=calibrate, avg_bits=float(uniform))
                q, rep = self.quantized(cfg)
                used = sum(rec.record.nbytes() for rec in _layers(q).values())
                self.score(q, f"alloc/{uniform}/{int(calibrate)}",
                           f"bit allocation at uniform-{uniform} bytes"
                           f"{', calibrated' if calibrate else ''}", uniform, rep.seconds,
                           budget_bytes=budget, used_bytes=used, sensitivity_seconds=measure,
                           widths={str(b): widths.count(b) for b in sorted(set(widths))})

    def row_cal_spread(self, bits) -> None:
        from sinq_export import eval as ev
        from sinq_export.calibration.windows import calibration_windows

        long = ev.text_windows(self.tok, "wikipedia", 16, self.windows.shape[1])
        for b in bits:
            for offset in CAL_SPREAD_OFFSETS:
                cal, info = calibration_windows(self.tok, self.cal.shape[0], self.cal.shape[1],
                                                offset=offset)
                q, rep = self.quantized(self.config(b, calibrate=True), cal)
                ppl16 = ev.perplexity_torch(q, long).ppl
                self.score(q, f"cal-spread/{b}/{offset}",
                           f"SINQ calibrated, calibration tokens from {offset}", b, rep.seconds,
                           calibration=info, ppl_16_windows=ppl16)


def _layers(model):
    from sinq_export.nn import quantized_layers

    return {n: m for n, m in quantized_layers(model).items() if not n.endswith("lm_head")}


def _markdown(data: dict) -> str:
    rows = data["rows"]
    f = next((r for r in rows if r["key"] == "float"), None)
    lines = [f"# Perplexity on real text: {data['model']}", "",
             f"Protocol: {data['protocol'].get('description', '')}. Group size {data['group_size']}, "
             "every decoder linear quantized, lm_head float unless stated, asymmetric integer "
             "zero points (except onnxruntime HQQ). Backend: PyTorch on the quantized modules.",
             "", "| method | bits | perplexity | vs float | quantize s (shared CPU) | note |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        note = ""
        if "used_bytes" in r:
            note = f"{r['used_bytes'] / 1e6:.2f} MB of {r['budget_bytes'] / 1e6:.2f} MB; widths {r['widths']}"
        if "ppl_16_windows" in r:
            note = f"16 windows: {r['ppl_16_windows']:.2f}; "
        target = TARGETS.get(r["kind"], {}).get(r["bits"]) if "SmolLM2" in data["model"] else None
        if target:
            note += f"target <= {target}"
        delta = "" if f is None or r is f else f"+{r['ppl'] - f['ppl']:.2f}"
        qs = r.get("quantize_seconds")
        lines.append(f"| {r['label']} | {r['bits'] or '-'} | {r['ppl']:.2f} | {delta} | "
                     f"{'' if qs is None else f'{qs:.1f}'} | {note} |")
    cal = next((r.get("calibration") for r in rows if r.get("calibration")), None)
    if cal:
        lines += ["", f"Calibration text: {json.dumps(cal)}."]
    lines += ["", f"Threads: {data['threads']} (machine shared with other jobs: timings are "
              "upper bounds). Versions: " + json.dumps(data["versions"]) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF folder, or 'qwen' (default: bundled SmolLM2)")
    ap.add_argument("--rows", default=None, help=f"comma list of {','.join(ALL_ROWS)}")
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--calibration-windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--alloc-calibrated", action="store_true")
    ap.add_argument("--out", default=None, help="output path stem")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    model_dir, tag = args.model, "smollm2"
    if args.model == "qwen":
        from bench._qwen import qwen_dir

        model_dir, tag = qwen_dir(), "qwen2_5_0_5b"
    rows = (args.rows.split(",") if args.rows else
            list(HEADLINE_ROWS if tag != "smollm2" else ALL_ROWS))
    bits = [int(b) for b in args.bits.split(",")]
    stem = Path(args.out) if args.out else RESULTS / (
        "ppl_table" if tag == "smollm2" else f"ppl_table_{tag}")
    bench = Bench(model_dir, args.group_size, args.windows, args.length, args.calibration_windows)
    bench.alloc_calibrated = args.alloc_calibrated
    old = json.loads(stem.with_suffix(".json").read_text()) if stem.with_suffix(".json").is_file() \
        else {"rows": []}
    for kind in rows:
        bench.run(kind, bits)
        keys = {r["key"] for r in bench.rows}
        merged = [r for r in old.get("rows", [])  # rows of earlier runs of this script
                  if "kind" in r and r["key"] not in keys] + bench.rows
        order = {k: i for i, k in enumerate(ALL_ROWS)}
        merged.sort(key=lambda r: (order.get(r["kind"], 99), r["key"]))
        data = {"model": str(model_dir or "SmolLM2-135M-Instruct (bundled)"), "rows": merged,
                "protocol": bench.protocol, "group_size": args.group_size,
                "threads": args.threads, "versions": _versions()}
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        stem.with_suffix(".md").write_text(_markdown(data))
    print(stem.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
