"""`validate` / `eval` on real exports of a tiny random model: the reference is rebuilt from the
source folder + the ONNX tensors; a damaged folder or a bad argument is one line + exit 2 (never
1, which means only "the numbers disagree"); a corrupted weight is exit 1 naming its layer."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from _helpers import flip_packed_byte
from _models import qwen2_source

from sinq_export import validate as V
from sinq_export.cli import main
from sinq_export.config import SinqConfig
from sinq_export.contract import MANIFEST_FILE, MODEL_FILE, REFERENCE_DIR

LAYERS = 2 * 7  # q k v o gate up down per layer


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(source folder, export folder) of a tiny bf16 Qwen2 (q/k/v bias), 4-bit SINQ g16."""
    from sinq_export.export import export_causal_lm
    from sinq_export.models import default_model_dir

    root = tmp_path_factory.mktemp("validate-export")
    src = qwen2_source(root / "src", default_model_dir())
    out = root / "out"
    export_causal_lm(src, out, SinqConfig(bits=4, group_size=16), progress=False)
    return src, out


@pytest.fixture()
def fixed_tokens(monkeypatch):
    """CLI runs feed a fixed sentence's tokens instead of the Wikipedia text (speed)."""
    ids = np.arange(5, 45, dtype=np.int64) * 97 % 4000
    monkeypatch.setattr(V.core, "validation_tokens", lambda tok, n, text="wikipedia": ids[:n])


def _copy(exported, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(exported[1], dst)
    return dst


def _run(capsys, *argv):
    code = main(list(map(str, argv)))
    out, err = capsys.readouterr()
    return code, out, err


def test_reference_rebuilt_from_the_source_passes(exported):
    src, out = exported
    assert not (out / REFERENCE_DIR).exists()  # no second copy of the weights by default
    r = V.validate(out, tokens=40, decode_steps=3, token_ids=np.arange(3, 43))
    assert r.mode == "reference" and r.passed, V.format_report(r)
    assert any(str(src) in n for n in r.notes)
    p = r.providers[0]
    assert len(p.layers) == LAYERS and all(la.local_rel < 1e-4 for la in p.layers)
    assert p.end_to_end.rel < 1e-4 and p.end_to_end.top1 == 1.0


def test_corrupted_weight_is_exit_1_naming_the_layer(exported, tmp_path, fixed_tokens, capsys):
    folder = _copy(exported, tmp_path)
    layer = "model.layers.1.mlp.up_proj"
    flip_packed_byte(folder, layer)
    code, out, _ = _run(capsys, "validate", folder, "--tokens", 32, "--decode-steps", 2)
    assert code == 1
    assert f"first diverging layer: {layer}" in out and "result: FAILED" in out


def _damage(folder, how):
    data = folder / (MODEL_FILE + "_data")
    if how == "truncated-onnx":
        (folder / MODEL_FILE).write_bytes((folder / MODEL_FILE).read_bytes()[:200])
    elif how == "truncated-data":
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    elif how == "deleted-data":
        data.unlink()
    elif how == "corrupt-manifest":
        (folder / MANIFEST_FILE).write_text('{"layers": ')
    elif how == "missing-source":
        meta = json.loads((folder / MANIFEST_FILE).read_text())
        meta["source"]["path"] = str(folder.parent / "moved-away")
        (folder / MANIFEST_FILE).write_text(json.dumps(meta))


DAMAGE = {
    "truncated-onnx": "cannot parse the ONNX model",
    "truncated-data": "external data is truncated",
    "deleted-data": "external data file is missing",
    "corrupt-manifest": "sinq_export.json: cannot parse",
    "missing-source": "moved-away recorded in sinq_export.json is missing",
}


@pytest.mark.parametrize("command", ["validate", "eval"])
@pytest.mark.parametrize("how", list(DAMAGE))
def test_damaged_folder_is_one_line_exit_2(exported, tmp_path, fixed_tokens, capsys, how, command):
    folder = _copy(exported, tmp_path)
    _damage(folder, how)
    argv = (["validate", folder, "--tokens", 32] if command == "validate" else
            ["eval", folder, "--windows", 1, "--length", 32, "--backend", "torch"])
    if command == "eval" and how in ("truncated-data", "deleted-data", "truncated-onnx"):
        argv = argv[:-2]  # the onnxruntime backend reads the ONNX files
    code, out, err = _run(capsys, *argv)
    assert code == 2, (out, err)
    assert "PASSED" not in out and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and DAMAGE[how] in lines[0], err


def test_source_option_finds_a_moved_source(exported, tmp_path, fixed_tokens, capsys):
    folder = _copy(exported, tmp_path)
    _damage(folder, "missing-source")
    moved = tmp_path / "moved-src"
    shutil.copytree(exported[0], moved)
    code, out, err = _run(capsys, "validate", folder, "--tokens", 32, "--decode-steps", 2,
                          "--source", moved)
    assert code == 0, err
    assert str(moved) in out and "result: PASSED" in out


@pytest.mark.parametrize("argv,message", [
    (["--text", "no-such-text", "--tokens", 32], "unknown text id"),
    (["--tokens", 300], "exceed the model's context of 256"),
])
def test_bad_arguments_exit_2(exported, capsys, argv, message):
    code, out, err = _run(capsys, "validate", exported[1], *argv)
    assert code == 2 and message in err and "PASSED" not in out


def test_json_folder_is_refused_before_work_and_json_precedes_the_verdict(
        exported, tmp_path, fixed_tokens, capsys):
    code, out, err = _run(capsys, "validate", exported[1], "--json", tmp_path)
    assert code == 2 and "is a folder" in err and out == ""
    report = tmp_path / "deep" / "report.json"
    code, out, err = _run(capsys, "validate", exported[1], "--tokens", 32, "--decode-steps", 2,
                          "--json", report)
    assert code == 0 and json.loads(report.read_text())["status"] == "passed"


def test_eval_length_beyond_context_and_torch_backend(exported, capsys):
    code, _, err = _run(capsys, "eval", exported[1], "--length", 1024, "--windows", 1)
    assert code == 2 and "exceeds the model's context of 256" in err
    code, out, err = _run(capsys, "eval", exported[1], "--length", 64, "--windows", 1,
                          "--backend", "torch", "--json")
    assert code == 0, err
    assert json.loads(out)["rows"][0]["backend"] == "torch"
