"""Parity in the JavaScript runtimes: onnxruntime-node (a Node subprocess) and onnxruntime-web
inside headless Chromium (WASM, and WebGPU - on Chromium's software adapter where no GPU
exists), driven through the same prefill + decode steps as the PyTorch reference.

The pinned packages live in the repository's ``js/`` folder (``package.json`` +
``package-lock.json``, installed by ``install.sh`` with ``npm ci --ignore-scripts``); the
browser is the system's Chromium (or ``$SINQ_CHROMIUM``). A runtime that is not installed is
reported as skipped with the command that installs it. Pages are served from 127.0.0.1 by
``js/serve.py`` with cross-origin isolation headers (WASM threads need them).

Only end-to-end logits are compared here: the per-layer checks run in Python onnxruntime,
whose kernels these runtimes share the graph with.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .metrics import compare_logits
from .providers import CUSTOM_DOMAIN, JS_PROVIDERS, WEIGHT_STEP_LIMIT, ValidationError, tolerance_for
from .report import LayerResult, ProviderResult

if TYPE_CHECKING:
    import onnx

    from .graph import ExportInfo
    from .runners import _LMRun

# The tolerance row each JavaScript runtime is held to (`providers.tolerance_for`):
# onnxruntime-node runs the native CPU kernels; the WASM build runs the same MLAS code compiled
# to WebAssembly (other vector widths, so another summation order: the CPU row's headroom
# covers it); WebGPU runs WGSL kernels with their own reduction order: the GPU row.
TOLERANCE_AS = {"node": "cpu", "wasm": "cpu", "web-webgpu": "webgpu"}
RUNTIME_NAMES = {"node": "onnxruntime-node", "wasm": "onnxruntime-web (WASM)",
                 "web-webgpu": "onnxruntime-web (WebGPU)"}
NPM_FIX = "bash install.sh (or: cd js && npm ci --ignore-scripts)"
CHROMIUM_FIX = "apt-get install -y chromium (or set SINQ_CHROMIUM to a Chromium binary)"
NODE_FIX = "apt-get install -y nodejs npm (Node >= 18), then " + NPM_FIX
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
DEFAULT_TIMEOUT_S = 3600.0


def js_dir() -> Path:
    """The ``js/`` folder with package.json and the runner scripts (``$SINQ_JS_DIR`` or the
    repository's)."""
    return Path(os.environ.get("SINQ_JS_DIR") or Path(__file__).resolve().parents[2] / "js")


def chromium_path() -> str | None:
    """The browser the pages run in, the same search as ``js/browser.mjs``."""
    for candidate in (os.environ.get("SINQ_CHROMIUM"), *CHROMIUM_CANDIDATES):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def missing(runtime: str) -> str | None:
    """Why ``runtime`` cannot run on this machine, with the one command that fixes it."""
    if shutil.which("node") is None:
        return f"Node is not installed; fix: {NODE_FIX}"
    packages = js_dir() / "node_modules"
    need = ["onnxruntime-node"] if runtime == "node" else ["onnxruntime-web", "playwright-core"]
    absent = [p for p in need if not (packages / p / "package.json").is_file()]
    if absent:
        return f"{', '.join(absent)} not installed in {js_dir()}; fix: {NPM_FIX}"
    if runtime != "node" and chromium_path() is None:
        return f"no Chromium found; fix: {CHROMIUM_FIX}"
    return None


def refuse_custom_ops(names: list[str], custom_domains: list[str]) -> None:
    """A ``sinq.ops`` export runs only where our native library loads: refused up front."""
    js = [n for n in names if n in JS_PROVIDERS]
    if js and CUSTOM_DOMAIN in custom_domains:
        raise ValidationError(
            f"{', '.join(js)} cannot run this export: it uses the {CUSTOM_DOMAIN} custom ops, "
            "which only native onnxruntime with libsinq_ops loads; export with --runtime stock "
            "for the JavaScript runtimes")


@dataclass
class JsRun:
    logits: np.ndarray  # [T, V], every step's rows in order
    fed: list[int]  # decode tokens fed after the prefill
    info: dict[str, Any] = field(default_factory=dict)  # runtime, version, backend, adapter...


def past_specs(model: onnx.ModelProto) -> list[dict]:
    """``[{name, dims}]`` of the past inputs with an empty sequence axis (from the graph)."""
    specs = []
    for value in model.graph.input:
        if not value.name.startswith("past_key_values"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None
                for d in value.type.tensor_type.shape.dim]
        if len(dims) != 4 or dims[1] is None or dims[3] is None:
            raise ValidationError(f"cannot size the empty past {value.name}: {dims}")
        specs.append({"name": value.name, "dims": [1, dims[1], 0, dims[3]]})
    return specs


def data_locations(model: onnx.ModelProto) -> list[str]:
    """The graph's external-data files, relative to the graph's folder, in first-use order."""
    locations: dict[str, None] = {}
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                locations[entry.value] = None
    return list(locations)


def run_js(runtime: str, model: onnx.ModelProto, graph_file: Path, prefill: np.ndarray,
           decode: list[int] | int, graph_bytes: bytes | None = None, threads: int = 1,
           timeout: float = DEFAULT_TIMEOUT_S) -> JsRun:
    """Prefill + decode steps of the graph at ``graph_file`` (or ``graph_bytes``, whose data
    files sit next to ``graph_file``) in ``runtime`` (``node``, ``wasm``, ``web-webgpu``).

    Raises `ValidationError` with the runtime's own first line when it cannot load or run the
    folder (a missing data file, an operator it lacks).
    """
    for location in data_locations(model):
        if not (graph_file.parent / location).is_file():
            raise ValidationError(f"{RUNTIME_NAMES[runtime]} cannot run the export: "
                                  f"{graph_file.parent / location} is missing")
    job = {"prefill": [int(t) for t in prefill],
           "decode": decode if isinstance(decode, int) else [int(t) for t in decode],
           "pasts": past_specs(model), "threads": threads}
    with tempfile.TemporaryDirectory(prefix="sinq-js-") as tmp:
        work = Path(tmp)
        graph = graph_file
        if graph_bytes is not None:
            graph = work / graph_file.name
            graph.write_bytes(graph_bytes)
        if runtime == "node":
            info = _run_node(job, graph, graph_file.parent, work, timeout)
        else:
            info = _run_browser(job, runtime, model, graph, graph_file.parent, work, timeout)
        logits = np.fromfile(work / "logits.bin", dtype=np.float32)
    vocab, rows = int(info["vocab"]), int(info["rows"])
    if logits.size != vocab * rows:
        raise ValidationError(f"{runtime}: returned {logits.size} logits, expected {rows} x {vocab}")
    return JsRun(logits.reshape(rows, vocab), list(info["fed"]), info)


def _node_command(script: str, *args: str, timeout: float, what: str,
                  env: dict[str, str] | None = None) -> dict:
    try:
        proc = subprocess.run(["node", str(js_dir() / script), *args], capture_output=True,
                              text=True, timeout=timeout, cwd=js_dir(),
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        raise ValidationError(f"{what} did not finish in {timeout:.0f} s") from None
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        error = next((ln for ln in lines if "Error" in ln), lines[0] if lines else "no output")
        raise ValidationError(f"{what} cannot run the export: {error.strip()}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run_node(job: dict, graph: Path, data_dir: Path, work: Path, timeout: float) -> dict:
    job = {**job, "graph": str(graph.absolute()), "data_dir": str(data_dir.absolute()),
           "logits": str(work / "logits.bin")}
    (work / "job.json").write_text(json.dumps(job))
    return _node_command("node_run.mjs", str(work / "job.json"), timeout=timeout,
                         what="onnxruntime-node")


def load_server() -> types.ModuleType:
    """``js/serve.py`` (standard library only) as a module."""
    spec = importlib.util.spec_from_file_location("sinq_js_serve", js_dir() / "serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_browser(job: dict, runtime: str, model: onnx.ModelProto, graph: Path, data_dir: Path,
                 work: Path, timeout: float) -> dict:
    backend = "webgpu" if runtime == "web-webgpu" else "wasm"
    served = graph.parent == data_dir
    job = {**job, "backend": backend,
           "graph": f"/models/export/{graph.name}" if served else f"/job/{graph.name}",
           "data": [{"path": loc, "data": f"/models/export/{loc}"} for loc in data_locations(model)],
           "logits_put": "/job/logits.bin"}
    (work / "job.json").write_text(json.dumps(job))
    server, url = load_server().start({"export": data_dir}, job=work)
    try:
        return run_page(f"{url}/js/parity.html?job=/job/job.json", backend, timeout)
    finally:
        server.shutdown()
        server.server_close()


def run_page(url: str, backend: str, timeout: float) -> dict:
    """The ``window.__result`` of the page at ``url`` (served by ``js/serve.py``) in headless
    Chromium (``backend`` ``webgpu`` turns WebGPU on), within ``timeout`` seconds."""
    return _node_command("browser_run.mjs", url, backend, timeout=timeout + 60,
                         what=f"onnxruntime-web ({backend})",
                         env={"SINQ_PAGE_TIMEOUT_MS": str(int(timeout * 1000))})


def describe(info: dict) -> str:
    """One line naming what ran: runtime, version, backend, threads or adapter."""
    text = f"{info.get('runtime')} {info.get('version') or ''}".rstrip()
    if info.get("backend") == "wasm":
        text += f", WASM, {info.get('threads', 1)} thread(s)"
    adapter = info.get("adapter")
    if adapter:
        kind = "software adapter" if adapter.get("software") else "GPU adapter"
        name = " ".join(filter(None, (adapter.get("vendor"), adapter.get("architecture"))))
        text += f", WebGPU on a {kind}" + (f" ({name})" if name else "")
    if info.get("prefill_chunk"):
        text += (f", prompt in runs of {info['prefill_chunk']} tokens (subgroups "
                 f"{adapter.get('subgroupMaxSize')} wide)")
    return text


def js_provider_result(name: str, info: ExportInfo, model: onnx.ModelProto, prefill: np.ndarray | None,
                       decode_tokens: list[int] | None, ref_run: _LMRun | None, level: int,
                       override: bytes | None,
                       weight_check: dict[str, float | None]) -> ProviderResult:
    """One JavaScript runtime's `ProviderResult`: the reference's prefill + decode tokens fed,
    its logits compared with the PyTorch reference's (the caller applies the verdict to a
    result with ``end_to_end``; otherwise it is skipped, with the reason).

    The reference is rebuilt from the ONNX tensors, so a damaged weight would be in both: the
    weights' distance from the source (``weight_check``, quantization steps per layer) is part
    of every JavaScript runtime's verdict too.
    """
    pr = ProviderResult(provider=name, ort_provider=JS_PROVIDERS[name], status="skipped",
                        accuracy_level=level, dtype=info.dtype)
    if info.kind != "causal-lm":
        pr.reason = "the JavaScript runtimes are checked on causal-LM exports only"
        return pr
    if ref_run is None:
        pr.reason = ("needs the PyTorch reference (the source folder or OUT_DIR/reference) to "
                     "compare with")
        return pr
    why = missing(name)
    if why is not None:
        pr.reason = why
        return pr
    start = time.perf_counter()
    pr.tolerance = tolerance_for(TOLERANCE_AS[name], level, info.dtype)
    run = run_js(name, model, info.onnx_path, prefill, list(decode_tokens), graph_bytes=override)
    pr.runtime = describe(run.info)
    if run.logits.shape != ref_run.logits.shape:
        raise ValidationError(f"output shape: torch {ref_run.logits.shape} vs {name} "
                              f"{run.logits.shape}")
    pr.end_to_end = compare_logits(ref_run.logits, run.logits, prefill, len(prefill))
    for layer, steps in weight_check.items():
        if steps is None:
            continue
        meta = info.layers.get(layer, {})
        ok = steps <= WEIGHT_STEP_LIMIT
        pr.layers.append(LayerResult(
            name=layer, op=str(meta.get("op", "")), bits=meta.get("bits"), weight_steps=steps,
            passed=ok, note="" if ok else (f"weights {steps:.1f} quantization steps from the "
                                           f"source (limit {WEIGHT_STEP_LIMIT})")))
    pr.seconds = time.perf_counter() - start
    return pr
