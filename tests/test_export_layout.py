"""The causal-LM folder layout other runtimes rely on: ``onnx/model.onnx`` + its data files
(split below a size limit), the common symbolic dim names, genai_config / config.json naming
them; onnxruntime and onnxruntime-genai load a split folder and agree with an unsplit one."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from _models import qwen2_source
from hypothesis import given, settings
from hypothesis import strategies as st

from sinq_export.config import GraphConfig, SinqConfig
from sinq_export.contract import (
    DATA_FILE_LIMIT,
    MANIFEST_FILE,
    MODEL_FILE,
    TRANSFORMERS_JS_KEY,
    data_file_names,
)
from sinq_export.export import decoder
from sinq_export.validate.runners import run_ort_lm

COMMON_DIMS = {"batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"}


@given(sizes=st.lists(st.integers(1, 5000), max_size=40), limit=st.integers(1, 20000),
       pad=st.integers(0, 64))
@settings(deadline=None, max_examples=200)
def test_shards_keep_order_and_limit(sizes, limit, pad):
    counts = decoder.shard_tensors(sizes, limit, pad)
    assert sum(counts) == len(sizes) and all(c > 0 for c in counts)
    start = 0
    for count in counts:
        group = sizes[start:start + count]
        # over the limit only as a lone tensor that alone exceeds it
        assert sum(pad + s for s in group) <= limit or (count == 1 and pad + group[0] > limit)
        start += count


def test_data_file_names_are_transformers_js_chunks():
    assert data_file_names("model.onnx", 3) == ["model.onnx_data", "model.onnx_data_1",
                                                "model.onnx_data_2"]
    assert DATA_FILE_LIMIT < 2**31


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """One tiny export written whole and one split into data files of <= 4 MB (acc 0)."""
    from sinq_export.models import default_model_dir

    root = tmp_path_factory.mktemp("layout")
    src = qwen2_source(root / "src", default_model_dir())
    cfg, graph = SinqConfig(bits=4, group_size=16), GraphConfig(accuracy_level=0)
    decoder.export_causal_lm(src, root / "whole", cfg, graph, progress=False)
    limit = 4_000_000
    save = decoder._save
    mp = pytest.MonkeyPatch()
    mp.setattr(decoder, "_save", lambda model, path, stages: save(model, path, stages, limit))
    try:
        decoder.export_causal_lm(src, root / "split", cfg, graph, progress=False)
    finally:
        mp.undo()
    return root / "whole", root / "split", limit


def test_folder_layout_and_dim_names(exports):
    whole, _, _ = exports
    manifest = json.loads((whole / MANIFEST_FILE).read_text())["onnx"]
    assert manifest["file"] == MODEL_FILE == "onnx/model.onnx"
    assert manifest["data_files"] == ["onnx/model.onnx_data"]
    assert json.loads((whole / "genai_config.json").read_text())["model"]["decoder"][
        "filename"] == MODEL_FILE
    tjs = json.loads((whole / "config.json").read_text())[TRANSFORMERS_JS_KEY]
    assert tjs == {"dtype": "fp32", "use_external_data_format": {"model.onnx": 1}}
    model = onnx.load(str(whole / MODEL_FILE), load_external_data=False)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*model.graph.input, *model.graph.output]}
    assert dims["input_ids"] == ["batch_size", "sequence_length"]
    assert dims["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert dims["past_key_values.0.key"] == ["batch_size", 2, "past_sequence_length", 16]
    assert dims["present.1.value"] == ["batch_size", 2, "total_sequence_length", 16]
    named = {d.dim_param for v in [*model.graph.input, *model.graph.output, *model.graph.value_info]
             for d in v.type.tensor_type.shape.dim if d.dim_param}
    assert named <= COMMON_DIMS, named - COMMON_DIMS


def test_split_folder_runs_the_same(exports):
    whole, split, limit = exports
    files = json.loads((split / MANIFEST_FILE).read_text())["onnx"]["data_files"]
    assert len(files) > 1 and files == [f"onnx/{n}" for n in data_file_names("model.onnx",
                                                                              len(files))]
    model = onnx.load(str(split / MODEL_FILE), load_external_data=False)
    per_file = {}
    for t in model.graph.initializer:
        location = {e.key: e.value for e in t.external_data}.get("location")
        per_file[location] = per_file.get(location, 0) + 1
    for f in files:  # only a lone tensor larger than the limit passes it
        assert (split / f).stat().st_size <= limit or per_file[f.split("/")[1]] == 1, f
    assert sorted(p.name for p in (split / "onnx").iterdir()) == sorted(
        ["model.onnx", *(f.split("/")[1] for f in files)])
    assert json.loads((split / "config.json").read_text())[TRANSFORMERS_JS_KEY][
        "use_external_data_format"] == {"model.onnx": len(files)}
    import onnxruntime as ort

    ids = np.arange(3, 19, dtype=np.int64)
    a, b = (run_ort_lm(ort.InferenceSession(str(folder / MODEL_FILE)), ids, 3)
            for folder in (whole, split))
    np.testing.assert_array_equal(a.logits, b.logits)


def test_genai_runs_the_split_folder(exports):
    og = pytest.importorskip("onnxruntime_genai")
    whole, split, _ = exports

    def greedy(folder):
        model = og.Model(str(folder))
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=16, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens([[5, 17, 99, 4000]])
        while not gen.is_done():
            gen.generate_next_token()
        return list(gen.get_sequence(0))

    assert greedy(split) == greedy(whole)
