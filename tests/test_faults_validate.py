"""Fault cases owned by `validate`: a damaged or incomplete export folder must never pass.

One tiny export (CLI defaults: t folded into norms and into up_proj's rows, a quantized
embedding table) is made once; each case damages a copy of it in place, runs `validate`
in-process and restores the bytes, so every case sees the same export.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from _helpers import QUANT_FLAGS, error_lines, tree_digest
from _models import write_tiny_llama

from sinq_export.cli import main
from sinq_export.contract import CUSTOM_OP_LIBRARY, MANIFEST_FILE, MODEL_FILE, data_file_names
from sinq_export.io import read_json
from sinq_export.outcome import EXIT_FAILED, EXIT_OK
from sinq_export.validate.providers import WEIGHT_STEP_LIMIT

DATA_FILE = str(Path(MODEL_FILE).parent / data_file_names(Path(MODEL_FILE).name, 1)[0])

VALIDATE = ["--tokens", "24", "--decode-steps", "2"]


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults-validate")
    src = write_tiny_llama(root / "tiny-llama")
    out = root / "out"
    assert main(["model", str(src), "-o", str(out), "--embedding-bits", "4", *QUANT_FLAGS]) == 0
    return out


@pytest.fixture
def damaged(export, tmp_path) -> Path:
    """A private copy of the export (its source folder stays where the manifest says)."""
    out = tmp_path / "out"
    shutil.copytree(export, out)
    return out


def _patch(out: Path, tensor: str, damage) -> None:
    """Rewrite the middle element of ``tensor`` with ``damage(element)``, in place: in the
    data file for an external initializer, in the graph file for an inline one."""
    graph = out / MODEL_FILE
    model = onnx.load(str(graph), load_external_data=False)
    proto = next(t for t in model.graph.initializer if t.name == tensor)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(proto.data_type)
    size = np.dtype(dtype).itemsize
    info = {e.key: e.value for e in proto.external_data}
    if "location" not in info:
        array = onnx.numpy_helper.to_array(proto).copy()
        flat = array.reshape(-1)
        flat[flat.size // 2] = damage(flat[flat.size // 2:flat.size // 2 + 1])[0]
        proto.CopyFrom(onnx.numpy_helper.from_array(array, tensor))
        graph.write_bytes(model.SerializeToString())
        return
    offset, length = int(info.get("offset", 0)), int(info["length"])
    at = offset + (length // size // 2) * size
    with open(graph.parent / info["location"], "r+b") as fh:
        fh.seek(at)
        value = np.frombuffer(fh.read(size), dtype=dtype).copy()
        fh.seek(at)
        fh.write(damage(value).tobytes())


def _times_64(value: np.ndarray) -> np.ndarray:
    return (value * 64).astype(value.dtype)


def _flip_byte(value: np.ndarray) -> np.ndarray:
    return value ^ np.uint8(0xFF)


def _validate(out: Path, capsys) -> tuple[int, str, str]:
    rc = main(["validate", str(out), *VALIDATE])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _layers(export: Path) -> dict[str, dict]:
    return read_json(export / MANIFEST_FILE)["layers"]


def test_the_undamaged_export_passes(export, capsys):
    rc, out, err = _validate(export, capsys)
    assert rc == EXIT_OK, out + err
    folded = {n for n, m in _layers(export).items()
              if m["folded_into"] or m["output_scaled_by"]}
    assert {"model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj"} <= folded


@pytest.mark.parametrize("damage", ["scale x64", "flipped weight byte"])
def test_any_damaged_layer_fails_and_is_named(export, damaged, damage, capsys, monkeypatch):
    """Every quantized layer, folded ones and the embedding table included: one group scale
    times 64, or one packed weight byte flipped, and `validate` exits 1 naming that layer."""
    import sinq_export.validate.core as core

    # the runtime-load check (a child process opening og.Model) is not what these damages
    # exercise and costs a second per run; the cases below cover it
    monkeypatch.setattr(core, "check_loadable", lambda info: None)
    layers = _layers(export)
    assert "model.embed_tokens" in layers
    before = tree_digest(damaged)
    role, change = ("scales", _times_64) if damage == "scale x64" else ("packed", _flip_byte)
    for name, meta in layers.items():
        if meta.get("shared_with"):
            continue  # a tied head reads the table's tensors: damaged through the table
        tensor = meta["initializers"][role]
        original = (damaged / DATA_FILE).read_bytes()
        _patch(damaged, tensor, change)
        try:
            rc, out, err = _validate(damaged, capsys)
        finally:
            (damaged / DATA_FILE).write_bytes(original)
        assert rc == EXIT_FAILED, (name, out)
        verdict = [ln for ln in out.splitlines() if "first diverging layer:" in ln
                   or ln.strip().startswith("FAIL: layer")]
        assert any(f" {name} " in f"{ln} " or f"layer {name}:" in ln for ln in verdict), (name, out)
        assert f"tensor {tensor} differs" in out, (name, out)
        assert err == "", err
    assert tree_digest(damaged) == before


def test_a_damaged_norm_weight_fails_and_is_named(damaged, capsys):
    _patch(damaged, "model.layers.1.input_layernorm.weight", _times_64)
    rc, out, err = _validate(damaged, capsys)
    assert rc == EXIT_FAILED and err == ""
    assert "FAIL: tensor model.layers.1.input_layernorm.weight differs" in out, out


def test_a_manifest_with_damaged_digests_is_bad_input(damaged, capsys):
    import json

    manifest = read_json(damaged / MANIFEST_FILE)
    manifest["tensor_sha256"] = ["not", "digests"]
    (damaged / MANIFEST_FILE).write_text(json.dumps(manifest))
    rc, out, err = _validate(damaged, capsys)
    assert rc == 2
    [line] = error_lines(err)
    assert "tensor_sha256 is not an object of hex digests" in line


# ------------------------------------------------------- the folder as the runtimes load it

def _genai_config(out: Path) -> dict:
    return read_json(out / "genai_config.json")


def _set_library(out: Path, name: str) -> None:
    import json

    config = _genai_config(out)
    config["model"]["decoder"]["session_options"]["custom_ops_library"] = name
    (out / "genai_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def custom_export(export, tmp_path_factory) -> Path:
    """The same tiny model on the sinq.ops runtime: genai loads the folder's library copy."""
    from sinq_export import runtime_ops

    runtime_ops.require("the custom-runtime fault cases")
    src = Path(read_json(export / MANIFEST_FILE)["source"]["path"])
    out = tmp_path_factory.mktemp("faults-validate-custom") / "out"
    assert main(["model", str(src), "-o", str(out), "--runtime", "custom", "--bits", "3",
                 *QUANT_FLAGS]) == 0  # 3-bit: stock MatMulNBits cannot run it
    assert _genai_config(out)["model"]["decoder"]["session_options"]["custom_ops_library"]
    return out


def _cases(export: Path, custom_export: Path, tmp_path: Path, case: str) -> tuple[Path, str]:
    """(a damaged copy, what the error line must name)."""
    base = custom_export if case.startswith("custom") else export
    out = tmp_path / "out"
    shutil.copytree(base, out)
    library = out / CUSTOM_OP_LIBRARY
    if case == "custom: library deleted":
        library.unlink()
        return out, f"{library}: missing (custom_ops_library of genai_config.json)"
    if case == "custom: library damaged":
        library.write_bytes(library.read_bytes()[:4096])
        return out, f"{library}: onnxruntime cannot load this custom-op library"
    if case == "custom: library outside the folder":
        _set_library(out, str(tmp_path / CUSTOM_OP_LIBRARY))
        return out, "is outside the export folder"
    if case == "stock: library named but missing":
        _set_library(out, CUSTOM_OP_LIBRARY)
        return out, f"{library}: missing (custom_ops_library of genai_config.json)"
    if case == "stock: decoder file renamed":
        config = _genai_config(out)
        config["model"]["decoder"]["filename"] = "decoder.onnx"
        import json

        (out / "genai_config.json").write_text(json.dumps(config))
        return out, f"{out / 'decoder.onnx'}: missing (model.decoder.filename of genai_config.json)"
    if case == "stock: genai_config.json deleted":
        (out / "genai_config.json").unlink()
        return out, "genai_config.json is missing: onnxruntime-genai cannot load the export"
    raise AssertionError(case)


LOAD_CASES = ["custom: library deleted", "custom: library damaged",
              "custom: library outside the folder", "stock: library named but missing",
              "stock: decoder file renamed", "stock: genai_config.json deleted"]


@pytest.mark.parametrize("command", ["validate", "eval"])
@pytest.mark.parametrize("case", LOAD_CASES)
def test_a_folder_the_runtimes_cannot_load_is_refused(export, custom_export, tmp_path, capsys,
                                                      case, command):
    """genai_config.json and every file it names are checked the way onnxruntime-genai loads
    them (`og.Model` fails on each of these folders): exit 2, one line, nothing written."""
    out, needle = _cases(export, custom_export, tmp_path, case)
    before = tree_digest(tmp_path)
    args = VALIDATE if command == "validate" else ["--windows", "1", "--length", "16"]
    rc = main([command, str(out), *args])
    captured = capsys.readouterr()
    assert rc == 2, captured.out + captured.err
    [line] = error_lines(captured.err)
    assert needle in line and "Traceback" not in captured.err, line
    assert tree_digest(tmp_path) == before


def test_the_custom_runtime_export_passes(custom_export, capsys):
    import onnxruntime_genai as og

    og.Model(str(custom_export))  # what the cases above break
    rc, out, err = _validate(custom_export, capsys)
    assert rc == EXIT_OK, out + err


# ------------------------------------------------------- a folder replaced while it is read

@pytest.mark.parametrize("command", ["validate", "eval"])
def test_a_folder_replaced_while_validating_is_reported(export, tmp_path, monkeypatch, capsys,
                                                        command):
    """Another run's --overwrite swaps OUT between two reads (the swap is made at a fixed
    point, right after the runtime check, by the real overwrite code): exit 2, one line
    saying the folder changed, the new export left intact."""
    import sinq_export.validate.core as core
    from sinq_export import SinqConfig
    from sinq_export.export import export_causal_lm

    out = tmp_path / "out"
    shutil.copytree(export, out)
    src = Path(read_json(export / MANIFEST_FILE)["source"]["path"])
    real_check = core.check_loadable
    swapped = []

    def check_then_swap(info):
        real_check(info)
        if not swapped:  # a different layout: the first read's offsets do not fit the new data
            export_causal_lm(src, out, SinqConfig(group_size=32, bits=3), overwrite=True,
                             progress=False)
            swapped.append(tree_digest(out))

    monkeypatch.setattr(core, "check_loadable", check_then_swap)
    args = VALIDATE if command == "validate" else ["--windows", "1", "--length", "16"]
    rc = main([command, str(out), *args])
    captured = capsys.readouterr()
    assert swapped and rc == 2, captured.out + captured.err
    [line] = error_lines(captured.err)
    assert f"{out} changed while it was being read" in line and "run again" in line, line
    assert tree_digest(out) == swapped[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ------------------------------------------- an exporter that writes a wrong folded layer

def _times_64_in_one_group(target: str):
    """A `weights._part_func` that writes ``target``'s scales with one group times 64 (an
    exporter bug: the sha256 recorded matches the wrong bytes, so only the source check can
    see it)."""
    from sinq_export.export import weights

    original = weights._part_func

    def part_func(cache, linear, part, binding, *args):
        func = original(cache, linear, part, binding, *args)
        if linear != target or part != "scales":
            return func

        def wrong() -> np.ndarray:
            scales = func().copy()
            scales[scales.shape[0] // 2, 0] *= 64
            return scales
        return wrong
    return part_func


@pytest.mark.parametrize("layer", ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.down_proj"])
def test_an_exporter_writing_a_wrong_folded_layer_fails_validate(export, layer, tmp_path,
                                                                  capsys, monkeypatch):
    """up_proj's rows carry down_proj's t and down_proj's carry none: `validate` undoes the
    fold with the export's folded t and checks both against the source weights."""
    from sinq_export.export import weights

    meta = _layers(export)[layer]
    assert meta["output_scaled_by"] or meta["folded_into"] in _layers(export), meta
    src = read_json(export / MANIFEST_FILE)["source"]["path"]
    monkeypatch.setattr(weights, "_part_func", _times_64_in_one_group(layer))
    out = tmp_path / "out"
    assert main(["model", src, "-o", str(out), "--embedding-bits", "4", *QUANT_FLAGS]) == 0
    monkeypatch.undo()
    capsys.readouterr()
    rc, text, err = _validate(out, capsys)
    assert rc == EXIT_FAILED, text
    assert "differs" not in text, text  # the recorded digests match: the source check caught it
    assert any(ln.strip().startswith("FAIL") and layer in ln or f"layer: {layer}" in ln
               for ln in text.splitlines()), text
    assert err == "", err


def test_the_source_check_covers_every_folded_layer(export, capsys, monkeypatch):
    """Every linear of the default export has a source distance: none is skipped for a fold
    (the quantized embedding table is no linear of the reference: its bytes are covered by
    the recorded digests)."""
    import sinq_export.validate.core as core

    seen = {}
    original = core.weight_steps

    def recording(*args, **kwargs):
        seen.update(original(*args, **kwargs))
        return seen
    monkeypatch.setattr(core, "weight_steps", recording)
    rc, text, _ = _validate(export, capsys)
    assert rc == EXIT_OK, text
    layers = _layers(export)
    checked = {n for n, m in layers.items()
               if not m.get("shared_with") and m["op"] != "GatherBlockQuantized"}
    assert any(layers[n]["output_scaled_by"] for n in checked)
    assert any(layers[n]["folded_into"] in layers for n in checked)
    assert {n for n in checked if seen.get(n) is None} == set(), seen
    assert all(seen[n] <= WEIGHT_STEP_LIMIT for n in checked), seen
