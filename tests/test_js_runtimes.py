"""The JavaScript runtimes on a tiny random-weight export (accuracy level 0): onnxruntime-node
and onnxruntime-web (WASM, WebGPU on Chromium's software adapter) run the folder as it is and
agree with Python onnxruntime; transformers.js loads it unchanged and generates what
onnxruntime-genai generates; `validate --providers node,wasm,web-webgpu` reports them.

Real runtimes only: the pinned npm packages in js/ and the system's Chromium (install.sh sets
them up). Where they are missing the tests skip, which fails a CI run (tests/conftest.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from _helpers import flip_packed_byte
from _models import qwen2_source

from sinq_export.cli import main
from sinq_export.config import GraphConfig, SinqConfig
from sinq_export.contract import MANIFEST_FILE, MODEL_FILE
from sinq_export.validate import js
from sinq_export.validate.metrics import compare_logits
from sinq_export.validate.providers import ValidationError, tolerance_for
from sinq_export.validate.runners import run_ort_lm

PREFILL = np.array([5, 17, 99, 4000, 12, 873, 2044, 31, 7, 650, 11, 90], dtype=np.int64)
STEPS = 8


def _need(runtime: str) -> None:
    why = js.missing(runtime)
    if why is not None:
        pytest.skip(f"{runtime}: {why}")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(source, export) of the tiny Qwen2 at accuracy level 0, 4-bit SINQ g16, with the
    default's 4-bit embedding table (GatherBlockQuantized), so every runtime below gathers it."""
    from sinq_export.export import export_causal_lm
    from sinq_export.models import default_model_dir

    root = tmp_path_factory.mktemp("js")
    src = qwen2_source(root / "src", default_model_dir())
    out = root / "out"
    export_causal_lm(src, out, SinqConfig(bits=4, group_size=16),
                     GraphConfig(accuracy_level=0, embedding_bits=4), progress=False)
    return src, out


@pytest.fixture(scope="module")
def standard_table_export(exported, tmp_path_factory):
    """The same export with its 4-bit table read by standard ops (``table_ops="standard"``):
    transformers.js's own onnxruntime-web build has no GatherBlockQuantized kernel
    (docs/runtimes.md)."""
    from sinq_export.export import export_causal_lm

    out = tmp_path_factory.mktemp("js-standard-table") / "out"
    export_causal_lm(exported[0], out, SinqConfig(bits=4, group_size=16),
                     GraphConfig(accuracy_level=0, embedding_bits=4, table_ops="standard"),
                     progress=False)
    return out


@pytest.fixture(scope="module")
def python_run(exported):
    """Python onnxruntime's greedy run: the tokens and logits the JS runtimes must give."""
    session = ort.InferenceSession(str(exported[1] / MODEL_FILE),
                                   providers=["CPUExecutionProvider"])
    return run_ort_lm(session, PREFILL, STEPS)


def _graph(exported):
    return onnx.load(str(exported[1] / MODEL_FILE), load_external_data=False)


@pytest.mark.parametrize("runtime", ["node", "wasm"])
def test_greedy_tokens_equal_python_onnxruntime(exported, python_run, runtime):
    _need(runtime)
    run = js.run_js(runtime, _graph(exported), exported[1] / MODEL_FILE, PREFILL, STEPS)
    assert run.fed == python_run.fed
    assert run.logits.shape == python_run.logits.shape
    # same graph, same acc-0 math: only summation order may differ (node: the same kernels)
    e = compare_logits(python_run.logits, run.logits, PREFILL, len(PREFILL))
    assert e.rel <= tolerance_for(js.TOLERANCE_AS[runtime], 0).logits_rel, e.rel
    if runtime == "node":
        assert run.info["runtime"] == "onnxruntime-node"
    else:
        assert run.info["backend"] == "wasm" and run.info["isolated"] is True


def test_wasm_loads_a_split_export(exported, python_run, tmp_path, monkeypatch):
    """A folder whose data is split into model.onnx_data, _1, ... (what exports past 2 GB get)
    runs in the browser: every data file is fetched and the logits are the whole folder's."""
    from sinq_export.export import decoder

    _need("wasm")
    save = decoder._save
    monkeypatch.setattr(decoder, "_save",
                        lambda model, path, stages: save(model, path, stages, 4_000_000))
    out = tmp_path / "split"
    decoder.export_causal_lm(exported[0], out, SinqConfig(bits=4, group_size=16),
                             GraphConfig(accuracy_level=0, embedding_bits=4), progress=False)
    model = onnx.load(str(out / MODEL_FILE), load_external_data=False)
    assert len(js.data_locations(model)) > 1
    run = js.run_js("wasm", model, out / MODEL_FILE, PREFILL, python_run.fed[:2])
    rows = len(PREFILL) + 2
    e = compare_logits(python_run.logits[:rows], run.logits, PREFILL, len(PREFILL))
    assert e.rel <= tolerance_for("cpu", 0).logits_rel and e.top1 == 1.0, (e.rel, e.top1)


def test_webgpu_software_adapter_logits_within_tolerance(exported, python_run):
    _need("web-webgpu")
    steps = 2  # SwiftShader runs the WGSL kernels on the CPU: slow
    run = js.run_js("web-webgpu", _graph(exported), exported[1] / MODEL_FILE, PREFILL,
                    python_run.fed[:steps])
    rows = len(PREFILL) + steps
    e = compare_logits(python_run.logits[:rows], run.logits, PREFILL, len(PREFILL))
    tol = tolerance_for(js.TOLERANCE_AS["web-webgpu"], 0)
    assert e.rel <= tol.logits_rel and e.top1 >= tol.top1, (e.rel, e.top1)
    adapter = run.info["adapter"]
    assert adapter["available"], adapter
    print("WebGPU adapter:", adapter, "logits rel", e.rel)
    assert "WebGPU on a" in js.describe(run.info)


def test_webgpu_long_prompt_within_tolerance(exported):
    """A 48-token prompt: on an adapter with subgroups narrower than 16 lanes (SwiftShader's are
    4) onnxruntime-web's prefill attention returns wrong rows past ~30 new tokens in one run
    (this model: logits rel 0.53, top-1 0.24), so the prompt goes in runs of 16 there."""
    _need("web-webgpu")
    prefill = np.random.default_rng(0).integers(3, 4000, 48)
    session = ort.InferenceSession(str(exported[1] / MODEL_FILE),
                                   providers=["CPUExecutionProvider"])
    reference = run_ort_lm(session, prefill, 2)
    run = js.run_js("web-webgpu", _graph(exported), exported[1] / MODEL_FILE, prefill,
                    reference.fed)
    e = compare_logits(reference.logits, run.logits, prefill, len(prefill))
    tol = tolerance_for(js.TOLERANCE_AS["web-webgpu"], 0)
    assert e.rel <= tol.logits_rel and e.top1 >= tol.top1, (e.rel, e.top1)
    width = run.info["adapter"].get("subgroupMaxSize")
    assert run.info["prefill_chunk"] == (16 if width is not None and width < 16 else 0), run.info


def _genai_greedy(folder, prompt: list[int], new: int) -> list[int]:
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new, min_length=len(prompt) + new,
                              do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens([prompt])
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)]


def test_transformers_js_loads_the_folder_unchanged(exported):
    _need("node")
    if not (js.js_dir() / "node_modules" / "@huggingface" / "transformers").is_dir():
        pytest.skip(f"transformers.js not installed; fix: {js.NPM_FIX}")
    prompt, new = [int(t) for t in PREFILL[:6]], 10
    proc = subprocess.run(["node", str(js.js_dir() / "tjs_generate.mjs"), str(exported[1]),
                           json.dumps(prompt), str(new)], capture_output=True, text=True,
                          timeout=600, cwd=js.js_dir())
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])["ids"]
    assert got == _genai_greedy(exported[1], prompt, new)


def _run_page(folder: Path, page: str, query: dict, backend: str = "wasm") -> dict:
    """``page`` (a path under the repository) with ``folder`` served as /models/export/, driven
    headless by js/browser_run.mjs (which fails on any request outside 127.0.0.1)."""
    server, url = js.load_server().start({"export": folder})
    try:
        proc = subprocess.run(["node", str(js.js_dir() / "browser_run.mjs"),
                               f"{url}/{page}?{urllib.parse.urlencode(query)}", backend],
                              capture_output=True, text=True, timeout=600, cwd=js.js_dir())
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_transformers_js_in_the_browser_generates_genai_tokens(standard_table_export):
    """transformers.js inside headless Chromium (WASM, from js/node_modules, no CDN) loads the
    folder as served and its greedy tokens are onnxruntime-genai's."""
    _need("wasm")
    if not (js.js_dir() / "node_modules" / "@huggingface" / "transformers").is_dir():
        pytest.skip(f"transformers.js not installed; fix: {js.NPM_FIX}")
    prompt, new = [int(t) for t in PREFILL[:6]], 10
    web = _run_page(standard_table_export, "js/tjs_page.html",
                    {"model": "export", "ids": json.dumps(prompt), "new": new})
    assert web["version"] == "4.3.1" and web["device"] == "wasm"
    assert web["ids"] == _genai_greedy(standard_table_export, prompt, new)


def _webgpu_nodes(folder: Path) -> dict:
    """The nodes onnxruntime-web's WebGPU session runs for ``folder`` (after its fusions)."""
    graph = folder / MODEL_FILE
    model = onnx.load(str(graph), load_external_data=False)
    data = [{"path": loc, "data": f"/models/export/onnx/{loc}"} for loc in js.data_locations(model)]
    return _run_page(folder, "js/graph_nodes.html",
                     {"graph": "/models/export/onnx/model.onnx", "data": json.dumps(data)},
                     backend="webgpu")


def test_the_web_preset_fuses_in_onnxruntime_web(exported, tmp_path, capsys, monkeypatch):
    """WebGPU fuses each layer's norm + gate/up + SiLU into one MatMulNBitsMlp for the `web`
    preset's export and for no layer of an asymmetric (zero points) one; the fused kernel's
    logits pass validate against the PyTorch reference."""
    from sinq_export.export import export_causal_lm

    _need("web-webgpu")
    export_causal_lm(exported[0], tmp_path / "web", preset="web", progress=False)
    web = _webgpu_nodes(tmp_path / "web")
    layers = 2
    assert web["fusions"] == {"MatMulNBitsMlpFusion": layers}, web
    gpu = web["nodes"]["WebGpuExecutionProvider"]
    assert gpu["MatMulNBitsMlp"] == layers and gpu["GroupQueryAttention"] == layers, gpu
    assert gpu["MatMulNBits"] == 3 * layers + 1, gpu  # packed q/k/v, o_proj, down; the head
    plain = _webgpu_nodes(exported[1])
    assert plain["fusions"] == {} and "MatMulNBitsMlp" not in plain["nodes"][
        "WebGpuExecutionProvider"], plain
    ids = np.arange(5, 45, dtype=np.int64) * 97 % 4000
    monkeypatch.setattr("sinq_export.validate.core.validation_tokens",
                        lambda tok, n, text="wikipedia": ids[:n])
    # at accuracy level 0 (gate and up stay at one level, so the fusion still applies): the
    # random model's near-tied logits flip top-1 under int8 activations on every runtime
    code = main(["validate", str(tmp_path / "web"), "--providers", "web-webgpu", "--tokens", "12",
                 "--decode-steps", "1", "--accuracy-level", "0", "--json", "-"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["providers"][0]["status"] == "passed", report


def test_validate_reports_the_js_runtimes(exported, capsys, monkeypatch):
    _need("node")
    _need("wasm")
    ids = np.arange(5, 45, dtype=np.int64) * 97 % 4000
    monkeypatch.setattr("sinq_export.validate.core.validation_tokens",
                        lambda tok, n, text="wikipedia": ids[:n])
    code = main(["validate", str(exported[1]), "--providers", "cpu,node,wasm", "--tokens", "24",
                 "--decode-steps", "3", "--json", "-"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    by = {p["provider"]: p for p in report["providers"]}
    assert [by[n]["status"] for n in ("cpu", "node", "wasm")] == ["passed"] * 3
    assert by["node"]["runtime"].startswith("onnxruntime-node 1.30")
    assert "WASM, 1 thread" in by["wasm"]["runtime"]
    assert by["wasm"]["end_to_end"]["rel"] <= by["wasm"]["tolerance"]["logits_rel"]


def test_a_corrupted_weight_fails_the_js_runtime_too(exported, tmp_path, capsys, monkeypatch):
    """The reference is rebuilt from the ONNX tensors, so the damage is in both runs: the
    weights-vs-source check fails it, naming the layer."""
    _need("node")
    folder = tmp_path / "copy"
    shutil.copytree(exported[1], folder)
    layer = "model.layers.1.mlp.up_proj"
    flip_packed_byte(folder, layer)
    ids = np.arange(5, 45, dtype=np.int64) * 97 % 4000
    monkeypatch.setattr("sinq_export.validate.core.validation_tokens",
                        lambda tok, n, text="wikipedia": ids[:n])
    code = main(["validate", str(folder), "--providers", "node", "--tokens", "16",
                 "--decode-steps", "1"])
    out = capsys.readouterr().out
    assert code == 1 and f"first diverging layer: {layer}" in out and "result: FAILED" in out


def test_a_runtime_not_installed_is_skipped_with_its_fix(exported, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SINQ_JS_DIR", str(tmp_path / "no-js"))
    ids = np.arange(5, 45, dtype=np.int64) * 97 % 4000
    monkeypatch.setattr("sinq_export.validate.core.validation_tokens",
                        lambda tok, n, text="wikipedia": ids[:n])
    code = main(["validate", str(exported[1]), "--providers", "cpu,node,web-webgpu", "--tokens",
                 "16", "--decode-steps", "1"])
    out = capsys.readouterr().out
    assert code == 0  # cpu passed; the others are skipped, never passed
    for name in ("node", "web-webgpu"):
        line = next(ln for ln in out.splitlines() if ln.startswith(f"== {name} "))
        assert ": SKIPPED - " in line and "npm ci --ignore-scripts" in line, line


@pytest.mark.parametrize("absent", ["node", "chromium"])
def test_node_or_chromium_missing_is_one_line_with_the_fix(exported, tmp_path, capsys,
                                                           monkeypatch, absent):
    if absent == "node":
        monkeypatch.setenv("PATH", str(tmp_path))  # no `node` on it
        names, fix = ("node", "wasm"), "apt-get install -y nodejs npm"
    else:
        monkeypatch.delenv("SINQ_CHROMIUM", raising=False)
        monkeypatch.setattr(js, "CHROMIUM_CANDIDATES", ())
        names, fix = ("wasm", "web-webgpu"), "apt-get install -y chromium"
    ids = np.arange(5, 45, dtype=np.int64) * 97 % 4000
    monkeypatch.setattr("sinq_export.validate.core.validation_tokens",
                        lambda tok, n, text="wikipedia": ids[:n])
    code = main(["validate", str(exported[1]), "--providers", ",".join(("cpu", *names)),
                 "--tokens", "16", "--decode-steps", "1"])
    out = capsys.readouterr().out
    assert code == 0  # cpu passed; the missing runtimes are skipped, never passed
    for name in names:
        lines = [ln for ln in out.splitlines() if ln.startswith(f"== {name} ")]
        assert len(lines) == 1 and ": SKIPPED - " in lines[0] and fix in lines[0], lines


@pytest.mark.parametrize("runtime", ["node", "wasm", "web-webgpu"])
def test_a_missing_data_file_names_the_runtime(exported, tmp_path, capsys, runtime):
    folder = tmp_path / "no-data"
    shutil.copytree(exported[1], folder)
    data = folder / "onnx" / "model.onnx_data"
    data.unlink()
    model = onnx.load(str(folder / MODEL_FILE), load_external_data=False)
    with pytest.raises(ValidationError) as info:
        js.run_js(runtime, model, folder / MODEL_FILE, PREFILL, 1)
    assert str(info.value) == f"{js.RUNTIME_NAMES[runtime]} cannot run the export: {data} is missing"
    # validate refuses the folder before any runtime runs: one line, exit 2
    code = main(["validate", str(folder), "--providers", runtime, "--tokens", "16"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1 and "model.onnx_data" in err[0] and "missing" in err[0]


def test_custom_op_exports_are_refused_up_front(exported, tmp_path, capsys):
    folder = tmp_path / "custom"
    shutil.copytree(exported[1], folder)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["onnx"]["custom_domains"] = ["com.microsoft", "sinq.ops"]
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    code = main(["validate", str(folder), "--providers", "cpu,wasm", "--tokens", "16"])
    _, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1
    assert "wasm cannot run this export" in lines[0] and "sinq.ops" in lines[0]


def test_unknown_provider_lists_the_js_names(capsys, exported):
    code = main(["validate", str(exported[1]), "--providers", "browser"])
    err = capsys.readouterr().err
    assert code == 2 and "node, wasm, web-webgpu" in err


def test_browser_sample_streams_the_python_greedy_text(exported):
    """samples/web/ driven headless (WASM) writes the text samples/ort_generate.py writes."""
    _need("wasm")
    prompt, new = "The capital of France is", 12
    sample = Path(__file__).resolve().parents[1] / "samples" / "ort_generate.py"
    proc = subprocess.run([sys.executable, str(sample), str(exported[1]), "--prompt", prompt,
                           "--max-new-tokens", str(new), "--json"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    python = json.loads(proc.stdout.strip().splitlines()[-1])
    web = _run_page(exported[1], "samples/web/",
                    {"autorun": 1, "model": "export", "backend": "wasm", "prompt": prompt,
                     "tokens": new})
    assert web["prompt_ids"] == python["prompt_ids"]
    assert web["ids"] == python["tokens"] and web["text"] == python["text"]
    assert web["backend"] == "wasm" and web["decode_tokens_per_s"] > 0
