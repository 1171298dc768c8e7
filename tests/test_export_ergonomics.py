"""Big-model ergonomics: per-stage time + peak RSS, tensor progress in bytes/s, disk check."""

from __future__ import annotations

import errno
import json
import mmap
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from sinq_export.checkpoint import Checkpoint
from sinq_export.config import SinqConfig
from sinq_export.export.diskspace import (
    check_free_space,
    estimate_output_bytes,
    linear_bits,
    quantized_tensor_bytes,
)
from sinq_export.export.stages import Stages, TensorBar, peak_rss_bytes
from sinq_export.quant import make_config, quantize


def test_stage_peak_rss_is_the_stage_own_peak():
    """A stage that maps 256 MiB reports >= that much more than a later idle stage.

    Held for a few sampling periods: in a test process whose high-water mark earlier tests
    already raised, the stage's own peak comes from the RSS sampler (every 50 ms). The pages
    are mapped directly (fresh, touched, unmapped at the end): a tensor could reuse memory the
    allocator kept resident from earlier tests and never raise the resident set."""
    stages = Stages(["big", "small"], progress=False)
    with stages.stage("big"):
        size = 256 << 20
        block = mmap.mmap(-1, size)
        for offset in range(0, size, mmap.PAGESIZE):
            block[offset] = 1
        time.sleep(0.3)
        block.close()
    with stages.stage("small"):
        small = torch.ones(1 << 10)
        float(small.sum())
    assert stages.peak_rss["big"] >= stages.peak_rss["small"] + (200 << 20)
    assert stages.peak_rss["big"] <= peak_rss_bytes()
    report = stages.report()
    assert set(report["timings_s"]) == {"big", "small"}
    assert report["peak_rss_mb"]["big"] == round(stages.peak_rss["big"] / 2**20, 1)
    stages.close()


def test_stage_time_accumulates_and_survives_errors():
    stages = Stages(["a"], progress=False)
    with pytest.raises(RuntimeError), stages.stage("a"):
        raise RuntimeError("boom")
    with stages.stage("a"):
        pass
    assert stages.timings["a"] >= 0 and "a" in stages.peak_rss


def test_tensor_bar_reports_bytes_per_second(capsys):
    with TensorBar(3 << 20, 3, enabled=True) as bar:
        for i in range(3):
            bar.advance(f"t{i}", 1 << 20)
        bar._bar.refresh()  # tqdm redraws at most every 0.1 s; force the last state
    text = capsys.readouterr().err
    assert bar.done == 3
    assert "B/s" in text and "3/3 t2" in text


def _checkpoint(tmp_path, tensors):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                      "model_type": "llama"}))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return Checkpoint.open(tmp_path)


@settings(max_examples=20, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 5, 8]), group=st.sampled_from([16, 32, 64]),
       n=st.integers(2, 40), k=st.integers(2, 130))
def test_quantized_size_matches_the_quantizer(bits, group, n, k):
    weight = torch.randn(n, k)
    record = quantize(weight, make_config("sinq", bits=bits, group_size=group))
    assert quantized_tensor_bytes((n, k), bits, group, float_bytes=4) == record.nbytes()


def test_estimate_counts_linears_packed_and_the_rest_float(tmp_path):
    tensors = {
        "model.embed_tokens.weight": torch.zeros(100, 64, dtype=torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": torch.zeros(128, 64, dtype=torch.bfloat16),
        "model.norm.weight": torch.zeros(64, dtype=torch.bfloat16),
        "lm_head.weight": torch.zeros(100, 64, dtype=torch.bfloat16),
    }
    ckpt = _checkpoint(tmp_path, tensors)
    config = SinqConfig(bits=3, group_size=32)
    got = estimate_output_bytes(ckpt, linear_bits(config), 32, runtime="stock", float_bytes=4)
    floats = (100 * 64 + 64 + 100 * 64) * 4  # lm_head excluded by default
    packed = quantized_tensor_bytes((128, 64), 4, 32, 4)  # 3-bit codes in a 4-bit container
    assert floats + packed < got < floats + packed + (17 << 20) * 1.03
    custom = estimate_output_bytes(ckpt, linear_bits(config), 32, runtime="custom", float_bytes=4)
    assert custom < got


def test_free_space_check(tmp_path):
    check_free_space(tmp_path / "new" / "out", 1)  # folders that do not exist yet: their FS
    with pytest.raises(OSError) as info:
        check_free_space(tmp_path / "out", 1 << 60)
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(tmp_path / "out")
    assert "not enough free disk space" in str(info.value) and "\n" not in str(info.value)
