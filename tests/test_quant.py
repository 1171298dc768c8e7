"""SINQ quantizer: references, properties, and bad input."""

import math

import numpy as np
import pytest
import torch
from _helpers import outlier_matrix
from hypothesis import given, settings
from hypothesis import strategies as st

from sinq_export.quant import (
    QuantizationError,
    make_config,
    quantize,
    quantize_jointly,
    relative_error,
)
from sinq_export.quant.core import kurtosis, round_codes
from sinq_export.quant.rtn import minmax_params
from sinq_export.quant.sinkhorn import sinkhorn_scales


def naive_sinkhorn(tile: torch.Tensor, iters: int = 16):
    """Per-tile loop written straight from Alg. 1 with torch.std: the reference for the batched kernel."""
    m = tile.double()

    def imbalance(x):
        s1, s2 = x.std(1), x.std(0)
        return max(s1.max(), s2.max()) / max(min(s1.min(), s2.min()), 1e-12)

    target = min(m.std(1).clamp(1e-3, 1e3).min(), m.std(0).clamp(1e-3, 1e3).min()) + 1e-6
    log_c, log_r = torch.zeros(m.shape[1], dtype=m.dtype), torch.zeros(m.shape[0], dtype=m.dtype)
    best = (imbalance(m), torch.ones_like(log_r), torch.ones_like(log_c))
    for _ in range(iters):
        cur = m / log_r.exp()[:, None] / log_c.exp()[None, :]
        ib = imbalance(cur)
        if ib <= best[0]:
            best = (ib, log_r.exp(), log_c.exp())
        if ib > best[0]:
            break
        sr = cur.std(1).clamp(1e-3, 1e3)
        sc = cur.std(0).clamp(1e-3, 1e3)
        log_r = (log_r + (sr / target).clamp(0.7, 2.0).log()).clamp(-0.3, 10.0)
        log_c = (log_c + (sc / target).clamp(0.7, 2.0).log()).clamp(-0.3, 10.0)
    return best


def test_batched_sinkhorn_matches_naive_per_tile_loop():
    w = outlier_matrix(128, 256)
    tiles = w.reshape(128, 4, 64).permute(1, 0, 2)
    s = sinkhorn_scales(tiles, 16)
    for i in range(4):
        imb, r, c = naive_sinkhorn(tiles[i])
        assert math.isclose(float(s.imbalance[i]), float(imb), rel_tol=1e-4)
        torch.testing.assert_close(s.row[i].double(), r, rtol=1e-4, atol=0)
        torch.testing.assert_close(s.col[i].double(), c, rtol=1e-4, atol=0)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), n_tiles=st.integers(1, 7), per_chunk=st.integers(1, 7))
def test_sinkhorn_in_chunks_of_tiles_is_the_whole_batch(seed, n_tiles, per_chunk):
    """Tiles are independent: normalising them in chunks (bounded memory for a big head)
    gives the scales of one batch (to the last bit or two: the batched mat-vecs round a
    little differently per batch size); the contiguous copy of the strided view changes
    nothing."""
    w = outlier_matrix(64, 32 * n_tiles, seed=seed)
    tiles = w.reshape(64, n_tiles, 32).permute(1, 0, 2)  # the strided view quantization passes
    whole = sinkhorn_scales(tiles, 16, chunk_bytes=1 << 40)
    parts = sinkhorn_scales(tiles, 16, chunk_bytes=per_chunk * 64 * 32 * 4)
    dense = sinkhorn_scales(tiles.contiguous(), 16, chunk_bytes=1 << 40)
    for field in ("row", "col", "imbalance"):
        torch.testing.assert_close(getattr(parts, field), getattr(whole, field), rtol=1e-5, atol=0)
        assert torch.equal(getattr(dense, field), getattr(whole, field)), field


def test_sinkhorn_reduces_imbalance():
    w = outlier_matrix(128, 128)
    tiles = w.reshape(128, 2, 64).permute(1, 0, 2)
    s = sinkhorn_scales(tiles, 16)
    before = [naive_sinkhorn(t, 0)[0] for t in tiles]
    assert all(float(a) < 0.8 * float(b) for a, b in zip(s.imbalance, before))


@settings(max_examples=50, deadline=None)
@given(bits=st.integers(2, 8), seed=st.integers(0, 10_000), sym=st.booleans(),
       scale=st.floats(1e-4, 1e3))
def test_group_quantizer_against_numpy_reference(bits, seed, sym, scale):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((6, 32)) * scale).astype(np.float32)
    xt = torch.from_numpy(x)
    scales, zeros = minmax_params(xt, bits, symmetric=sym)
    qmax = 2**bits - 1
    got = round_codes(xt, scales[:, None], zeros[:, None], bits, 32)  # one group per row
    for r in range(6):
        row = x[r]
        if sym:
            half = 2 ** (bits - 1)
            s = max(-row.min() / half, row.max() / (half - 1), 1e-10)
            z = half
        else:
            lo, hi = min(row.min(), 0.0), max(row.max(), 0.0)
            s = max((hi - lo) / qmax, 1e-10)
            z = np.clip(np.round(-lo / s), 0, qmax)
        codes = np.clip(np.round(row / np.float32(s) + z), 0, qmax)
        assert np.isclose(scales[r].item(), s, rtol=1e-6)
        assert zeros[r].item() == z
        assert np.abs(got[r].numpy().astype(int) - codes).max() <= 1  # rounding ties
    err = ((got - zeros[:, None]) * scales[:, None] - xt).abs()
    assert bool((err <= scales[:, None] * 0.5 * (1 + 1e-4) + 1e-30).all())


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("method", ["sinq", "rtn"])
def test_record_dequantizes_to_its_formula(bits, method):
    w = outlier_matrix(64, 200)  # K not a multiple of the group
    q = quantize(w, make_config(method, bits=bits, group_size=64))
    codes, zeros = q.codes().float(), q.zeros().float()
    assert int(codes.max()) <= 2**bits - 1 and int(zeros.max()) <= 2**bits - 1
    g = torch.arange(200) // 64
    manual = (codes - zeros[:, g]) * q.scales[:, g]
    if method == "sinq":
        manual = manual * q.col_scale
    else:
        assert q.col_scale is None
    torch.testing.assert_close(q.dequantize(), manual)
    assert relative_error(w, q) < {2: 0.7, 3: 0.3, 4: 0.15, 5: 0.07, 6: 0.04, 8: 0.01}[bits]


@pytest.mark.parametrize("bits", [3, 4])
def test_sinq_beats_rtn_on_imbalanced_weights(bits):
    wins = 0
    for seed in range(5):
        w = outlier_matrix(seed=seed)
        wins += relative_error(w, quantize(w, make_config("sinq", bits=bits))) < relative_error(
            w, quantize(w, make_config("rtn", bits=bits)))
    assert wins == 5


def test_symmetric_uses_mid_range_zero_point():
    q = quantize(outlier_matrix(32, 64), make_config("sinq", group_size=32, symmetric=True))
    assert bool((q.zeros() == 8).all())


def test_kurtosis_gate_falls_back_to_rtn():
    w = outlier_matrix(64, 128)
    w[3, 7] = 50.0  # one huge outlier -> enormous kurtosis
    assert kurtosis(w) > 5
    assert quantize(w, make_config("sinq", kurtosis_gate=5.0)).col_scale is None
    assert quantize(w, make_config("sinq")).col_scale is not None


def test_joint_quantization_shares_the_column_scale():
    ws = [outlier_matrix(64, 128, seed=s) for s in range(3)]
    qs = quantize_jointly(ws, ["q", "k", "v"], make_config("sinq"))
    assert all(torch.equal(q.col_scale, qs[0].col_scale) for q in qs)
    for w, q in zip(ws, qs):
        assert q.shape == tuple(w.shape) and relative_error(w, q) < 0.15


@pytest.mark.parametrize(
    ("weight", "message"),
    [
        (torch.full((4, 64), float("nan")), "NaN/Inf"),
        (torch.tensor([[1.0, float("inf")] * 32] * 4), "NaN/Inf"),
        (torch.zeros(0, 64), "empty"),
        (torch.zeros(1, 64), "single output row"),
        (torch.zeros(2, 3, 4), "2-D"),
    ],
)
def test_bad_weights_name_the_layer(weight, message):
    with pytest.raises(QuantizationError, match=f"layers.3.mlp.up_proj: .*{message}"):
        quantize(weight, make_config("sinq"), name="layers.3.mlp.up_proj")


def test_all_zero_weight_is_exact():
    q = quantize(torch.zeros(8, 64), make_config("sinq"))
    assert bool(torch.isfinite(q.scales).all())
    assert float(q.dequantize().abs().max()) == 0.0


# ------------------------------------------------------------------ o_proj's t tied per GQA group


@settings(max_examples=40, deadline=None)
@given(kv=st.integers(1, 3), rep=st.integers(1, 4), d=st.integers(1, 6), seed=st.integers(0, 999))
def test_tied_col_scale_is_one_value_per_group_channel(kv, rep, d, seed):
    """Every query head of a kv group gets the group's geometric mean, channel by channel (the
    group's product is kept), and `tied_rows` reads back one head's slice per kv head."""
    from sinq_export.quant.core import tie_col_scale, tied_rows

    g = torch.Generator().manual_seed(seed)
    t = torch.rand(kv * rep * d, generator=g, dtype=torch.float64) * 3 + 0.1
    tied = tie_col_scale(t, kv, rep)
    heads = tied.reshape(kv, rep, d)
    assert torch.equal(heads, heads[:, :1].expand_as(heads))
    ref = np.exp(np.log(t.numpy().reshape(kv, rep, d)).mean(1))
    np.testing.assert_allclose(heads[:, 0].numpy(), ref, rtol=1e-12)
    assert torch.equal(tied_rows(tied, kv, kv * d), heads[:, 0].reshape(-1))
    assert torch.equal(tied_rows(t, 1, t.shape[0]), t)  # a plain row fold: t itself


def test_tied_t_on_value_rows_equals_t_on_attention_output():
    """The fold's algebra with GQA's head mapping (query head h reads kv head h // rep): o_proj
    applying a tied t to the attention output equals v_proj's rows carrying it."""
    from sinq_export.quant.core import tie_col_scale, tied_rows

    torch.manual_seed(0)
    kv, rep, d, tokens, hidden = 2, 3, 4, 5, 7
    x = torch.randn(tokens, hidden, dtype=torch.float64)
    wv = torch.randn(kv * d, hidden, dtype=torch.float64)
    p = torch.softmax(torch.randn(kv * rep, tokens, tokens, dtype=torch.float64), -1)
    t = tie_col_scale(torch.rand(kv * rep * d, dtype=torch.float64) + 0.5, kv, rep)

    def attention(v):  # [tokens, kv * d] -> [tokens, heads * d]
        v = v.reshape(tokens, kv, d).permute(1, 0, 2).repeat_interleave(rep, 0)
        return (p @ v).permute(1, 0, 2).reshape(tokens, -1)

    scaled_input = attention(x @ wv.T) * t
    scaled_rows = attention(x @ (wv * tied_rows(t, kv, kv * d)[:, None]).T)
    torch.testing.assert_close(scaled_rows, scaled_input, rtol=1e-12, atol=1e-12)


def test_o_proj_tie_reaches_only_o_proj():
    from sinq_export.config import ConfigError, SinqConfig

    cfg = SinqConfig().tie_o_proj_for({"num_attention_heads": 9, "num_key_value_heads": 3})
    assert cfg.o_proj_tie == (3, 3)
    assert cfg.method_config("model.layers.0.self_attn.o_proj", 4).col_scale_tie == (3, 3)
    assert cfg.method_config("model.layers.0.self_attn.v_proj", 4).col_scale_tie is None
    assert SinqConfig.from_dict(cfg.to_dict()) == cfg
    assert SinqConfig().tie_o_proj_for({"num_attention_heads": 4}).o_proj_tie == (4, 1)
    with pytest.raises(ConfigError, match="o_proj_tie"):
        SinqConfig(o_proj_tie=(2, 0))
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        SinqConfig().tie_o_proj_for({"num_attention_heads": 4, "num_key_value_heads": 3})


def test_tied_o_proj_record_has_a_tied_t():
    from sinq_export.config import SinqConfig
    from sinq_export.quant.methods import quantize

    torch.manual_seed(0)
    w = torch.randn(48, 6 * 16)
    cfg = SinqConfig(group_size=16, o_proj_tie=(2, 3))
    t = quantize(w, cfg.method_config("o_proj", 4)).col_scale.reshape(2, 3, 16)
    assert torch.equal(t, t[:, :1].expand_as(t))
    free = quantize(w, SinqConfig(group_size=16).method_config("o_proj", 4)).col_scale
    assert not torch.equal(free.reshape(2, 3, 16), t)
