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
