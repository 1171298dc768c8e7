"""Checkpoint: tensors read back exactly, one at a time; every damaged folder names file+tensor."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from sinq_export.checkpoint import INDEX_FILE, SINGLE_FILE, Checkpoint
from sinq_export.models import ModelLoadError

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def write_folder(folder, shards: list[dict[str, torch.Tensor]], config=LLAMA, index=None):
    """A model folder: one ``model.safetensors`` or ``model-0000k-of-000n.safetensors`` + index."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if len(shards) == 1 and index is None:
        save_file(shards[0], str(folder / SINGLE_FILE))
        return folder
    weight_map = {}
    for k, tensors in enumerate(shards, 1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(folder / name))
        weight_map.update({t: name for t in tensors})
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": index or weight_map}))
    return folder


tensor_strategy = st.tuples(
    st.sampled_from(DTYPES),
    st.lists(st.integers(1, 5), min_size=1, max_size=3),
    st.integers(0, 2**31 - 1),
)


@settings(max_examples=25, deadline=None)
@given(specs=st.lists(tensor_strategy, min_size=1, max_size=6), n_shards=st.integers(1, 3))
def test_round_trip_any_dtype_and_sharding(tmp_path_factory, specs, n_shards):
    folder = tmp_path_factory.mktemp("ckpt")
    tensors = {}
    for i, (dtype, shape, seed) in enumerate(specs):
        gen = torch.Generator().manual_seed(seed)
        tensors[f"model.t{i}.weight"] = torch.randn(shape, generator=gen).to(dtype)
    names = sorted(tensors)
    shards = [{n: tensors[n] for n in names[k::n_shards]} for k in range(n_shards)]
    write_folder(folder, [s for s in shards if s])
    ckpt = Checkpoint.open(folder)
    assert ckpt.names() == names
    assert ckpt.config == LLAMA
    for name, ref in tensors.items():
        assert name in ckpt
        assert ckpt.shape(name) == tuple(ref.shape)
        assert ckpt.dtype(name) == {torch.float32: "F32", torch.float16: "F16"}.get(
            ref.dtype, "BF16"
        )
        assert ckpt.nbytes(name) == ref.numel() * ref.element_size()
        assert torch.equal(ckpt.load(name, dtype=None), ref)
        assert torch.equal(ckpt.load(name), ref.float())
    assert "model.absent" not in ckpt
    assert ckpt.total_nbytes() == sum(t.numel() * t.element_size() for t in tensors.values())


@settings(max_examples=25, deadline=None)
@given(dtype=st.sampled_from(DTYPES), rows=st.integers(1, 40),
       picked=st.lists(st.integers(0, 39), min_size=0, max_size=12), seed=st.integers(0, 2**16))
def test_rows_are_the_loaded_tables_rows(tmp_path_factory, dtype, rows, picked, seed):
    """Any sorted set of rows (runs and single ids) equals indexing the whole tensor."""
    table = torch.randn(rows, 6, generator=torch.Generator().manual_seed(seed)).to(dtype)
    folder = write_folder(tmp_path_factory.mktemp("rows"), [{"t": table}])
    index = torch.tensor(sorted({i % rows for i in picked}), dtype=torch.long)
    got = Checkpoint.open(folder).rows("t", index)
    assert got.dtype == torch.float32 and torch.equal(got, table.float()[index])


def test_rows_refuse_a_non_finite_row_they_read(tmp_path):
    table = torch.zeros(5, 3)
    table[3, 1] = float("nan")
    ckpt = Checkpoint.open(write_folder(tmp_path, [{"t": table}]))
    assert torch.equal(ckpt.rows("t", torch.tensor([0, 1, 4])), torch.zeros(3, 3))
    with pytest.raises(ModelLoadError, match="'t' contains NaN"):
        ckpt.rows("t", torch.tensor([2, 3]))


def test_finite_values_whose_sum_overflows_are_finite(tmp_path):
    """The finite check sums first: a sum that overflows is re-checked value by value."""
    folder = write_folder(tmp_path, [{"big": torch.full((4,), 3e38)}])
    assert torch.equal(Checkpoint.open(folder).load("big"), torch.full((4,), 3e38))


def test_load_reads_only_its_own_tensor(tmp_path):
    """Corrupting one tensor's bytes (to NaN) breaks that tensor only: others stay readable."""
    folder = write_folder(tmp_path, [{"a": torch.ones(4), "b": torch.ones(4)}])
    ckpt = Checkpoint.open(folder)
    path = folder / SINGLE_FILE
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    start = 8 + n + json.loads(data[8 : 8 + n])["b"]["data_offsets"][0]
    data[start : start + 4] = torch.tensor([float("nan")]).numpy().tobytes()
    path.write_bytes(bytes(data))
    assert torch.equal(ckpt.load("a"), torch.ones(4))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: tensor 'b' contains NaN"):
        ckpt.load("b")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize(
    "name", ["model.embed_tokens.weight", "model.norm.weight", "model.layers.0.self_attn.q_proj.bias"]
)
def test_non_finite_anywhere_is_refused(tmp_path, name, value):
    bad = torch.zeros(3, 4, dtype=torch.bfloat16)
    bad[1, 2] = value
    folder = write_folder(tmp_path, [{name: bad, "ok": torch.zeros(2)}])
    ckpt = Checkpoint.open(folder)
    with pytest.raises(ModelLoadError) as info:
        ckpt.load(name)
    message = str(info.value)
    assert "\n" not in message and SINGLE_FILE in message and name in message


def test_overflow_on_conversion_is_refused(tmp_path):
    folder = write_folder(tmp_path, [{"big": torch.full((2,), 1e30)}])
    with pytest.raises(ModelLoadError, match="'big'.*overflows torch.float16"):
        Checkpoint.open(folder).load("big", dtype=torch.float16)


def test_model_type_disagreeing_with_architectures(tmp_path):
    folder = write_folder(tmp_path, [{"a": torch.ones(1)}], config={**LLAMA, "model_type": "gpt2"})
    with pytest.raises(ModelLoadError, match="model_type 'gpt2' disagrees.*'llama'"):
        Checkpoint.open(folder)


def test_missing_model_type(tmp_path):
    folder = write_folder(tmp_path, [{"a": torch.ones(1)}], config={"architectures": ["LlamaForCausalLM"]})
    with pytest.raises(ModelLoadError, match="model_type"):
        Checkpoint.open(folder)


def test_index_names_missing_shard(tmp_path):
    folder = write_folder(tmp_path, [{"a": torch.ones(1)}, {"b": torch.ones(1)}])
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"model-00002-of-00002\.safetensors: shard named.*'b'"):
        Checkpoint.open(folder)


def test_index_names_tensor_the_shard_lacks(tmp_path):
    index = {"a": "model-00001-of-00002.safetensors", "ghost": "model-00002-of-00002.safetensors"}
    folder = write_folder(tmp_path, [{"a": torch.ones(1)}, {"b": torch.ones(1)}], index=index)
    with pytest.raises(ModelLoadError, match="tensor 'ghost' named in"):
        Checkpoint.open(folder)


def test_corrupt_index(tmp_path):
    folder = write_folder(tmp_path, [{"a": torch.ones(1)}, {"b": torch.ones(1)}])
    (folder / INDEX_FILE).write_text("{")
    with pytest.raises(ModelLoadError, match="cannot parse the shard index"):
        Checkpoint.open(folder)


@pytest.mark.parametrize("cut", [1, 100, 10_000])
def test_truncated_shard_names_file_and_tensor(tmp_path, cut):
    folder = write_folder(
        tmp_path, [{"first": torch.ones(10), "last": torch.ones(4000)}, {"other": torch.ones(1)}]
    )
    path = folder / "model-00001-of-00002.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: max(len(data) - cut, 3)])
    with pytest.raises(ModelLoadError, match="truncated") as info:
        Checkpoint.open(folder)
    assert str(path) in str(info.value)
    if cut < 10_000:
        assert "'last'" in str(info.value)


def test_unsupported_dtype(tmp_path):
    folder = write_folder(tmp_path, [{"w": torch.ones(2, dtype=torch.int8), "a": torch.ones(1)}])
    with pytest.raises(ModelLoadError, match="tensor 'w' has unsupported dtype I8"):
        Checkpoint.open(folder)


def test_no_weights_and_no_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    with pytest.raises(ModelLoadError, match="neither model.safetensors"):
        Checkpoint.open(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="no config.json"):
        Checkpoint.open(tmp_path)
    with pytest.raises(ModelLoadError, match="does not exist"):
        Checkpoint.open(tmp_path / "sub")


def test_unknown_tensor(tmp_path):
    ckpt = Checkpoint.open(write_folder(tmp_path, [{"a": torch.ones(1)}]))
    with pytest.raises(ModelLoadError, match="no tensor 'b'"):
        ckpt.load("b")
