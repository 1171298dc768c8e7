"""Perplexity of the default export against its calibration token budget, on the real models.

    python bench/calibration_budget.py                              # SmolLM2, Qwen, Gemma3 x 2,3,4,8
    python bench/calibration_budget.py --models smollm2 --windows 4,8

The default preset (`sinq-export model`) calibrates only its 4-bit g32 lm_head (A-SINQ + GPTQ on
the head input's Hessian) from a forward of the model over N windows x 512 tokens of Wikipedia
text. For each model and each N this runs, each in a fresh process, exactly the product with only
the budget changed:

    python -m sinq_export.console model SRC -o OUT --json --calibration-windows N
    python -m sinq_export.console eval OUT --json            # the shared protocol (eval's default)

and records the perplexity, the export's wall seconds, its own stage timings and peak RSS, and the
head's K (the hidden size: GPTQ inverts the K x K Hessian, which fewer than K tokens leave rank
deficient). For the N that the default picks (`default_window_count` for a head calibrated
alone) it also runs `sinq-export validate OUT` and records pass/fail and top-1 agreement. Each
export folder is deleted once measured. Export times are wall clock on a shared machine:
compare them within a run only.

Writes bench/results/calibration_budget.{md,json}; rows of earlier runs with other (model, N) are
kept, so models can be run one by one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from _real_models import REAL_MODELS, real_model_dir  # noqa: E402  (bench/)

RESULTS = ROOT / "bench" / "results"


def head_k(src: Path) -> int:
    """The lm_head's input width: the model's hidden size."""
    cfg = json.loads((src / "config.json").read_text())
    return int(cfg.get("hidden_size") or cfg["text_config"]["hidden_size"])


def console(*args: str) -> tuple[int, str, str, float]:
    """``python -m sinq_export.console ARGS`` in a fresh process: rc, stdout, stderr, wall s."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "sinq_export.console", *args], capture_output=True,
                       text=True, env=env, cwd=ROOT)
    return p.returncode, p.stdout, p.stderr, time.perf_counter() - t0


def last_json(text: str) -> Any:
    """The JSON document a ``--json`` command printed (its stdout, possibly after log lines)."""
    start = text.find("{")
    return json.loads(text[start:])


def measure(name: str, src: Path, n: int, validate: bool, work: Path) -> dict[str, Any]:
    """Export ``src`` with ``n`` calibration windows, score it, optionally validate it, delete it."""
    out = work / f"{name}-{n}"
    row: dict[str, Any] = {"model": name, "windows": n, "tokens": n * 512, "head_k": head_k(src)}
    try:
        rc, so, se, wall = console("model", str(src), "-o", str(out), "--json",
                                   "--calibration-windows", str(n))
        row["export_wall_s"] = round(wall, 1)
        if rc != 0:
            row["error"] = f"model rc {rc}: {se.strip().splitlines()[-1:] }"
            return row
        summary = last_json(so)
        row["timings_s"] = {k: round(v, 1) for k, v in summary.get("timings_s", {}).items()}
        rss = summary.get("peak_rss_mb") or {}
        row["peak_rss_mb"] = round(max(rss.values())) if rss else None
        rc, so, se, wall = console("eval", str(out), "--json")
        row["eval_wall_s"] = round(wall, 1)
        if rc != 0:
            row["error"] = f"eval rc {rc}: {se.strip().splitlines()[-1:]}"
            return row
        row["ppl"] = perplexity(last_json(so))
        if validate:
            report = work / f"{name}-{n}-validate.json"
            rc, so, se, wall = console("validate", str(out), "--json", str(report))
            row["validate"] = validation(rc, report, wall)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return row


def perplexity(result: dict[str, Any]) -> float:
    """The export's perplexity from `eval --json` (one row: the export in onnxruntime)."""
    return round(float(result["rows"][0]["ppl"]), 3)


def validation(rc: int, report: Path, wall: float) -> dict[str, Any]:
    """Pass/fail and top-1 agreement (prefill + decode tokens) of a `validate --json` report."""
    out: dict[str, Any] = {"rc": rc, "passed": rc == 0, "wall_s": round(wall, 1)}
    if report.is_file():
        data = json.loads(report.read_text())
        out["status"] = data["status"]
        e2e = data["providers"][0].get("end_to_end") or {}
        out["top1"] = None if e2e.get("top1") is None else round(e2e["top1"], 4)
        report.unlink()
    return out


def load_rows(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def write_results(rows: list[dict[str, Any]]) -> None:
    """bench/results/calibration_budget.{json,md}."""
    from _sysinfo import cpu_name

    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: (REAL_MODELS.index(r["model"]), r["windows"]))
    meta = {"cpu": cpu_name(), "cpus": os.cpu_count(), "load_avg_at_write": os.getloadavg(),
            "note": "wall times measured beside other jobs on a shared machine"}
    doc = {"meta": meta, "rows": rows}
    (RESULTS / "calibration_budget.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = ["# Default export vs. calibration windows (x 512 tokens)", "",
             f"CPU: {meta['cpu']} ({meta['cpus']} cores), shared with other jobs: export times are",
             "noisy. ppl: `sinq-export eval OUT` (4 x 512 Wikipedia tokens, onnxruntime). Δ: ppl minus",
             "the row of the same model at the N the default picks; validate: at that N.", "",
             "| model | head K | N | tokens | ppl | Δ | export s | calibrate s | peak RSS MiB | validate |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    base = {r["model"]: r.get("ppl") for r in rows if r["windows"] == r.get("default_n")}
    for r in rows:
        ppl, b = r.get("ppl"), base.get(r["model"])
        delta = f"{ppl - b:+.3f}" if ppl is not None and b is not None else ""
        v = r.get("validate")
        vtxt = "" if not v else f"{'pass' if v['passed'] else 'FAIL'} (top-1 {v.get('top1')})"
        cal = r.get("timings_s", {}).get("calibrate", "")
        lines.append(f"| {r['model']} | {r['head_k']} | {r['windows']} | {r['tokens']} | "
                     f"{ppl if ppl is not None else r.get('error', '')} | {delta} | "
                     f"{r.get('export_wall_s', '')} | {cal} | {r.get('peak_rss_mb', '')} | {vtxt} |")
    (RESULTS / "calibration_budget.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(REAL_MODELS),
                    help=f"comma list of {', '.join(REAL_MODELS)}")
    ap.add_argument("--windows", default="2,3,4,8", help="comma list of calibration window counts")
    ap.add_argument("--no-validate", action="store_true", help="skip validate at the default N")
    args = ap.parse_args()
    from sinq_export.calibration.windows import default_window_count

    path = RESULTS / "calibration_budget.json"
    rows = load_rows(path)
    windows = [int(w) for w in args.windows.split(",")]
    with tempfile.TemporaryDirectory(prefix="calibration-budget-") as tmp:
        for name in args.models.split(","):
            src = real_model_dir(name)
            default_n = default_window_count(head_k(src), head_only=True)
            for n in windows:
                row = measure(name, src, n, validate=not args.no_validate and n == default_n,
                              work=Path(tmp))
                row["default_n"] = default_n
                print(json.dumps(row), flush=True)
                rows = [r for r in rows if (r["model"], r["windows"]) != (name, n)] + [row]
                write_results(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
