import pytest

from sinq_export.config import ConfigError, GraphConfig, SinqConfig


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 1}, "bits=1"),
        ({"bits": 9}, "bits=9"),
        ({"group_size": 48}, "power of two"),
        ({"group_size": 8}, "between 16 and 256"),
        ({"group_size": 512}, "between 16 and 256"),
        ({"method": "gptq"}, "method"),
        ({"exclude": ("(",)}, "invalid regular expression"),
        ({"overrides": {"down_proj": 11}}, "overrides"),
        ({"gptq_damp": 0}, "gptq_damp"),
        ({"gptq_damp": "high"}, "gptq_damp"),
        ({"calibration_dtype": "fp16"}, "calibration_dtype"),
        ({"method": "rtn", "sinkhorn_iters": 3}, "sinkhorn_iters=3 does not apply to method 'rtn'"),
        ({"method": "rtn", "kurtosis_gate": 5.0}, "kurtosis_gate=5.0 does not apply"),
        ({"method": "rtn", "o_proj_tie": (2, 2)}, "o_proj_tie=.* does not apply"),
    ],
)
def test_bad_values_name_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SinqConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"col_scale": "fused"}, "runtime='custom'"),
        ({"accuracy_level": 7}, "accuracy_level"),
        ({"runtime": "cuda"}, "runtime"),
        ({"dtype": "bf16"}, "dtype"),
        ({"embedding_bits": 3}, "embedding_bits"),
        ({"table_ops": "bitwise"}, "table_ops"),
    ],
)
def test_bad_graph_values_name_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        GraphConfig(**kwargs)


def test_graph_config_is_not_quantization():
    """The two configs do not share a field: each setting is validated in one place."""
    assert not set(GraphConfig.__dataclass_fields__) & set(SinqConfig.__dataclass_fields__)
    g = GraphConfig(runtime="custom", col_scale="fused", accuracy_level=4, embedding_bits=8)
    assert GraphConfig.from_dict(g.to_dict()) == g


def test_bits_for_include_exclude_overrides():
    cfg = SinqConfig(bits=4, overrides={r"down_proj$": 8})
    assert cfg.bits_for("model.layers.0.self_attn.q_proj") == 4
    assert cfg.bits_for("model.layers.0.mlp.down_proj") == 8
    assert cfg.bits_for("lm_head") is None
    assert SinqConfig(lm_head_bits=8).bits_for("lm_head") == 8
    assert SinqConfig(include=(r"mlp",)).bits_for("model.layers.0.self_attn.q_proj") is None


def test_dict_round_trip():
    cfg = SinqConfig(bits=3, overrides={"a": 8}, exclude=("x", "y"), kurtosis_gate=5.0)
    assert SinqConfig.from_dict(cfg.to_dict()) == cfg


def test_group_overrides_pick_a_layer_group_size():
    from sinq_export.config import ConfigError, SinqConfig

    cfg = SinqConfig(group_overrides=(("^a$", 128), ("a", 32)), lm_head_bits=4,
                     lm_head_group_size=16)
    assert [cfg.group_size_for(n) for n in ("a", "ba", "c", "lm_head")] == [128, 32, 64, 16]
    assert SinqConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.method_config("a", 5).group_size == 128
    with pytest.raises(ConfigError, match="group_overrides"):
        SinqConfig(group_overrides={"x": 48})
    with pytest.raises(ConfigError, match="group_overrides"):
        SinqConfig(group_overrides={"(": 64})


def test_gptq_damping_is_strong_for_decoder_linears_and_gptqs_own_for_the_head():
    from sinq_export.config import DECODER_GPTQ_DAMP, HEAD_GPTQ_DAMP

    cfg = SinqConfig(calibrate=True, lm_head_bits=4)
    assert cfg.method_config("model.layers.0.mlp.down_proj", 4).gptq_damp == DECODER_GPTQ_DAMP
    assert cfg.method_config("lm_head", 4).gptq_damp == HEAD_GPTQ_DAMP < DECODER_GPTQ_DAMP
    pinned = cfg.replace(gptq_damp=0.05)
    assert {pinned.method_config(n, 4).gptq_damp for n in ("lm_head", "model.layers.3.q_proj")} \
        == {0.05}
    assert SinqConfig.from_dict(pinned.to_dict()) == pinned


def test_a_method_keeps_the_knobs_it_has_at_their_defaults():
    rtn = SinqConfig(method="rtn", symmetric=True, energy_refit=0)  # common knobs apply
    assert rtn.method_config("model.layers.0.mlp.up_proj", 4).symmetric
    assert not hasattr(rtn.method_config("x", 4), "sinkhorn_iters")
