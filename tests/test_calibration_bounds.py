"""What a calibration holds at once is bounded by a chunk, and bad input is refused early.

A block runs on a chunk of windows at a time (`calibration.forward.windows_per_chunk`), rounding
to nearest goes a chunk of rows at a time (`quant.core.rounded_chunks`): the results must be
those of the whole set at once. A model whose forward overflows names its block; a
calibration whose hidden states cannot fit is refused before any forward.
"""

from __future__ import annotations

import pytest
import torch
from _models import ARCHS, make_model_dir, tiny_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from sinq_export import planning, quantize
from sinq_export.calibration import forward
from sinq_export.calibration.forward import (
    NonFiniteActivations,
    capture_block_inputs,
    collect_stats,
    windows_per_chunk,
)
from sinq_export.cli import main
from sinq_export.models import decoder_blocks, load_causal_lm_streamed
from sinq_export.quant import core
from sinq_export.quant.core import chunk_rows, grid_for, round_codes, rounded_chunks
from sinq_export.quant.methods import make_config

WINDOWS = torch.randint(0, 320, (5, 24), generator=torch.Generator().manual_seed(4))


def _block_stats(block, hidden, kwargs, chunk_bytes, monkeypatch):
    monkeypatch.setattr(forward, "CHUNK_BYTES", chunk_bytes)
    names = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    return collect_stats(block, names, lambda: forward._block_output(block, hidden, kwargs))


@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_a_block_in_chunks_of_windows_is_the_whole_forward(tmp_path, monkeypatch, model_type):
    """Outputs and input statistics (full Hessians, shared by q/k/v and gate/up) of a block
    run one window at a time equal those of all windows at once (float32 summation order)."""
    make_model_dir(tmp_path / "hf", model_type)
    model, _ = load_causal_lm_streamed(tmp_path / "hf", with_tokenizer=False)
    hidden, kwargs = capture_block_inputs(model, WINDOWS)
    block = decoder_blocks(model)[0]
    whole, out_whole = _block_stats(block, hidden, kwargs, 1 << 40, monkeypatch)
    parts, out_parts = _block_stats(block, hidden, kwargs, 1, monkeypatch)
    assert windows_per_chunk(block, 5, 24) == 1
    torch.testing.assert_close(out_parts, out_whole, rtol=1e-5, atol=1e-5)
    assert sorted(parts) == sorted(whole)
    for name in whole:
        assert parts[name].count == whole[name].count == 5 * 24
        want = whole[name].hessian()
        torch.testing.assert_close(parts[name].hessian(), want, rtol=1e-4,
                                   atol=1e-5 * float(want.abs().max()))
    sharing = {id(s) for s in whole.values()}
    assert len({id(s) for s in parts.values()}) == len(sharing)  # q/k/v, gate/up share


@pytest.mark.parametrize("search", [False, True])
def test_rounding_in_row_chunks_is_the_whole_rounding(search, monkeypatch):
    """Bit for bit: group parameters and codes are per row."""
    monkeypatch.setattr(core, "ROW_CHUNK_BYTES", 4 * 64 * 500)  # 500-row chunks
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(chunk_rows(64) * 2 + 37, 64, generator=gen)
    t = torch.exp(0.3 * torch.randn(64, generator=gen))
    h = torch.rand(64, generator=gen) + 0.1
    cfg = make_config("sinq", bits=4, group_size=32, scale_search=search, scale_refit=3)
    chunks = list(rounded_chunks(w, t, h, cfg))
    assert len(chunks) == 3
    codes, s, z = (torch.cat(p) for p in zip(*chunks))
    s_all, z_all = grid_for(w / t, t, h, cfg)
    assert codes.dtype == torch.uint8
    assert torch.equal(s, s_all) and torch.equal(z, z_all)
    assert torch.equal(codes, round_codes(w / t, s_all, z_all, 4, 32).to(torch.uint8))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), bits=st.sampled_from([2, 3, 4, 8]),
       cuts=st.lists(st.integers(1, 22), min_size=1, max_size=4, unique=True))
def test_a_record_packed_a_chunk_at_a_time_is_the_whole_record(seed, bits, cuts):
    """`core.record` packs each chunk of rows as it comes: the same bytes as one chunk."""
    gen = torch.Generator().manual_seed(seed)
    n, k, g = 23, 80, 32  # K not a multiple of the group: the last block is padded
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen, dtype=torch.uint8)
    scales = torch.rand(n, 3, generator=gen)
    zeros = torch.randint(0, 1 << bits, (n, 3), generator=gen).float()
    t = torch.rand(k, generator=gen) + 0.5
    bounds = [0, *sorted(cuts), n]
    chunks = [(codes[a:b], scales[a:b], zeros[a:b]) for a, b in zip(bounds, bounds[1:])]
    whole = core.record([(codes, scales, zeros)], (n, k), t, bits, g)
    parts = core.record(iter(chunks), (n, k), t, bits, g)
    for name in ("packed", "scales", "zero_points", "col_scale"):
        assert torch.equal(getattr(parts, name), getattr(whole, name)), name
    assert torch.equal(parts.codes(), codes) and torch.equal(parts.zeros(), zeros.to(torch.uint8))
    with pytest.raises(ValueError, match="the chunks hold 22 rows"):
        core.record([(codes[:22], scales[:22], zeros[:22])], (n, k), t, bits, g)


def test_overflowing_activations_name_their_block(tmp_path, capsys):
    """A block whose forward overflows to Inf: one line naming it, exit 2, no output."""
    make_model_dir(tmp_path / "hf", "llama")
    path = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.1.mlp.down_proj.weight"] *= 1e38
    save_file(tensors, path, metadata={"format": "pt"})
    tiny_tokenizer().save_pretrained(tmp_path / "hf")
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["model", str(tmp_path / "hf"), "-o", str(out), "--group-size", "32",
                 "--json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.layers.1" in err[0] and "NaN/Inf" in err[0]
    assert not out.exists()
    assert issubclass(NonFiniteActivations, ValueError)


def test_a_calibration_that_cannot_fit_is_refused_before_any_forward(tmp_path, monkeypatch,
                                                                       capsys):
    make_model_dir(tmp_path / "hf", "llama")
    tiny_tokenizer().save_pretrained(tmp_path / "hf")
    monkeypatch.setattr(planning, "available_bytes", lambda: 10**6)
    ran = []
    monkeypatch.setattr(quantize, "capture_block_inputs",
                        lambda *a, **k: ran.append(1))  # any forward would land here
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["model", str(tmp_path / "hf"), "-o", str(out), "--group-size", "32",
                 "--calibration-windows", "64", "--json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--calibration-windows" in err[0] and "GB" in err[0]
    assert ran == [] and not out.exists()
