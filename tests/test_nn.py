"""The PyTorch stage: quantize_model, SinqLinear semantics, save/load."""

import pytest
import torch
from _models import tiny_llama
from torch import nn

from sinq_export import SinqConfig, SinqLinear, load_quantized, quantize_model, save_quantized
from sinq_export.io import OutputExistsError
from sinq_export.nn import quantized_layers


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(96, 128), nn.GELU(), nn.Linear(128, 64, bias=False))


def test_sinq_linear_computes_the_graph_formula():
    model = mlp()
    quantize_model(model, SinqConfig(bits=4, group_size=32, exclude=()), progress=False)
    layer = model[0]
    assert isinstance(layer, SinqLinear)
    x = torch.randn(3, 96)
    r = layer.record
    w = (r.codes().float() - r.zeros().float().repeat_interleave(32, 1)) \
        * r.scales.repeat_interleave(32, 1)
    expected = (x * r.col_scale) @ w.T + layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_quantize_model_default_keeps_lm_head_float():
    model = tiny_llama()
    report = quantize_model(model, SinqConfig(group_size=32), progress=False, measure_error=True)
    names = set(quantized_layers(model))
    assert len(names) == 14 and "lm_head" not in names
    assert isinstance(model.lm_head, nn.Linear)
    assert all(0 < la.rel_error < 0.2 for la in report.layers)


def test_overrides_and_lm_head_bits():
    model = tiny_llama()
    quantize_model(model, SinqConfig(group_size=32, overrides={"down_proj": 8}, lm_head_bits=8),
                   progress=False)
    layers = quantized_layers(model)
    assert layers["model.layers.0.mlp.down_proj"].bits == 8
    assert layers["model.layers.1.self_attn.q_proj"].bits == 4
    assert layers["lm_head"].bits == 8


def test_shared_col_scale_groups_qkv_and_gate_up():
    model = tiny_llama()
    quantize_model(model, SinqConfig(group_size=32, shared_col_scale=True), progress=False)
    attn = model.model.layers[0].self_attn
    mlp_ = model.model.layers[0].mlp
    assert torch.equal(attn.q_proj.col_scale, attn.k_proj.col_scale)
    assert torch.equal(attn.q_proj.col_scale, attn.v_proj.col_scale)
    assert torch.equal(mlp_.gate_proj.col_scale, mlp_.up_proj.col_scale)
    assert not torch.equal(mlp_.down_proj.col_scale, mlp_.up_proj.col_scale[:128])


def test_quantized_llama_stays_close_and_round_trips(tmp_path):
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        ref = model(ids).logits
    cfg = SinqConfig(bits=8, group_size=32)
    quantize_model(model, cfg, progress=False)
    with torch.no_grad():
        out = model(ids).logits
    assert torch.nn.functional.cosine_similarity(ref.flatten(), out.flatten(), dim=0) > 0.999
    save_quantized(model, tmp_path / "q", cfg)
    loaded, loaded_cfg = load_quantized(tmp_path / "q")
    assert loaded_cfg == cfg
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, out)
    assert not any(p.suffix in {".bin", ".pt", ".pkl"} for p in (tmp_path / "q").iterdir())


def test_save_refuses_existing_folder_and_leaves_nothing_on_failure(tmp_path):
    model = mlp()
    cfg = SinqConfig(group_size=32, exclude=())
    quantize_model(model, cfg, progress=False)
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputExistsError):
        save_quantized(model, tmp_path / "out", cfg)

    class Boom(nn.Module):
        def state_dict(self, *a, **k):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_quantized(Boom(), tmp_path / "new", cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_load_generic_module_into_skeleton(tmp_path):
    model = mlp()
    cfg = SinqConfig(group_size=32, exclude=())
    quantize_model(model, cfg, progress=False)
    save_quantized(model, tmp_path / "m", cfg)
    loaded, _ = load_quantized(tmp_path / "m", mlp())
    x = torch.randn(2, 96)
    torch.testing.assert_close(loaded(x), model(x))
