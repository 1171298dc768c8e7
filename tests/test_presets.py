"""Presets: the product's settings live in the library, and the CLI only maps flags onto them.

`export_causal_lm(src, out)` with no configs and `sinq-export model src -o out` must write the
very same folder (every file's bytes), so a benchmark or a Python user that calls the library
gets what users of the command get.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from _models import FAMILIES, make_family_dir, tiny_tokenizer

from sinq_export.cli import build_parser, main, preset_from_args
from sinq_export.config import ConfigError, GraphConfig, SinqConfig
from sinq_export.contract import MODEL_FILE
from sinq_export.export import export_causal_lm
from sinq_export.presets import DEFAULT_PRESET, PRESETS, get_preset


@pytest.fixture
def llama128(monkeypatch):
    """The tiny Llama family (tied head; its tokenizer loads) at widths every preset's groups
    (32 and 64 wide) divide."""
    monkeypatch.setitem(FAMILIES, "llama128", {**FAMILIES["llama"], "hidden_size": 128,
                                               "num_attention_heads": 4})
    return "llama128"


def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("tokenizer", [True, False])
def test_library_default_writes_what_the_cli_writes(tmp_path, capsys, llama128, tokenizer):
    """Byte for byte, manifest included; with a tokenizer the head is calibrated on text,
    without one the preset's fallback (an 8-bit head, one warning) is the library's too."""
    make_family_dir(tmp_path / "hf", llama128)
    if tokenizer:
        tiny_tokenizer().save_pretrained(tmp_path / "hf")
    result = export_causal_lm(tmp_path / "hf", tmp_path / "lib", progress=False)
    assert main(["model", str(tmp_path / "hf"), "-o", str(tmp_path / "cli"), "--json"]) == 0
    lib, cli = _files(tmp_path / "lib"), _files(tmp_path / "cli")
    assert sorted(lib) == sorted(cli)
    assert [name for name in lib if lib[name] != cli[name]] == []
    head = result.manifest["layers"]["lm_head"]
    assert (head["bits"], head["group_size"]) == ((4, 32) if tokenizer else (8, 32))
    # without a tokenizer the table follows the 8-bit head, so a tied model ships one table
    assert result.manifest["graph"]["embedding_bits"] == (4 if tokenizer else 8)
    assert result.manifest["graph"]["accuracy_level"] == "auto"
    assert result.manifest["accuracy"]["mode"] == "auto"
    stays_8bit = [w for w in result.warnings if "lm_head stays 8-bit" in w]
    assert len(stays_8bit) == (0 if tokenizer else 1)
    assert ("lm_head stays 8-bit" in capsys.readouterr().err) is not tokenizer


@pytest.mark.parametrize("name", sorted(set(PRESETS) - {"web"}))
def test_each_preset_builds_what_it_says(name):
    config, graph, warnings = get_preset(name).configs()
    assert warnings == []
    assert isinstance(config, SinqConfig) and isinstance(graph, GraphConfig)
    assert (config.bits, config.lm_head_bits) == (4, 4)
    assert config.group_size == (64 if name == "small" else 32)
    assert graph.embedding_bits == 4
    assert graph.accuracy_level == (0 if name == "exact" else "auto")
    assert config.calibrate is (name == "calibrated")
    # a calibrated decoder gives each linear its own t; calibration-free, gate/up share one
    assert config.shared_col_scale == ("none" if name == "calibrated" else "mlp")
    assert (config.lm_head_group_size, config.calibrate_head) == (32, True)


def test_the_web_preset_is_the_default_with_what_onnxruntime_web_fuses(tmp_path, llama128):
    """Symmetric 4-bit g32 without zero points, one t per block input: every decoder
    MatMulNBits reads a norm (or GQA) directly, q/k/v are one packed node (GQA's key and value
    inputs empty), which is what onnxruntime-web's WebGPU fusions match (docs/runtimes.md)."""
    import onnx

    config, graph, _ = get_preset("web").configs()
    base, base_graph, _ = get_preset(DEFAULT_PRESET).configs()
    assert graph == replace(base_graph, embedding_bits=8, table_ops="standard")
    assert {k: v for k, v in config.to_dict().items() if base.to_dict()[k] != v} == {
        "symmetric": True, "shared_col_scale": "all"}
    make_family_dir(tmp_path / "hf", llama128)
    tiny_tokenizer().save_pretrained(tmp_path / "hf")
    result = export_causal_lm(tmp_path / "hf", tmp_path / "out", preset="web", progress=False)
    assert result.manifest["config"]["o_proj_tie"] == [2, 2]
    model = onnx.load(str(tmp_path / "out" / MODEL_FILE), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    linears = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    attention = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    # per layer: packed q/k/v, o_proj, gate, up, down; and the head
    assert len(linears) == 5 * len(attention) + 1
    for node in linears:
        attrs = {a.name: a.i for a in node.attribute}
        assert len(node.input) == 3 and (attrs["bits"], attrs["block_size"]) == (4, 32), node.name
        source = producer[node.input[0]]
        assert not (source.op_type == "Mul" and weights & set(source.input)), node.name
    norms = [n for n in linears if "Normalization" in producer[n.input[0]].op_type]
    assert len(norms) == 3 * len(attention) + 1  # q/k/v, gate and up of each layer; the head
    for node in attention:
        assert list(node.input[1:3]) == ["", ""], node.name  # packed q/k/v


def _configs(argv: list[str]):
    return preset_from_args(build_parser().parse_args(["model", "-o", "x", *argv])).configs()


def _fields(config: SinqConfig, graph: GraphConfig) -> dict:
    return {**config.to_dict(), **graph.to_dict()}


@pytest.mark.parametrize(("argv", "changes"), [
    (["--preset", "small", "--embedding-bits", "8"], {"embedding_bits": 8}),
    (["--table-ops", "standard"], {"table_ops": "standard"}),
    (["--preset", "web", "--table-ops", "contrib"], {"table_ops": "contrib"}),
    (["--preset", "small", "--group-size", "32"], {"group_size": 32}),
    (["--preset", "exact", "--accuracy-level", "4"], {"accuracy_level": 4}),
    (["--preset", "exact", "--accuracy-level", "auto"], {"accuracy_level": "auto"}),
    (["--accuracy-level", "4"], {"accuracy_level": 4}),
    (["--preset", "calibrated", "--shared-col-scale", "mlp"], {"shared_col_scale": "mlp"}),
    (["--preset", "calibrated", "--bits", "3"], {"bits": 3}),
    # an 8-bit head is neither calibrated nor in finer groups (the preset's rule)
    (["--preset", "small", "--lm-head-bits", "8"],
     {"lm_head_bits": 8, "lm_head_group_size": None, "calibrate_head": False}),
    (["--group-size", "128"], {"group_size": 128}),
])
def test_a_flag_overrides_the_preset_field_it_names(argv, changes):
    """The flag's field changes (and what the preset derives from it); nothing else does."""
    config, graph, _ = _configs(argv)
    name = argv[1] if argv[0] == "--preset" else DEFAULT_PRESET
    base_config, base_graph, _ = get_preset(name).configs()
    got, base = _fields(config, graph), _fields(base_config, base_graph)
    assert {k: v for k, v in got.items() if base[k] != v} == changes


def test_no_flag_is_the_preset_itself():
    for name, preset in PRESETS.items():
        assert _configs(["--preset", name])[:2] == preset.configs()[:2]


def test_help_gives_each_preset_one_line(capsys):
    with pytest.raises(SystemExit):
        main(["model", "--help"])
    out = capsys.readouterr().out
    for name, preset in PRESETS.items():
        assert f"  {name} " in out and preset.summary in out


def test_a_preset_and_configs_together_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="preset or configs"):
        export_causal_lm(tmp_path / "hf", tmp_path / "out", SinqConfig(), preset="small")
    with pytest.raises(ConfigError, match="not one of"):
        get_preset("tiny")
