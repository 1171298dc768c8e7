"""Our SINQ/RTN quantizer vs the reference ``sinq==0.2.0``, layer by layer, on SmolLM2's linears.

Why this exists: the reference is the number to meet (README of shared/: perplexities and
quantize times measured with it). Perplexity is slow and indirect; the per-layer relative
Frobenius reconstruction error ``||W - W_hat||_F / ||W||_F`` on the very same weight matrices
says directly whether our implementation reproduces the reference algorithm (expected within
+-2% per layer), and where it does not, which layer to look at.

Why two interpreters: the reference needs transformers >= 5.2, our venv pins 4.57.6 (optimum-onnx).
So this one file has two roles:

* driver (``.venv/bin/python bench/reference_compare.py``): creates/reuses the reference
  venv, runs ours, starts the worker, compares, writes ``bench/results/reference_compare.{md,json}``;
* worker (``<ref-venv>/bin/python bench/reference_compare.py --worker JOB_DIR``): runs only the
  reference's ``Quantizer.quantize`` on single matrices and writes its codes, scales, zeros and
  column scales to ``.safetensors`` files in ``JOB_DIR``. Module level therefore imports only
  what both venvs have (torch, safetensors); our package is imported lazily in the driver.

Both sides read the same ``model.safetensors`` (the converted SmolLM2 folder written by
``sinq_export.models.default_model_dir()``; the driver waits for it instead of converting).
Timings: whole-model quantization (all linears but lm_head) with the same thread count;
the machine is shared, so every timing is the median of ``--repeats`` runs, ours and theirs
interleaved run by run so that both see similar load.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

BITS = (3, 4)
GROUP_SIZE = 64
REF_KURTOSIS_GATE = 5.0  # the reference's default ``opt_params["kurtosis_threshold"]``
# variant -> (method, kurtosis gate); "sinq_gate" is the reference's default behaviour.
VARIANTS: dict[str, tuple[str, float | None]] = {
    "sinq": ("sinq", None),
    "sinq_gate": ("sinq", REF_KURTOSIS_GATE),
    "rtn": ("rtn", None),
}
TOLERANCE = 0.02  # "same algorithm" band for err_ours / err_theirs

# Reference venv. sinq 0.2.0 declares gemlite, lm_eval, torchaudio, torchvision, hf_transfer, ...
# as hard dependencies; none is needed for `sinq.quantizer`, and torchaudio/torchvision/gemlite
# would drag CUDA builds. So sinq is installed --no-deps, next to what its quantizer imports
# (torch, numpy; `datasets` because sinq/awq.py imports it at module level) and the
# transformers >= 5.2 it declares. torch is pinned in the same pip command so that pip keeps
# the local CPU build instead of resolving a CUDA one.
REF_REQUIREMENTS = ("torch==2.13.0", "transformers>=5.2", "numpy", "safetensors", "datasets")
REF_PACKAGE = "sinq==0.2.0"
# The sinq wheel ships a sitecustomize.py that patches transformers at every interpreter start.
REF_ENV = {"SINQ_AUTO_PATCH": "0"}

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
MODEL_FILE = "model.safetensors"


# --------------------------------------------------------------------------- shared helpers


def linear_names(model_file: Path) -> list[str]:
    """Weight names of every linear but lm_head (tied to the embedding, so absent here)."""
    with safe_open(str(model_file), framework="pt") as fh:
        names = [k for k in fh.keys() if k.startswith("model.layers.") and k.endswith("_proj.weight")]

    def order(name: str) -> tuple[int, str]:
        return int(name.split(".")[2]), name

    return sorted(names, key=order)


def select_layers(names: list[str], block_stride: int, limit: int) -> list[str]:
    """Every ``block_stride``-th transformer block (all its linears), then the first ``limit``.

    Why: on a heavily shared 2-core machine the reference needs minutes per config for all 210
    layers; a stride keeps every layer kind and the whole depth range in the sample.
    """
    picked = [n for n in names if int(n.split(".")[2]) % block_stride == 0]
    return picked[: limit or None]


def load_weights(model_file: Path, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """fp32 weights, loaded once so that timings measure quantization only, not I/O."""
    with safe_open(str(model_file), framework="pt") as fh:
        return {n: fh.get_tensor(n).float().contiguous() for n in names}


def rel_err(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Relative Frobenius reconstruction error, the quantity compared throughout."""
    return float(torch.linalg.norm(w - w_hat) / torch.linalg.norm(w).clamp_min(1e-30))


def config_key(variant: str, bits: int) -> str:
    return f"{variant}_{bits}bit"


# --------------------------------------------------------------------------- worker (ref venv)


def _reference_quantize_fn(gate: float | None):
    """`Quantizer.quantize` with the kurtosis gate set to ``gate``.

    The reference reads the gate from the default ``opt_params`` of its optimizer, which
    `Quantizer.quantize` does not expose; swapping in a partial with a copied dict changes
    nothing else of its code path.
    """
    from sinq import optimize
    from sinq.quantizer import Quantizer

    legacy = optimize.optimize_weights_proximal_legacy
    params = dict(inspect.signature(legacy).parameters["opt_params"].default)
    params["kurtosis_threshold"] = gate
    Quantizer.optimize_weights = staticmethod(functools.partial(legacy, opt_params=params))

    def quantize(w: torch.Tensor, bits: int, method: str):
        return Quantizer.quantize(
            w, None, nbits=bits, group_size=GROUP_SIZE, axis=1, bitpack=False,
            compute_dtype=torch.float32, device="cpu", tiling_mode="1D", method=method,
        )

    return quantize


def _reference_parts(w_q: torch.Tensor, meta: dict, shape: torch.Size) -> dict[str, torch.Tensor]:
    """The reference's result as ``q [N, K]``, ``s1, z [N, K/g]``, ``s2 [K]``."""
    n, k = shape
    return {
        "q": w_q.reshape(n, k).round().to(torch.uint8),
        "s1": meta["scale"].reshape(n, k // GROUP_SIZE).float(),
        "z": meta["zero"].reshape(n, k // GROUP_SIZE).float(),
        "s2": meta["scale2"].reshape(k).float(),
    }


def dequantize_parts(p: dict[str, torch.Tensor]) -> torch.Tensor:
    """``W_hat = (q - z) * s1 * s2``, the reference's uniform-path dequantisation formula."""
    n, k = p["q"].shape
    q = p["q"].float().reshape(n, k // GROUP_SIZE, GROUP_SIZE)
    w = (q - p["z"].unsqueeze(-1)) * p["s1"].unsqueeze(-1)
    return w.reshape(n, k) * p["s2"]


def _worker_layer_stats(w: torch.Tensor, w_q: torch.Tensor, meta: dict, parts: dict, bits: int) -> dict:
    """Per-layer facts checked on the reference side, where its own dequantize is available."""
    from sinq.quantizer import Quantizer

    own = Quantizer.dequantize(w_q, meta).float().reshape(w.shape)
    ours_formula = dequantize_parts(parts)
    z, qmax = parts["z"], (1 << bits) - 1
    return {
        "rel_err": rel_err(w, own),
        # Sanity check of our reading of its meta: must be ~0.
        "formula_max_abs_diff": float((own - ours_formula).abs().max()),
        "codes_integral": bool(torch.equal(w_q, w_q.round())),
        "z_integral": bool(torch.equal(z, z.round())),
        "z_out_of_range": int(((z < 0) | (z > qmax)).sum()),
        "z_min": float(z.min()),
        "z_max": float(z.max()),
    }


def run_worker(job_dir: Path) -> None:
    """Reference side of one driver call: error pass (run 0) and/or timing pass."""
    import importlib.metadata as md

    from sinq import optimize

    job = json.loads((job_dir / "job.json").read_text())
    torch.set_num_threads(job["threads"])
    names = job["layers"]
    weights = load_weights(Path(job["model_file"]), names)
    out: dict = {
        "versions": {p: md.version(p) for p in ("sinq", "torch", "transformers")},
        "threads": torch.get_num_threads(),
        "kurtosis": {n: float(optimize.kurtosis(w)) for n, w in weights.items()},
        "configs": {},
    }
    for variant, bits in job["configs"]:
        method, gate = VARIANTS[variant]
        quantize = _reference_quantize_fn(gate)
        key = config_key(variant, bits)
        seconds, layers, tensors = 0.0, {}, {}
        for name, w in weights.items():
            t0 = time.perf_counter()
            w_q, meta = quantize(w, bits, method)
            seconds += time.perf_counter() - t0
            if job["with_errors"]:
                parts = _reference_parts(w_q, meta, w.shape)
                layers[name] = _worker_layer_stats(w, w_q, meta, parts, bits)
                tensors.update({f"{name}.{k}": v.contiguous() for k, v in parts.items()})
        if tensors:
            save_file(tensors, str(job_dir / f"ref_{key}.safetensors"))
        out["configs"][key] = {"seconds": seconds, "layers": layers}
        print(f"[ref] {key}: {seconds:.1f} s", flush=True)
    (job_dir / "worker.json").write_text(json.dumps(out))


# --------------------------------------------------------------------------- reference venv


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _probe_reference(python: Path) -> dict | None:
    """Versions in the reference venv if it is usable (CPU torch, sinq importable), else None."""
    code = (
        "import json, torch, transformers, importlib.metadata as m; import sinq.quantizer; "
        "print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, "
        "'transformers': transformers.__version__, 'sinq': m.version('sinq')}))"
    )
    if not python.exists():
        return None
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True,
                          env={**os.environ, **REF_ENV})
    if proc.returncode != 0:
        return None
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    major, minor = (int(x) for x in info["transformers"].split(".")[:2])
    ok = info["sinq"] == "0.2.0" and info["cuda"] is None and (major, minor) >= (5, 2)
    return info if ok else None


def ensure_reference_venv(venv: Path) -> Path:
    """Create (once) and return the python of the reference venv; reused while it probes OK."""
    python = _venv_python(venv)
    if _probe_reference(python) is None:
        print(f"creating reference venv in {venv} (one-off, a few minutes)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, *REF_REQUIREMENTS], check=True)
        subprocess.run([*pip, "--no-deps", REF_PACKAGE], check=True)
        if _probe_reference(python) is None:
            raise RuntimeError(f"{venv}: reference venv unusable after install (CUDA torch?)")
    return python


def run_reference(python: Path, job: dict, job_dir: Path) -> dict:
    """One worker process; raises with its stderr if it fails."""
    (job_dir / "job.json").write_text(json.dumps(job))
    env = {**os.environ, **REF_ENV, "OMP_NUM_THREADS": str(job["threads"])}
    proc = subprocess.run([str(python), str(Path(__file__).resolve()), "--worker", str(job_dir)],
                          env=env, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"reference worker failed:\n{proc.stderr[-4000:]}")
    return json.loads((job_dir / "worker.json").read_text())


# --------------------------------------------------------------------------- ours (driver)


def wait_for_model(timeout_s: float) -> Path:
    """The converted SmolLM2 folder; another process converts it, so we only wait for it."""
    from sinq_export import gguf, models

    folder = models.cache_dir() / models.DEFAULT_MODEL_NAME
    deadline = time.monotonic() + timeout_s
    while not (folder / gguf.COMPLETE_MARKER).is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{folder} not converted after {timeout_s:.0f} s "
                               "(run sinq_export.models.default_model_dir() once)")
        time.sleep(10)
    return folder / MODEL_FILE


def quantize_ours(w: torch.Tensor, variant: str, bits: int):
    from sinq_export.quant import make_config, quantize

    method, gate = VARIANTS[variant]
    gated = {"kurtosis_gate": gate} if gate is not None else {}
    return quantize(w, make_config(method, bits=bits, group_size=GROUP_SIZE, **gated))


def time_ours(weights: dict[str, torch.Tensor], variant: str, bits: int) -> float:
    """Whole-model quantization time: the same loop the worker times."""
    t0 = time.perf_counter()
    for w in weights.values():
        quantize_ours(w, variant, bits)
    return time.perf_counter() - t0


def compare_layer(w: torch.Tensor, ours, ref: dict[str, torch.Tensor]) -> dict:
    """Ours vs the reference on one matrix: errors plus the intermediates that explain a gap."""
    from sinq_export.quant.core import relative_error

    ref_hat = dequantize_parts(ref)
    ours_hat = ours.dequantize()
    col = ours.col_scale if ours.col_scale is not None else torch.ones(w.shape[1])
    same_sign = same_sign_groups(w)
    return {
        "ours": relative_error(w, ours),
        "theirs": rel_err(w, ref_hat),
        # ||W_hat_ours - W_hat_theirs|| / ||W||: how far apart the two reconstructions are.
        "ours_vs_theirs": float(torch.linalg.norm(ours_hat - ref_hat) / torch.linalg.norm(w)),
        "codes_equal": float((ours.codes() == ref["q"]).float().mean()),
        "zeros_equal": float((ours.zeros().float() == ref["z"]).float().mean()),
        "col_scale_max_rel_diff": float(((col - ref["s2"]).abs() / ref["s2"].abs()).max()),
        "scale_max_rel_diff": float(((ours.scales - ref["s1"]).abs() / ref["s1"].abs()).max()),
        "ours_t_is_one": ours.col_scale is None,
        "same_sign_groups": same_sign,
    }


def same_sign_groups(w: torch.Tensor) -> int:
    """Groups whose values all share one sign: the only ones where our range-includes-0 rule
    differs from plain min/max. Sinkhorn scales are positive, so the count is the same for the
    normalised matrix."""
    g = w.reshape(w.shape[0], -1, GROUP_SIZE)
    return int(((g.amin(-1) > 0) | (g.amax(-1) < 0)).sum())


def error_pass(weights: dict[str, torch.Tensor], job_dir: Path, variant: str, bits: int
               ) -> tuple[float, dict[str, dict]]:
    """Run ours on every layer (timed) and compare each with the reference's saved result."""
    key = config_key(variant, bits)
    layers, seconds = {}, 0.0
    with safe_open(str(job_dir / f"ref_{key}.safetensors"), framework="pt") as fh:
        for name, w in weights.items():
            t0 = time.perf_counter()
            q = quantize_ours(w, variant, bits)
            seconds += time.perf_counter() - t0
            ref = {k: fh.get_tensor(f"{name}.{k}") for k in ("q", "s1", "z", "s2")}
            layers[name] = compare_layer(w, q, ref)
    (job_dir / f"ref_{key}.safetensors").unlink()
    return seconds, layers


# --------------------------------------------------------------------------- summary


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


@dataclass
class ConfigSummary:
    key: str
    mean_ours: float
    mean_theirs: float
    median_ours: float
    median_theirs: float
    frac_not_worse: float  # ours <= theirs * 1.02
    frac_not_better: float  # ours >= theirs * 0.98
    frac_within: float
    max_ratio: float
    min_ratio: float
    mean_codes_equal: float
    max_recon_gap: float  # max over layers of ||W_hat_ours - W_hat_theirs|| / ||W||
    worst: list[tuple[str, float, float, float]]  # name, ours, theirs, ratio


def summarise_config(key: str, layers: dict[str, dict], n_worst: int = 5) -> ConfigSummary:
    ours = [v["ours"] for v in layers.values()]
    theirs = [v["theirs"] for v in layers.values()]
    ratios = {n: v["ours"] / v["theirs"] for n, v in layers.items()}
    worst = sorted(ratios, key=ratios.get, reverse=True)[:n_worst]
    n = len(layers)
    return ConfigSummary(
        key=key,
        mean_ours=statistics.fmean(ours), mean_theirs=statistics.fmean(theirs),
        median_ours=_median(ours), median_theirs=_median(theirs),
        frac_not_worse=sum(r <= 1 + TOLERANCE for r in ratios.values()) / n,
        frac_not_better=sum(r >= 1 - TOLERANCE for r in ratios.values()) / n,
        frac_within=sum(abs(r - 1) <= TOLERANCE for r in ratios.values()) / n,
        max_ratio=max(ratios.values()), min_ratio=min(ratios.values()),
        mean_codes_equal=statistics.fmean(v["codes_equal"] for v in layers.values()),
        max_recon_gap=max(v["ours_vs_theirs"] for v in layers.values()),
        worst=[(w, layers[w]["ours"], layers[w]["theirs"], ratios[w]) for w in worst],
    )


def win_rate(layers: dict[str, dict], baseline: dict[str, dict], side: str) -> tuple[float, float]:
    """Fraction of layers where SINQ is strictly better than RTN, and where it ties exactly."""
    names = list(layers)
    wins = sum(layers[n][side] < baseline[n][side] for n in names) / len(names)
    ties = sum(layers[n][side] == baseline[n][side] for n in names) / len(names)
    return wins, ties


def gate_agreement(kurt_ref: dict[str, float], weights: dict[str, torch.Tensor]) -> dict:
    """Which layers each side's kurtosis gate sends to RTN (must be the same set)."""
    from sinq_export.quant.core import kurtosis

    ours = {n for n, w in weights.items() if kurtosis(w) > REF_KURTOSIS_GATE}
    theirs = {n for n, k in kurt_ref.items() if k > REF_KURTOSIS_GATE}
    return {"ours": len(ours), "theirs": len(theirs), "differ": sorted(ours ^ theirs)}


def zero_point_facts(worker_layers: dict[str, dict[str, dict]]) -> dict:
    """Reference zero points outside [0, 2^bits-1] (what our clamp-free rule never produces)."""
    return {
        key: {
            "z_out_of_range": sum(v["z_out_of_range"] for v in layers.values()),
            "z_min": min(v["z_min"] for v in layers.values()),
            "z_max": max(v["z_max"] for v in layers.values()),
            "formula_max_abs_diff": max(v["formula_max_abs_diff"] for v in layers.values()),
            "codes_and_z_integral": all(v["codes_integral"] and v["z_integral"]
                                        for v in layers.values()),
        }
        for key, layers in worker_layers.items()
    }


# --------------------------------------------------------------------------- report


def _subset_timing_lines(sub: dict | None) -> list[str]:
    """Timing of another run on a layer subset (more repeats fit there on a busy machine)."""
    if not sub:
        return []
    meta = sub["meta"]
    stride = meta["block_stride"]
    lines = ["", f"### Same timing on blocks 0, {stride}, {2 * stride}, ... ({meta['n_layers']} "
             f"layers), median of {meta['repeats']} runs, {meta['threads']} thread(s), "
             f"run {meta['date']}", "", "| config | ours | theirs | theirs / ours | runs ours; theirs |",
             "|---|---|---|---|---|"]
    for key, t in sub["times"].items():
        o, th = _median(t["ours"]), _median(t["theirs"])
        runs = ", ".join(f"{x:.1f}" for x in t["ours"]) + "; " + ", ".join(f"{x:.1f}" for x in t["theirs"])
        lines.append(f"| {key} | {o:.1f} | {th:.1f} | {th / o:.1f}x | {runs} |")
    return lines


def markdown(res: dict) -> str:
    """Human-readable report; every number also sits in the JSON next to it."""
    meta = res["meta"]
    lines = [
        "# Ours vs reference SINQ (`sinq==0.2.0`) on SmolLM2-135M-Instruct",
        "",
        f"Generated by `bench/reference_compare.py` on {meta['date']}. {meta['n_layers']} linears "
        f"(all 7 linears of every block whose index is a multiple of {meta.get('block_stride', 1)}; lm_head "
        f"excluded), group size {GROUP_SIZE}, 1D tiling, fp32 CPU, "
        f"{meta['threads']} threads per side. Reference: {meta['reference_versions']} "
        "(own venv); ours: main venv.",
        "Error = relative Frobenius reconstruction error ||W - W_hat||_F / ||W||_F per layer.",
        "`sinq` = Sinkhorn on every layer; `sinq_gate` = reference default (whole-matrix "
        f"kurtosis > {REF_KURTOSIS_GATE} -> RTN); `rtn` = plain min/max group RTN.",
        "",
        "## Per-layer reconstruction error, ours vs theirs",
        "",
        "| config | mean ours | mean theirs | median ours | median theirs | ours <= theirs*1.02 "
        "| ours >= theirs*0.98 | within +-2% | ratio min..max | codes identical "
        "| max ‖Ŵ_ours − Ŵ_theirs‖/‖W‖ |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in res["summary"].values():
        lines.append(
            f"| {s['key']} | {s['mean_ours']:.5f} | {s['mean_theirs']:.5f} | {s['median_ours']:.5f} "
            f"| {s['median_theirs']:.5f} | {_pct(s['frac_not_worse'])} | {_pct(s['frac_not_better'])} "
            f"| {_pct(s['frac_within'])} | {s['min_ratio']:.4f}..{s['max_ratio']:.4f} "
            f"| {100 * s['mean_codes_equal']:.4f}% | {s['max_recon_gap']:.2e} |"
        )
    lines += ["", "Worst layers (largest ours/theirs):", ""]
    lines += ["| config | layer | ours | theirs | ratio |", "|---|---|---|---|---|"]
    for s in res["summary"].values():
        for name, o, t, r in s["worst"][:3]:
            lines.append(f"| {s['key']} | {name} | {o:.5f} | {t:.5f} | {r:.4f} |")
    lines += ["", "## SINQ vs RTN: fraction of layers where SINQ's error is strictly lower", "",
              "| bits | ours: sinq | theirs: sinq | ours: sinq_gate | theirs: sinq_gate "
              "(ties = gated layers) |", "|---|---|---|---|---|"]
    for bits, w in res["win_rate"].items():
        lines.append(
            f"| {bits} | {_pct(w['sinq']['ours'][0])} | {_pct(w['sinq']['theirs'][0])} "
            f"| {_pct(w['sinq_gate']['ours'][0])} | {_pct(w['sinq_gate']['theirs'][0])} "
            f"(ties {_pct(w['sinq_gate']['theirs'][1])}) |"
        )
    scope = ("whole model" if meta.get("block_stride", 1) == 1
             else f"blocks 0, {meta['block_stride']}, {2 * meta['block_stride']}, ...")
    lines += ["", f"## Quantization time of the compared layers ({scope}, {meta['n_layers']} "
              f"layers), median of {meta['repeats']} run(s), seconds", "",
              "Ours and theirs interleaved run by run; the 2-core machine was shared with other "
              "jobs, so absolute numbers are noisy (all runs in the JSON).", "",
              "| config | ours | theirs | theirs / ours | runs ours; theirs |", "|---|---|---|---|---|"]
    for key, t in res["times"].items():
        o, th = _median(t["ours"]), _median(t["theirs"])
        runs = ", ".join(f"{x:.1f}" for x in t["ours"]) + "; " + ", ".join(f"{x:.1f}" for x in t["theirs"])
        lines.append(f"| {key} | {o:.1f} | {th:.1f} | {th / o:.1f}x | {runs} |")
    lines += _subset_timing_lines(res.get("timing_subset"))
    g = res["gate"]
    lines += ["", "## Kurtosis gate and zero points", "",
              f"- Layers the gate (> {REF_KURTOSIS_GATE}) sends to RTN: ours {g['ours']}, theirs "
              f"{g['theirs']}; differing: {g['differ'] or 'none'}."]
    for key, z in res["zero_points"].items():
        lines.append(
            f"- {key}: reference zero points outside [0, 2^bits-1]: {z['z_out_of_range']} "
            f"(range {z['z_min']:.0f}..{z['z_max']:.0f}); its dequantize vs (q-z)*s1*s2: "
            f"max |diff| {z['formula_max_abs_diff']:.2e}."
        )
    rz = res["range_includes_zero"]
    lines += [
        f"- Groups whose values all share one sign (the only groups where our range-includes-0 "
        f"rule differs from the reference's unclamped min/max): {rz['same_sign_groups']} of "
        f"{rz['groups']}. Its cost, measured as ours/theirs error on RTN: "
        + ", ".join(f"{k}: mean {v['mean_ratio']:.5f}, max {v['max_ratio']:.5f}"
                    for k, v in rz["rtn_ratio"].items()) + ".",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- driver


def configs() -> list[tuple[str, int]]:
    return [(v, b) for b in BITS for v in VARIANTS]


def run_driver(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    model_file = wait_for_model(args.wait_s)
    python = ensure_reference_venv(args.venv)
    names = select_layers(linear_names(model_file), args.block_stride, args.limit)
    weights = load_weights(model_file, names)
    job = {"model_file": str(model_file), "layers": names, "threads": args.threads,
           "configs": configs()}
    times: dict[str, dict[str, list[float]]] = {config_key(*c): {"ours": [], "theirs": []}
                                                for c in configs()}
    compared: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="sinq-refcmp-") as tmp:
        job_dir = Path(tmp)
        first = run_reference(python, {**job, "with_errors": True}, job_dir)
        for variant, bits in configs():
            key = config_key(variant, bits)
            seconds, compared[key] = error_pass(weights, job_dir, variant, bits)
            times[key]["ours"].append(seconds)
            times[key]["theirs"].append(first["configs"][key]["seconds"])
            print(f"[ours] {key}: {seconds:.1f} s", flush=True)
        # Written after every round: the reference is slow on a busy machine, and an
        # interrupted run still leaves the errors and the timing rounds completed so far.
        write_results(assemble(args, names, weights, first, compared, times), args.out)
        for _ in range(args.repeats - 1):
            again = run_reference(python, {**job, "with_errors": False}, job_dir)
            for variant, bits in configs():
                key = config_key(variant, bits)
                times[key]["theirs"].append(again["configs"][key]["seconds"])
                times[key]["ours"].append(time_ours(weights, variant, bits))
                print(f"[ours] {key}: {times[key]['ours'][-1]:.1f} s", flush=True)
            write_results(assemble(args, names, weights, first, compared, times), args.out)


def assemble(
    args: argparse.Namespace,
    names: list[str],
    weights: dict[str, torch.Tensor],
    first: dict,
    compared: dict[str, dict[str, dict]],
    times: dict[str, dict[str, list[float]]],
) -> dict:
    """All results as one JSON-able dict (per-layer data included)."""
    win = {}
    for bits in BITS:
        rtn = compared[config_key("rtn", bits)]
        win[bits] = {v: {side: win_rate(compared[config_key(v, bits)], rtn, side)
                         for side in ("ours", "theirs")} for v in ("sinq", "sinq_gate")}
    rtn_ratio = {}
    for bits in BITS:
        r = [v["ours"] / v["theirs"] for v in compared[config_key("rtn", bits)].values()]
        rtn_ratio[f"rtn_{bits}bit"] = {"mean_ratio": statistics.fmean(r), "max_ratio": max(r)}
    any_cfg = next(iter(compared.values()))
    return {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "n_layers": len(names), "block_stride": args.block_stride, "threads": args.threads,
            "repeats": len(next(iter(times.values()))["ours"]),
            "group_size": GROUP_SIZE, "bits": list(BITS), "platform": platform.platform(),
            "torch_ours": torch.__version__, "reference_versions": first["versions"],
            "reference_threads": first["threads"],
        },
        "summary": {k: vars(summarise_config(k, v)) for k, v in compared.items()},
        "win_rate": win,
        "times": times,
        "gate": gate_agreement(first["kurtosis"], weights),
        "zero_points": zero_point_facts({k: c["layers"] for k, c in first["configs"].items()}),
        "range_includes_zero": {
            "same_sign_groups": sum(v["same_sign_groups"] for v in any_cfg.values()),
            "groups": sum(w.numel() // GROUP_SIZE for w in weights.values()),
            "rtn_ratio": rtn_ratio,
        },
        "reference_rel_err_crosscheck_max_abs_diff": max(
            abs(compared[k][n]["theirs"] - first["configs"][k]["layers"][n]["rel_err"])
            for k in compared for n in names
        ),
        "layers": compared,
        "kurtosis": first["kurtosis"],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--venv", type=Path, default=Path.home() / ".cache" / "sinq-export" / "ref-venv",
                   help="reference venv (created on first use, outside the repository)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timing runs per config (median)")
    p.add_argument("--block-stride", type=int, default=1,
                   help="compare every N-th transformer block only (1 = all 210 layers)")
    p.add_argument("--limit", type=int, default=0, help="first N layers only (smoke test)")
    p.add_argument("--wait-s", type=float, default=1800, help="how long to wait for the model")
    p.add_argument("--out", type=Path, default=RESULTS / "reference_compare")
    p.add_argument("--render", type=Path, help="only rewrite --out from this results JSON")
    p.add_argument("--timing-subset", type=Path,
                   help="with --render: attach the timings of a --block-stride run's JSON")
    return p.parse_args(argv)


def write_results(res: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(res))
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")


def rerender(args: argparse.Namespace) -> None:
    """Rewrite the report from a saved JSON, optionally attaching a subset run's timings."""
    res = json.loads(args.render.read_text())
    if args.timing_subset is not None:
        sub = json.loads(args.timing_subset.read_text())
        res["timing_subset"] = {"meta": sub["meta"], "times": sub["times"]}
    write_results(res, args.out)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        run_worker(args.worker)
        return
    if args.render is not None:
        rerender(args)
        return
    sys.path.insert(0, str(REPO))
    run_driver(args)


if __name__ == "__main__":
    main()
