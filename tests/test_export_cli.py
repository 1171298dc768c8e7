"""`sinq-export model` bad input: clear errors, exit code 2, nothing written (no model loaded)."""

from __future__ import annotations

import json

import pytest

from sinq_export.cli import main
from sinq_export.outcome import EXIT_USAGE


def _run(args, capsys):
    rc = main(["model", *args])
    return rc, capsys.readouterr().err


def test_missing_model_folder(tmp_path, capsys):
    rc, err = _run([str(tmp_path / "nope"), "-o", str(tmp_path / "out")], capsys)
    assert rc == EXIT_USAGE and "does not exist" in err
    assert not (tmp_path / "out").exists()


def test_not_a_causal_lm(tmp_path, capsys):
    src = tmp_path / "bert"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["BertModel"],
                                                 "model_type": "bert"}))
    (src / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    rc, err = _run([str(src), "-o", str(tmp_path / "out")], capsys)
    assert rc == EXIT_USAGE and "model_type='bert'" in err and "supported: llama" in err


def test_pickle_only_weights_refused(tmp_path, capsys):
    src = tmp_path / "pickled"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (src / "pytorch_model.bin").write_bytes(b"not unpickled")
    rc, err = _run([str(src), "-o", str(tmp_path / "out")], capsys)
    assert rc == EXIT_USAGE and ("pickle" in err or "safetensors" in err)
    assert not (tmp_path / "out").exists()


def test_output_exists(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    rc, err = _run([str(tmp_path / "nope"), "-o", str(tmp_path / "out")], capsys)
    assert rc == EXIT_USAGE and "--overwrite" in err


def test_fused_needs_custom_runtime(tmp_path, capsys):
    rc, err = _run(["-o", str(tmp_path / "out"), "--col-scale", "fused"], capsys)
    assert rc == EXIT_USAGE and "runtime='custom'" in err


@pytest.mark.parametrize("flag", [["--bits", "9"], ["--accuracy-level", "7"], ["--dtype", "bf16"],
                                  ["--lm-head-bits", "9"], ["--embedding-bits", "3"]])
def test_bad_flag_values(tmp_path, flag):
    with pytest.raises(SystemExit) as exc:
        main(["model", "-o", str(tmp_path / "out"), *flag])
    assert exc.value.code == EXIT_USAGE


def _model_configs(argv: list[str]):
    """(SinqConfig, GraphConfig) that `sinq-export model -o x ARGV` exports with."""
    from sinq_export.cli import build_parser, preset_from_args

    config, graph, _ = preset_from_args(build_parser().parse_args(["model", "-o", "x", *argv])
                                        ).configs()
    return config, graph


def test_model_defaults_and_float_opt_out():
    """The measured defaults (g32 decoder, accuracy level per layer, a calibrated 4-bit g32
    head, 4-bit embedding) and 'float' to keep a tensor float."""
    cfg, graph = _model_configs([])
    assert (cfg.lm_head_bits, cfg.lm_head_group_size, cfg.calibrate_head) == (4, 32, True)
    assert (cfg.group_size, cfg.calibrate) == (32, False)
    assert (graph.embedding_bits, graph.accuracy_level) == (4, "auto")
    cfg, graph = _model_configs(["--lm-head-bits", "float", "--embedding-bits", "float",
                                 "--accuracy-level", "0"])
    assert (cfg.lm_head_bits, graph.embedding_bits, graph.accuracy_level) == (None, None, 0)


@pytest.mark.parametrize(("argv", "head"), [
    ([], (4, 32, True)),
    (["--lm-head-bits", "8"], (8, None, False)),  # an 8-bit head costs nothing: no calibration
    (["--lm-head-bits", "3"], (3, 32, True)),
    (["--no-calibrate-head"], (4, 32, False)),
    (["--lm-head-group-size", "64"], (4, 64, True)),
    (["--lm-head-bits", "float"], (None, None, False)),
])
def test_model_head_defaults_follow_its_width(argv, head):
    cfg, _ = _model_configs(argv)
    assert (cfg.lm_head_bits, cfg.lm_head_group_size, cfg.calibrate_head) == head


def test_calibrating_a_float_head_is_refused(capsys):
    from sinq_export.cli import main
    from sinq_export.outcome import EXIT_USAGE

    assert main(["model", "-o", "x", "--lm-head-bits", "float", "--calibrate-head"]) == EXIT_USAGE
    assert "calibrate_head needs a quantized lm_head" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "shared"), [
    ([], "mlp"),  # calibration-free: gate/up sharing one t measures lower perplexity
    (["--calibrate"], "none"),  # calibrated: a t per linear measures lower
    (["--calibrate", "--shared-col-scale", "mlp"], "mlp"),  # an explicit choice stands
    (["--shared-col-scale"], "all"),
])
def test_model_shared_col_scale_default_follows_calibration(argv, shared):
    assert _model_configs(argv)[0].shared_col_scale == shared
