"""Helpers the test modules share that are not model factories (those are in ``_models.py``):
the decoder route's prompt and its onnxruntime / onnxruntime-genai greedy loops, the fault
harness (CLI subprocesses, stderr lines, tree digests), damaging an export on purpose, and the
suite's outlier weight.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from sinq_export.cli import main
from sinq_export.contract import MANIFEST_FILE, MODEL_FILE, MODEL_NAME

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------- the decoder route's greedy loops

STEPS = 16
PROMPT = np.array([5, 17, 99, 3, 42, 250, 7, 18, 64, 1, 2, 77], dtype=np.int64)


def cpu_session(out: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(out / MODEL_FILE), providers=["CPUExecutionProvider"])


def eos_ids(out: Path) -> list[int]:
    """The token ids genai's loop stops at (``model.eos_token_id`` of genai_config.json)."""
    eos = json.loads((out / "genai_config.json").read_text())["model"]["eos_token_id"]
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


def genai_greedy(out: Path, prompt: np.ndarray, steps: int) -> list[int]:
    """genai's greedy loop for ``steps`` tokens. genai stops at EOS: a random test model may
    well pick it, so EOS is suppressed (``min_length`` = ``max_length``) and the loop always
    runs every step; compare it with `greedy_without_eos`, which suppresses it the same way."""
    import onnxruntime_genai as og

    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    length = len(prompt) + steps
    params.set_search_options(max_length=length, min_length=length, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt.tolist())
    tokens = []
    while not gen.is_done() and len(tokens) < steps:
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    return tokens


def greedy_without_eos(model: torch.nn.Module, prompt: np.ndarray, steps: int, out: Path
                       ) -> list[int]:
    """Torch's greedy continuation with the export's EOS ids never picked (what `genai_greedy`
    computes): the full sequence is recomputed each step, no cache, so it shares no code
    with the runners under test."""
    banned = eos_ids(out)
    ids = torch.as_tensor(np.asarray(prompt, dtype=np.int64))[None, :]
    tokens = []
    with torch.inference_mode():
        for _ in range(steps):
            logits = model(input_ids=ids, use_cache=False).logits[0, -1].float()
            logits[banned] = -torch.inf
            tokens.append(int(logits.argmax()))
            ids = torch.cat([ids, torch.tensor([[tokens[-1]]])], dim=1)
    return tokens


# ------------------------------------------------------------------------- the fault harness

QUANT_FLAGS = ["--group-size", "16", "--json"]  # --json: no progress bars on stderr
PARTIAL = re.compile(r"^\.(.+)\.(tmp|old|scratch)-")


def tree_digest(root: Path) -> dict[str, str]:
    """Every entry under ``root`` -> sha256 of its bytes (``dir`` for folders)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def partials(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if PARTIAL.match(p.name))


def error_lines(stderr: str) -> list[str]:
    """stderr lines without progress bars (tqdm redraws with \\r and ANSI moves) and blanks."""
    stderr = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", stderr)
    lines = [seg.strip() for line in stderr.splitlines() for seg in line.split("\r")]
    return [ln for ln in lines if ln and not re.search(r"\d+%\|", ln)]


def assert_one_error_line(stderr: str, *needles: str) -> str:
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr, stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(argv)
    return rc, capsys.readouterr().err


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["HF_HUB_OFFLINE"] = "1"
    return env


def cli_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "sinq_export.cli", *args]


# ------------------------------------------------------------------- damaging an export


def corrupt_copy(src: Path, dst: Path, layer: str, what: str = "byte") -> Path:
    """Copy an export folder and corrupt one packed byte (``byte``) or one group scale
    (``scale``, x8) of ``layer``'s quantized node, in place in the copy's data file."""
    from onnx import helper, numpy_helper

    from sinq_export.validate.rebuild import layer_node_name

    shutil.copytree(src, dst)
    meta = json.loads((dst / MANIFEST_FILE).read_text())
    graph_file = dst / (meta.get("onnx") or {}).get("file", MODEL_NAME)
    model = onnx.load(str(graph_file), load_external_data=False)
    node = next(n for n in model.graph.node if n.name == layer_node_name(meta["layers"][layer]))
    target = node.input[1] if what == "byte" else node.input[2]
    index, tensor = next((i, t) for i, t in enumerate(model.graph.initializer) if t.name == target)
    info = {e.key: e.value for e in tensor.external_data}
    if not info:  # inline initializer (small module exports): rewrite the graph file
        arr = numpy_helper.to_array(tensor).copy()
        _corrupt(arr.reshape(-1), what)
        model.graph.initializer[index].CopyFrom(numpy_helper.from_array(arr, target))
        onnx.save(model, str(graph_file))
        return dst
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    offset = int(info.get("offset", 0)) + (int(info["length"]) // 3) // itemsize * itemsize
    with open(graph_file.parent / info["location"], "r+b") as fh:
        fh.seek(offset)
        value = np.frombuffer(fh.read(itemsize), dtype=helper.tensor_dtype_to_np_dtype(
            tensor.data_type)).copy()
        _corrupt(value, what)
        fh.seek(offset)
        fh.write(value.tobytes())
    return dst


def _corrupt(flat: np.ndarray, what: str) -> None:
    i = flat.size // 3
    if what == "byte":
        flat[i] ^= 0xFF  # every code of that byte changes
    else:
        flat[i] *= 8.0


def flip_packed_byte(folder: Path, layer: str) -> None:
    """Flip one byte of ``layer``'s packed codes inside its data file (in place)."""
    meta = json.loads((folder / MANIFEST_FILE).read_text())
    name = meta["layers"][layer]["initializers"]["packed"]
    model = onnx.load(str(folder / MODEL_FILE), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.name == name)
    info = {e.key: e.value for e in tensor.external_data}
    offset = int(info["offset"]) + int(info["length"]) // 3
    with open((folder / MODEL_FILE).parent / info["location"], "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ 0xFF]))


# --------------------------------------------------------------------------------- weights


def outlier_matrix(n: int = 256, k: int = 512, seed: int = 0) -> torch.Tensor:
    """A weight with heavy rows and columns, like real LLM layers."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w *= torch.exp(torch.randn(n, 1, generator=g) * 0.6)
    w *= torch.exp(torch.randn(1, k, generator=g) * 0.6)
    return w
