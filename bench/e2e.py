#!/usr/bin/env python
"""End-to-end benchmark: SINQ exports against fp32 and the other int4 toolchains, in onnxruntime.

    python bench/e2e.py                      # full run (<= ~20 min on 2 cores, cold cache)
    python bench/e2e.py --quick              # smoke test: tiny settings, a few variants
    python bench/e2e.py --only fp32,sinq4-mul-acc4

On the bundled SmolLM2-135M-Instruct, onnxruntime CPU, ``--threads`` (2) intra-op threads, the
same prompt for every model. Per variant: model file size; build (quantize + export) wall time;
prefill and decode tokens/s (prefill a fixed ``--prompt-tokens`` (128) tokens of the Wikipedia
text, then ``--decode-steps`` single-token steps through the KV cache), median over
``--rounds`` interleaved rounds, each in its own process (``_e2e_worker.py``, or
``_e2e_genai.py`` for onnxruntime-genai), whose peak RSS (VmHWM) is reported; every speed
also as a ratio to fp32 in the same run; perplexity on 4 x 512 tokens of the real text (the
protocol of ``sinq_export.eval``, computed in onnxruntime).

Variants (``--list`` prints them): fp32 (optimum export); onnxruntime's
``matmul_nbits_quantizer`` int4 of that fp32 ONNX, block 64, asymmetric, RTN ("DEFAULT" algo)
and HQQ, lm_head kept float like ours; onnxruntime-genai's model builder ``-p int4 -e cpu``
(built and run in its own venv, ``--genai-venv``, since it needs transformers >= 5); SINQ
4-bit with the column-scale Mul, with folded column scales, 3-bit via ``sinq.ops``
(``--runtime custom``), 2-bit, 8-bit, and 4-bit with an 8-bit lm_head; MatMulNBits variants at
accuracy_level 0 and 4 (the acc4 model is the acc0 model with the attribute rewritten - all
the exporters' ``accuracy_level`` options do exactly that).

Built models are cached in ``<cache>/bench/`` (``~/.cache/sinq-export/bench``) keyed by their
configuration and the tool versions; the build time recorded when a model was built is
reported (marked as cached). ``--rebuild`` rebuilds. Writes ``bench/results/e2e.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from _sysinfo import cpu_name

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BUILD_FILE = "bench_build.json"
GENAI_PIP = ["torch==2.13.0", "onnxruntime-genai==0.18.*", "transformers>=5", "onnx", "onnx_ir"]
HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "chat_template.jinja")


@dataclass
class Variant:
    name: str
    label: str
    family: str  # fp32 | ort-rtn | ort-hqq | genai | sinq
    accuracy_level: int | None = None  # None: not a MatMulNBits knob (fp32, custom op, genai as built)
    base: str | None = None  # acc4 variants: the acc0 variant they are derived from
    sinq_args: tuple[str, ...] = ()
    bits: int | None = None


def all_variants() -> list[Variant]:
    v = [Variant("fp32", "fp32 (optimum export)", "fp32")]
    for fam, label in (("ort-rtn", "ORT quantizer int4 RTN"), ("ort-hqq", "ORT quantizer int4 HQQ")):
        v.append(Variant(f"{fam}-acc0", label, fam, 0, bits=4))
        v.append(Variant(f"{fam}-acc4", label, fam, 4, base=f"{fam}-acc0", bits=4))
    v.append(Variant("genai-int4", "genai builder int4 (as built)", "genai", bits=4))
    sinq = [
        ("sinq4-mul", "SINQ 4-bit, Mul", ("--bits", "4"), 4),
        ("sinq4-fold", "SINQ 4-bit, folded t", ("--bits", "4", "--col-scale", "fold",
                                                "--shared-col-scale"), 4),
        ("sinq2", "SINQ 2-bit, Mul", ("--bits", "2"), 2),
        ("sinq8", "SINQ 8-bit, Mul", ("--bits", "8"), 8),
        ("sinq4-lmh8", "SINQ 4-bit + lm_head 8-bit", ("--bits", "4", "--lm-head-bits", "8"), 4),
        ("sinq4-lmh4", "SINQ 4-bit + lm_head 4-bit", ("--bits", "4", "--lm-head-bits", "4"), 4),
    ]
    for name, label, args, bits in sinq:
        v.append(Variant(f"{name}-acc0", label, "sinq", 0, sinq_args=args, bits=bits))
        v.append(Variant(f"{name}-acc4", label, "sinq", 4, base=f"{name}-acc0", sinq_args=args, bits=bits))
    at = [x.name for x in v].index("sinq2-acc0")
    v[at:at] = [
        Variant("sinq3-custom", "SINQ 3-bit, sinq.ops custom op, Mul", "sinq", None,
                sinq_args=("--bits", "3", "--runtime", "custom"), bits=3),
        Variant("sinq3-fused", "SINQ 3-bit, sinq.ops custom op, fused t", "sinq", None,
                sinq_args=("--bits", "3", "--runtime", "custom", "--col-scale", "fused"), bits=3),
    ]
    return v


QUICK = ["fp32", "ort-rtn-acc0", "sinq4-mul-acc0", "sinq4-mul-acc4", "sinq3-fused", "genai-int4"]


@dataclass
class Result:
    variant: dict
    folder: str | None = None
    status: str = "ok"  # ok | unavailable | failed
    reason: str = ""
    size_bytes: int | None = None
    build_s: float | None = None
    build_cached: bool = False
    build_note: str = ""
    quantized_nodes: int | None = None
    col_scale_muls: int | None = None
    quant_format: str = ""
    prefill_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)
    peak_rss_kb: list[int] = field(default_factory=list)
    session_load_s: list[float] = field(default_factory=list)
    prefill_tok_s: float | None = None
    decode_tok_s: float | None = None
    prefill_x_fp32: float | None = None
    decode_x_fp32: float | None = None
    peak_rss_mb: float | None = None
    ppl: float | None = None
    ppl_note: str = ""
    ppl_s: float | None = None


# ----------------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def versions() -> dict:
    import onnxruntime

    import sinq_export

    return {"sinq_export": sinq_export.__version__, "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version()}


def source_hash() -> str:
    """Hash of the sinq_export sources (and the custom-op library): SINQ builds are rebuilt when
    the quantizer or exporter changes."""
    import sinq_export

    pkg = Path(sinq_export.__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(pkg.rglob("*.py")) + sorted(pkg.rglob("*.so")):
        h.update(str(f.relative_to(pkg)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def key_hash(obj) -> str:  # noqa: ANN001
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def onnx_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and ".onnx" in p.name)


def cached(folder: Path, key: dict) -> dict | None:
    f = folder / BUILD_FILE
    if f.is_file():
        rec = json.loads(f.read_text())
        if rec.get("key") == key:
            return rec
    return None


def finish_build(tmp: Path, folder: Path, key: dict, seconds: float, **extra) -> dict:  # noqa: ANN003
    rec = {"key": key, "seconds": seconds, "built_at": dt.datetime.utcnow().isoformat(timespec="seconds"),
           **extra}
    (tmp / BUILD_FILE).write_text(json.dumps(rec, indent=1))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return rec


def copy_hf_files(src: Path, dst: Path) -> None:
    for name in HF_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def save_onnx(model, path: Path) -> None:  # noqa: ANN001
    import onnx

    model.ir_version = min(model.ir_version, 10)  # onnx 1.23 may write 14; onnxruntime <= 1.31 reads 13
    data = path.name + ".data"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data, size_threshold=1024)


def count_nodes(folder: Path) -> tuple[int, int]:
    """(quantized MatMulNBits/SinqMatMulNBits/GatherBlockQuantized nodes, Mul nodes reading a col_scale)."""
    import onnx

    m = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    q = sum(n.op_type in ("MatMulNBits", "SinqMatMulNBits") for n in m.graph.node)
    muls = sum(n.op_type == "Mul" and any(i.endswith("col_scale") for i in n.input) for n in m.graph.node)
    return q, muls


def describe(folder: Path) -> str:
    """Quantized-node summary, e.g. '210 MatMulNBits 4-bit bs64 acc0 uint8-zp; 1 GatherBlockQuantized'."""
    import collections

    import onnx
    from onnx import helper

    m = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    inits = {i.name: i for i in m.graph.initializer}
    kinds: collections.Counter = collections.Counter()
    for n in m.graph.node:
        if n.op_type not in ("MatMulNBits", "SinqMatMulNBits", "GatherBlockQuantized"):
            continue
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        zp = "no-zp"
        if n.op_type != "GatherBlockQuantized" and len(n.input) > 3 and n.input[3]:
            t = inits.get(n.input[3])
            zp = "float-zp" if t is not None and t.data_type in (1, 10) else "uint8-zp"
        acc = "" if n.op_type != "MatMulNBits" else f" acc{a.get('accuracy_level', 0)}"
        kinds[f"{n.op_type} {a.get('bits', 4)}-bit bs{a.get('block_size')}{acc} {zp}"] += 1
    return "; ".join(f"{c}× {k}" for k, c in kinds.items()) or "float"


# ----------------------------------------------------------------------------------- builds


class Builder:
    def __init__(self, cache: Path, rebuild: bool, genai_venv: Path, threads: int) -> None:
        self.cache = cache
        self.rebuild = rebuild
        self.genai_venv = genai_venv
        self.threads = threads
        self.vers = versions()
        self.failed: dict[Path, str] = {}
        self.built: set[Path] = set()
        cache.mkdir(parents=True, exist_ok=True)

    def _get(self, name: str, key: dict, make) -> tuple[Path, dict, bool]:  # noqa: ANN001
        folder = self.cache / f"{name}-{key_hash(key)}"
        if folder in self.failed:
            raise RuntimeError(f"build of {name} failed earlier in this run: {self.failed[folder]}")
        if self.rebuild and folder in self.built:
            return folder, json.loads((folder / BUILD_FILE).read_text()), False
        rec = None if self.rebuild else cached(folder, key)
        if rec is not None:
            return folder, rec, True
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=self.cache))
        try:
            t0 = time.perf_counter()
            extra = make(tmp) or {}
            seconds = time.perf_counter() - t0
            rec = finish_build(tmp, folder, key, seconds, **extra)
            self.built.add(folder)
            return folder, rec, False
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            self.failed[folder] = f"{type(exc).__name__}: {str(exc)[:200]}"
            raise

    def fp32(self) -> tuple[Path, dict, bool]:
        from sinq_export.export import export_float_causal_lm
        from sinq_export.models import default_model_dir

        def make(tmp: Path) -> dict:
            shutil.rmtree(tmp)
            export_float_causal_lm(default_model_dir(), tmp)
            return {"note": "optimum-onnx text-generation-with-past export"}

        return self._get("fp32", {"what": "fp32", **self.vers}, make)

    def ort_quant(self, algo: str) -> tuple[Path, dict, bool]:
        fp32_dir, _, _ = self.fp32()

        def make(tmp: Path) -> dict:
            import onnx
            from onnxruntime.quantization.matmul_nbits_quantizer import (
                DefaultWeightOnlyQuantConfig,
                HQQWeightOnlyQuantConfig,
                MatMulNBitsQuantizer,
            )

            for name in ("onnxruntime.quantization.matmul_nbits_quantizer", "onnxruntime.quantization"):
                logging.getLogger(name).setLevel(logging.WARNING)  # one INFO line per node otherwise

            model = onnx.load(str(fp32_dir / "model.onnx"))
            lm_head = [n.name for n in model.graph.node if n.op_type == "MatMul" and "logits" in n.output
                       or "lm_head" in n.name]
            if algo == "rtn":
                cfg = DefaultWeightOnlyQuantConfig(block_size=64, is_symmetric=False, accuracy_level=0,
                                                   bits=4)
            else:
                cfg = HQQWeightOnlyQuantConfig(block_size=64, bits=4)
            q = MatMulNBitsQuantizer(model, bits=4, block_size=64, is_symmetric=False, accuracy_level=0,
                                     nodes_to_exclude=lm_head, algo_config=cfg)
            q.process()
            save_onnx(q.model.model, tmp / "model.onnx")
            copy_hf_files(fp32_dir, tmp)
            return {"excluded": lm_head}

        return self._get(f"ort-{algo}-acc0", {"what": f"ort-{algo}", "block": 64, "asym": True,
                                              "fp32": key_hash({"what": "fp32", **self.vers}), **self.vers},
                         make)

    def sinq(self, v: Variant) -> tuple[Path, dict, bool]:
        fp32_dir, _, _ = self.fp32()
        exe = Path(sys.executable).parent / "sinq-export"
        args = ["model", *v.sinq_args, "--group-size", "64", "--no-reference", "--json"]

        def make(tmp: Path) -> dict:
            out = tmp / "out"
            cmd = [str(exe), *args, "-o", str(out), "--float-export", str(fp32_dir)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-2000:]}")
            text = proc.stdout[proc.stdout.find("{"):] if "{" in proc.stdout else "{}"
            try:
                summary = json.loads(text)
            except json.JSONDecodeError:
                summary = {}
            for p in out.iterdir():
                p.rename(tmp / p.name)
            out.rmdir()
            return {"cli": "sinq-export " + " ".join(args), "summary_timings": summary.get("timings_s")}

        name = v.base or v.name
        return self._get(name, {"what": "sinq", "args": args, "source": source_hash(), **self.vers}, make)

    def derived_acc4(self, base_dir: Path, base_rec: dict, name: str) -> tuple[Path, dict, bool]:
        """The acc0 model with accuracy_level=4 on every MatMulNBits node."""

        def make(tmp: Path) -> dict:
            import onnx
            from onnx import helper

            model = onnx.load(str(base_dir / "model.onnx"))
            n = 0
            for node in model.graph.node:
                if node.op_type == "MatMulNBits":
                    for a in list(node.attribute):
                        if a.name == "accuracy_level":
                            node.attribute.remove(a)
                    node.attribute.append(helper.make_attribute("accuracy_level", 4))
                    n += 1
            save_onnx(model, tmp / "model.onnx")
            copy_hf_files(base_dir, tmp)
            for extra in ("genai_config.json", "sinq_export.json"):
                if (base_dir / extra).is_file():
                    shutil.copy2(base_dir / extra, tmp / extra)
            meta = tmp / "sinq_export.json"
            if meta.is_file():
                d = json.loads(meta.read_text())
                d.setdefault("config", {})["accuracy_level"] = 4
                meta.write_text(json.dumps(d, indent=2, sort_keys=True))
            return {"base_seconds": base_rec["seconds"], "rewritten_nodes": n}

        folder, rec, was_cached = self._get(name, {"what": "acc4", "base": base_dir.name, **self.vers}, make)
        return folder, rec, was_cached

    def genai(self) -> tuple[Path, dict, bool]:
        from sinq_export.models import default_model_dir

        py = self.genai_venv / "bin" / "python"
        if not py.is_file():
            log(f"creating the onnxruntime-genai venv in {self.genai_venv} (pip, a few minutes)")
            subprocess.run([sys.executable, "-m", "venv", str(self.genai_venv)], check=True)
            proc = subprocess.run([str(py), "-m", "pip", "install", "-q", *GENAI_PIP],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"pip install {' '.join(GENAI_PIP)} failed: {proc.stderr.strip()[-1500:]}")
        ver = subprocess.run([str(py), "-c", "import onnxruntime_genai as og, transformers; "
                              "print(og.__version__, transformers.__version__)"],
                             capture_output=True, text=True)
        if ver.returncode != 0:
            raise RuntimeError(f"onnxruntime_genai not importable in {self.genai_venv}: "
                               f"{ver.stderr.strip()[-800:]}")
        og_ver, tf_ver = ver.stdout.split()

        def make(tmp: Path) -> dict:
            cmd = [str(py), "-m", "onnxruntime_genai.models.builder", "-i", str(default_model_dir()),
                   "-o", str(tmp), "-p", "int4", "-e", "cpu", "-c", str(tmp / "_hf_cache")]
            env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise RuntimeError(f"model builder failed: {proc.stderr.strip()[-1500:]}")
            shutil.rmtree(tmp / "_hf_cache", ignore_errors=True)
            cfg_path = tmp / "genai_config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["model"]["decoder"].setdefault("session_options", {}).update(
                intra_op_num_threads=self.threads, inter_op_num_threads=1)
            cfg_path.write_text(json.dumps(cfg, indent=2))
            return {"cmd": " ".join(cmd[1:]), "onnxruntime_genai": og_ver, "transformers": tf_ver}

        return self._get("genai-int4-cpu", {"what": "genai", "og": og_ver, "tf": tf_ver,
                                            "threads": self.threads}, make)


# ----------------------------------------------------------------------------------- timing


def time_variant(v: Variant, folder: Path, args, tokens_file: Path, genai_py: Path) -> dict:  # noqa: ANN001
    common = ["--tokens", str(tokens_file), "--prompt-tokens", str(args.prompt_tokens),
              "--decode-steps", str(args.decode_steps), "--repeats", "1"]
    if v.family == "genai":
        cmd = [str(genai_py), str(HERE / "_e2e_genai.py"), "--model-dir", str(folder), *common]
    else:
        cmd = [sys.executable, str(HERE / "_e2e_worker.py"), "--model", str(folder / "model.onnx"),
               "--threads", str(args.threads), *common]
        meta = folder / "sinq_export.json"
        if meta.is_file() and "sinq.ops" in json.loads(meta.read_text())["onnx"].get("custom_domains", []):
            from sinq_export import runtime_ops

            cmd += ["--ops-library", str(runtime_ops.library_path())]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip()[-1500:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------- perplexity


def perplexity(v: Variant, folder: Path, windows, threads: int) -> tuple[float, str]:  # noqa: ANN001
    import numpy as np
    import onnxruntime as ort

    from sinq_export import eval as ev

    if (folder / "sinq_export.json").is_file():
        return ev.perplexity_onnx(folder, windows).ppl, "sinq_export.eval.perplexity_onnx"
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
    if v.family != "genai":
        total, count = ev.ort_nll(sess, windows)
        return math.exp(total / count), "sinq_export.eval.ort_nll"
    # genai graph: GroupQueryAttention, no position_ids, symbolic head size -> size the empty past
    # from genai_config.json and score each window the same way (empty past, L-1 predictions).
    dec = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    pasts = [i for i in sess.get_inputs() if i.name.startswith("past_key_values")]
    total, count = 0.0, 0
    for w in windows:
        w = np.asarray(w, dtype=np.int64)
        feed = {"input_ids": w[None], "attention_mask": np.ones((1, len(w)), np.int64)}
        for p in pasts:
            feed[p.name] = np.zeros((1, dec["num_key_value_heads"], 0, dec["head_size"]), np.float32)
        logits = np.asarray(sess.run(["logits"], feed)[0][0, :-1], dtype=np.float64)
        m = logits.max(-1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(logits - m).sum(-1))
        total += float((lse - logits[np.arange(len(w) - 1), w[1:]]).sum())
        count += len(w) - 1
    return math.exp(total / count), "onnxruntime on the genai graph (same protocol, own loop)"


# ----------------------------------------------------------------------------------- report


def fmt(x, spec: str = ".1f", none: str = "–") -> str:  # noqa: ANN001
    return none if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def targets(results: list[Result]) -> dict[str, dict]:
    """Issue targets for the SINQ 4-bit rows: name -> {column: (passed, detail)}."""
    by = {r.variant["name"]: r for r in results if r.status == "ok"}
    fp32 = by.get("fp32")
    out: dict[str, dict] = {}
    for r in results:
        v = r.variant
        if r.status != "ok" or not v["name"].startswith(("sinq4-mul", "sinq4-fold")):
            continue
        acc = v["accuracy_level"]
        ort_q = by.get(f"ort-rtn-acc{acc}")
        cols = {}
        if ort_q and ort_q.decode_tok_s and r.decode_tok_s:
            x = r.decode_tok_s / ort_q.decode_tok_s
            cols["decode ≥0.97× ORT int4"] = (x >= 0.97, f"{x:.2f}×")
        if fp32 and fp32.decode_tok_s and r.decode_tok_s:
            x = r.decode_tok_s / fp32.decode_tok_s
            cols["decode ≥2× fp32"] = (x >= 2.0, f"{x:.2f}×")
        if ort_q and ort_q.ppl and r.ppl:
            cols["ppl < ORT int4"] = (r.ppl < ort_q.ppl, f"{r.ppl:.2f} vs {ort_q.ppl:.2f}")
        out[v["name"]] = cols
    return out


TARGET_COLS = ["decode ≥0.97× ORT int4", "decode ≥2× fp32", "ppl < ORT int4"]


def markdown(results: list[Result], meta: dict) -> str:
    tg = targets(results)
    by = {r.variant["name"]: r for r in results if r.status == "ok"}
    genai = by.get("genai-int4")
    lines = [
        "# End-to-end benchmark: SINQ vs fp32 and other int4 toolchains (onnxruntime CPU)",
        "",
        f"Generated by `{meta['command']}` on {meta['date']} ({meta['wall_min']:.1f} min). "
        f"{meta['model']}; onnxruntime {meta['versions']['onnxruntime']} CPU, {meta['cpu']}, "
        f"{meta['threads']} intra-op threads; load average before the run {meta['load_before']}.",
        "",
        f"Speed: prefill of a fixed {meta['prompt_tokens']}-token prompt (the Wikipedia text) from an "
        f"empty KV cache, then {meta['decode_steps']} single-token decode steps; median of "
        f"{meta['rounds']} interleaved rounds, each model in its own process after a short warm-up "
        "(`bench/_e2e_worker.py`: numpy KV cache, the same driver for every optimum-style graph; "
        "genai: `bench/_e2e_genai.py`, onnxruntime-genai's own generator loop). (×fp32) = ratio to the "
        "fp32 row of the same run. Peak RSS = VmHWM (peak resident set) of that process "
        "(Python + onnxruntime + model). "
        "Size = model.onnx + external data.",
        "",
        f"Perplexity: {meta['ppl_protocol']}; computed in onnxruntime (acc4 rows with their int8 "
        "activations).",
        "",
        "Build = quantize + export wall time, measured when the model was built (cached models: "
        "the recorded time, marked *). ORT quantizer and SINQ rows reuse the fp32 ONNX export (its "
        "time is the fp32 row); acc4 rows = their acc0 build + rewriting the accuracy_level attribute. "
        "The genai row is the model builder from the HF folder (its own export).",
        "",
        "| variant | acc | t Muls | size MB | build s | prefill tok/s (×fp32) | decode tok/s (×fp32) | "
        "decode ×genai | peak RSS MB | ppl | " + " | ".join(TARGET_COLS) + " |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|" + "---|" * len(TARGET_COLS),
    ]
    for r in results:
        v = r.variant
        acc = "–" if v["accuracy_level"] is None else str(v["accuracy_level"])
        if v["family"] == "genai":
            acc = "as built"
        if r.status != "ok":
            lines.append(f"| {v['label']} (`{v['name']}`) | {acc} | {r.status}: {r.reason[:160]} |"
                         + " |" * (8 + len(TARGET_COLS)))
            continue
        build = fmt(r.build_s, ".0f") + ("*" if r.build_cached else "")
        gx = (fmt(r.decode_tok_s / genai.decode_tok_s, ".2f") + "×") if genai and r.decode_tok_s \
            and genai.decode_tok_s else "–"
        cells = []
        for c in TARGET_COLS:
            t = tg.get(v["name"], {}).get(c)
            cells.append("" if t is None else f"{'**pass**' if t[0] else '**FAIL**'} ({t[1]})")
        lines.append(
            f"| {v['label']} (`{v['name']}`) | {acc} | {r.col_scale_muls} | "
            f"{fmt((r.size_bytes or 0) / 1e6, '.1f')} | "
            f"{build} | "
            f"{fmt(r.prefill_tok_s)} ({fmt(r.prefill_x_fp32, '.2f')}) | "
            f"{fmt(r.decode_tok_s)} ({fmt(r.decode_x_fp32, '.2f')}) | {gx} | {fmt(r.peak_rss_mb, '.0f')} | "
            f"{fmt(r.ppl, '.2f')} | " + " | ".join(cells) + " |")
    lines += ["", "Quantized nodes per model (from the graph):", ""]
    for r in results:
        if r.status == "ok":
            lines.append(f"- `{r.variant['name']}`: {r.quant_format}")
    lines += ["", "Notes:"]
    for r in results:
        notes = [n for n in (r.build_note, r.ppl_note if r.ppl is None else "") if n]
        if notes:
            lines.append(f"- `{r.variant['name']}`: {'; '.join(notes)}")
    lines.append("- `t Muls`: column-scale Mul nodes in the graph (SINQ's per-input-channel t; 0 where "
                 "folded into norms / previous layers or fused into the custom op).")
    if genai and genai.decode_tok_s:
        best = [r for r in results if r.status == "ok" and r.variant["family"] == "sinq" and r.decode_tok_s
                and r.ppl and genai.ppl and r.decode_tok_s >= 0.9 * genai.decode_tok_s and r.ppl < genai.ppl]
        lines.append(
            "- Goal (≥ 0.9× genai int4 decode speed with lower perplexity than genai int4): "
            + ("met by " + ", ".join(f"`{r.variant['name']}` ({r.decode_tok_s / genai.decode_tok_s:.2f}×, "
                                     f"ppl {r.ppl:.2f} vs {genai.ppl:.2f})" for r in best)
               if best else "not met by any SINQ row in this run."))
    lines.append("- genai int4 is the builder's default for `-p int4 -e cpu`: symmetric, block 32, "
                 "accuracy_level 4, fused q/k/v, int4 lm_head and embedding, GroupQueryAttention and fused "
                 "norms, KV cache in place (past_present_share_buffer); the optimum-style graphs keep "
                 "lm_head (28 M weights) and the embedding float (except `sinq4-lmh*`), unfused attention, "
                 "and their KV cache is re-fed each step, so part of its lead is graph-level, not "
                 "quantization.")
    lines.append("- ORT quantizer HQQ writes float zero points, which keep MatMulNBits off its fast "
                 "integer paths (acc4 changes nothing there).")
    return "\n".join(lines) + "\n"


def plot(results: list[Result], path: Path, ppl_what: str = "4×512", threads: int = 2) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.status == "ok" and r.decode_tok_s]
    colors = {"fp32": "black", "ort-rtn": "tab:blue", "ort-hqq": "tab:cyan", "genai": "tab:green",
              "sinq": "tab:red"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 6.5), gridspec_kw={"width_ratios": [1.1, 1]})
    names = [r.variant["name"] for r in ok]
    ax1.barh(names, [r.decode_tok_s for r in ok], color=[colors[r.variant["family"]] for r in ok])
    ax1.invert_yaxis()
    ax1.set_xlabel("decode tokens/s (higher is better)")
    ax1.set_title(f"decode speed, onnxruntime CPU, {threads} threads")
    for i, r in enumerate(ok):
        ax1.text(r.decode_tok_s, i, f" {r.decode_tok_s:.1f}", va="center", fontsize=8)
    cap = 100.0  # 2-bit rows (ppl ~1e4-1e5) would squash the rest: listed in the title instead
    off = [r.variant["name"] for r in ok if r.ppl is not None and r.ppl > cap]
    for r in ok:
        if r.ppl is None or r.ppl > cap:
            continue
        ax2.scatter(r.decode_tok_s, r.ppl, s=20 + (r.size_bytes or 0) / 2e6,
                    color=colors[r.variant["family"]],
                    alpha=0.7)
        ax2.annotate(r.variant["name"], (r.decode_tok_s, r.ppl), fontsize=7, xytext=(3, 3),
                     textcoords="offset points")
    ax2.set_yscale("log")
    ax2.set_xlabel("decode tokens/s")
    ax2.set_ylabel(f"perplexity, {ppl_what} Wikipedia tokens (log, lower is better)")
    ax2.set_title("quality vs speed (marker area ∝ file size)"
                  + (f"\noff scale (ppl > {cap:.0f}): {', '.join(off)}" if off else ""), fontsize=10)
    ax2.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 6 variants, 8 decode steps, 1 round, 1 x 128-token ppl window")
    ap.add_argument("--only", default=None, help="comma list of variant names (see --list)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=None, help="default 32 (quick: 8)")
    ap.add_argument("--rounds", type=int, default=None, help="default 5 (quick: 1)")
    ap.add_argument("--ppl-windows", type=int, default=None, help="default 4 (quick: 1)")
    ap.add_argument("--ppl-length", type=int, default=None, help="default 512 (quick: 128)")
    ap.add_argument("--no-ppl", action="store_true")
    ap.add_argument("--rebuild", action="store_true", help="ignore cached models")
    ap.add_argument("--cache", default=None, help="default <sinq-export cache>/bench")
    ap.add_argument("--genai-venv", default=None, help="default <sinq-export cache>/genai-venv")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for e2e.md/json/png")
    ap.add_argument("--name", default="e2e", help="output file stem")
    ap.add_argument("--replot", action="store_true",
                    help="only redraw e2e.png from an existing e2e.json in --out")
    args = ap.parse_args(argv)
    if args.replot:
        data = json.loads((Path(args.out) / f"{args.name}.json").read_text())
        res = [Result(**r) for r in data["results"]]
        plot(res, Path(args.out) / f"{args.name}.png", threads=data["meta"]["threads"])
        return 0
    q = args.quick
    args.decode_steps = args.decode_steps or (8 if q else 32)
    args.rounds = args.rounds or (1 if q else 5)
    args.ppl_windows = args.ppl_windows or (1 if q else 4)
    args.ppl_length = args.ppl_length or (128 if q else 512)

    variants = all_variants()
    if args.list:
        for v in variants:
            acc = "" if v.accuracy_level is None else f", acc{v.accuracy_level}"
            print(f"{v.name:22s} {v.label}{acc}")
        return 0
    wanted = args.only.split(",") if args.only else (QUICK if q else None)
    if wanted:
        unknown = set(wanted) - {v.name for v in variants}
        if unknown:
            ap.error(f"unknown variant(s) {sorted(unknown)}; see --list")
        variants = [v for v in variants if v.name in wanted]

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    from sinq_export import eval as ev
    from sinq_export.models import cache_dir, default_model_dir

    start = time.perf_counter()
    load_before = os.getloadavg()
    cache = Path(args.cache) if args.cache else cache_dir() / "bench"
    genai_venv = Path(args.genai_venv) if args.genai_venv else cache_dir() / "genai-venv"
    genai_py = genai_venv / "bin" / "python"
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    b = Builder(cache, args.rebuild, genai_venv, args.threads)

    tokenizer = AutoTokenizer.from_pretrained(str(default_model_dir()), local_files_only=True)
    prompt = ev.text_windows(tokenizer, "wikipedia", 1, args.prompt_tokens + args.decode_steps)[0]
    tokens_file = cache / "prompt_tokens.json"
    tokens_file.write_text(json.dumps([int(t) for t in prompt]))

    # ---- builds
    results: list[Result] = []
    folders: dict[str, Path] = {}
    recs: dict[str, dict] = {}
    for v in variants:
        r = Result(variant=asdict(v))
        results.append(r)
        log(f"build {v.name}")
        try:
            if v.family == "fp32":
                folder, rec, was = b.fp32()
            elif v.family in ("ort-rtn", "ort-hqq"):
                folder, rec, was = b.ort_quant(v.family.split("-")[1])
            elif v.family == "genai":
                folder, rec, was = b.genai()
            else:
                folder, rec, was = b.sinq(v)
            if v.base:
                folder, rec, was = b.derived_acc4(folder, rec, v.name)
                r.build_s = rec["base_seconds"] + rec["seconds"]
                r.build_note = (f"acc0 build {rec['base_seconds']:.0f} s + attribute rewrite "
                                f"{rec['seconds']:.0f} s")
            else:
                r.build_s = rec["seconds"]
            r.build_cached = was
            r.folder = str(folder)
            r.size_bytes = onnx_size(folder)
            r.quantized_nodes, r.col_scale_muls = count_nodes(folder)
            r.quant_format = describe(folder)
            folders[v.name], recs[v.name] = folder, rec
        except Exception as exc:  # noqa: BLE001
            r.status = "unavailable" if v.family == "genai" else "failed"
            r.reason = f"{type(exc).__name__}: {exc}".replace("\n", " ")
            log(f"  {r.status}: {r.reason[:300]}")

    def dump() -> dict:
        meta = {
            "command": "python bench/e2e.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])
                                                if (argv if argv is not None else sys.argv[1:]) else ""),
            "date": dt.datetime.utcnow().strftime("%Y-%m-%d %H:%M UTC"),
            "wall_min": (time.perf_counter() - start) / 60, "load_before": f"{load_before[0]:.2f}",
            "model": "SmolLM2-135M-Instruct (bundled; 30 layers, 211 linears)",
            "cpu": cpu_name(), "threads": args.threads, "prompt_tokens": args.prompt_tokens,
            "decode_steps": args.decode_steps, "rounds": args.rounds, "versions": b.vers,
            "ppl_protocol": ev.protocol("wikipedia", args.ppl_windows, args.ppl_length)["description"],
            "cache": str(cache),
        }
        (out_dir / f"{args.name}.json").write_text(json.dumps(
            {"meta": meta, "targets": {k: {c: {"pass": p, "detail": d} for c, (p, d) in cols.items()}
                                       for k, cols in targets(results).items()},
             "results": [asdict(r) for r in results]}, indent=1))
        (out_dir / f"{args.name}.md").write_text(markdown(results, meta))
        return meta

    # ---- timing: interleaved rounds, one process per (variant, round)
    live = [r for r in results if r.status == "ok"]
    for rnd in range(args.rounds):
        for r in live:
            v = Variant(**r.variant)
            log(f"time {v.name} (round {rnd + 1}/{args.rounds})")
            try:
                res = time_variant(v, folders[v.name], args, tokens_file, genai_py)
            except Exception as exc:  # noqa: BLE001
                r.status, r.reason = "failed", f"timing: {exc}".replace("\n", " ")
                log(f"  failed: {r.reason[:300]}")
                continue
            r.prefill_s += res["prefill_s"]
            r.decode_s += res["decode_s"]
            r.peak_rss_kb.append(res["peak_rss_kb"])
            r.session_load_s.append(res["load_s"])
            if v.family == "genai" and min(res.get("steps", [args.decode_steps])) < args.decode_steps:
                r.build_note = "genai stopped early (EOS)"
        live = [r for r in live if r.status == "ok"]
    for r in live:
        r.prefill_tok_s = args.prompt_tokens / statistics.median(r.prefill_s)
        r.decode_tok_s = args.decode_steps / statistics.median(r.decode_s)
        r.peak_rss_mb = max(r.peak_rss_kb) / 1024
    fp32 = next((r for r in live if r.variant["name"] == "fp32"), None)
    for r in live:
        if fp32:
            r.prefill_x_fp32 = r.prefill_tok_s / fp32.prefill_tok_s
            r.decode_x_fp32 = r.decode_tok_s / fp32.decode_tok_s
    dump()

    # ---- perplexity
    if not args.no_ppl:
        windows = ev.text_windows(tokenizer, "wikipedia", args.ppl_windows, args.ppl_length)
        for r in live:
            v = Variant(**r.variant)
            log(f"perplexity {v.name}")
            t0 = time.perf_counter()
            try:
                r.ppl, how = perplexity(v, folders[v.name], windows, args.threads)
                r.ppl_note = how
            except Exception as exc:  # noqa: BLE001
                r.ppl, r.ppl_note = None, f"n/a: {type(exc).__name__}: {exc}".replace("\n", " ")[:300]
                log(f"  {r.ppl_note}")
            r.ppl_s = time.perf_counter() - t0
            dump()
    meta = dump()
    try:
        plot(results, out_dir / f"{args.name}.png", f"{args.ppl_windows}×{args.ppl_length}",
             args.threads)
    except Exception as exc:  # noqa: BLE001
        log(f"plot failed: {exc}")
    print((out_dir / f"{args.name}.md").read_text())
    log(f"done in {meta['wall_min']:.1f} min")
    return 0 if all(r.status == "ok" or r.variant["family"] == "genai" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
