"""A joint quantization unit (linears that share one t) is one quantization call: one width and
one group size. Linears whose settings differ (a bit allocation's choice, a user's group
override) are quantized apart, in the PyTorch path and in the export alike, so every record
has the group size its layer's plan says."""

from __future__ import annotations

import torch
from test_architectures import make_model_dir

from sinq_export import GraphConfig, SinqConfig
from sinq_export.export import export_causal_lm
from sinq_export.nn import quantize_model, quantized_layers
from sinq_export.quant.units import joint_groups

GATE, UP = "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"


def test_joint_groups_need_equal_widths_and_group_sizes():
    names = [GATE, UP]
    assert joint_groups(names, dict.fromkeys(names, (4, 64)), "mlp") == [names]
    assert joint_groups(names, {GATE: (4, 64), UP: (4, 128)}, "mlp") == []
    assert joint_groups(names, {GATE: (3, 64), UP: (4, 64)}, "mlp") == []
    assert joint_groups(names, dict.fromkeys(names, (4, 64)), "none") == []


@torch.no_grad()
def test_a_group_override_inside_a_shared_unit_keeps_each_layers_group_size(tmp_path):
    model = make_model_dir(tmp_path / "hf", "llama")
    cfg = SinqConfig(group_size=16, shared_col_scale="mlp", energy_refit=0,
                     group_overrides=((r"\.up_proj$", 32),))
    quantize_model(model, cfg, progress=False)
    layers = quantized_layers(model)
    assert (layers[GATE].group_size, layers[UP].group_size) == (16, 32)
    records = {n: m.record for n, m in layers.items()}
    graph = GraphConfig(col_scale="fold")
    for name, given in (("streamed", None), ("given", records)):  # the export's two sources
        result = export_causal_lm(tmp_path / "hf", tmp_path / name, cfg, graph, progress=False,
                                  records=given)
        got = result.manifest["layers"]
        assert (got[GATE]["group_size"], got[UP]["group_size"]) == (16, 32)
        assert got[GATE]["col_scale_mode"] == "fold"  # its own t goes into the norm
