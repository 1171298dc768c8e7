"""Method registry, range search, GPTQ, calibration driver and bit allocation vs references."""

import itertools

import numpy as np
import pytest
import torch
from _helpers import outlier_matrix  # the suite's heavy-row/column weight
from _models import tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st

import sinq_export.calibration.forward as calibration
import sinq_export.calibration.windows as windows
from sinq_export.quant import METHODS, QuantizedWeight, SINQConfig, make_config, quantize
from sinq_export.quant.allocate import allocate, layer_bytes
from sinq_export.quant.gptq import gptq_chunks
from sinq_export.quant.rtn import SHRINK_GRID, minmax_params, search_params
from sinq_export.quant.stats import LayerStats, output_error


def gptq_codes(*args, **kwargs):
    """`gptq_chunks`' row chunks joined: (codes, scales, zeros) of the whole weight."""
    return tuple(torch.cat(p) for p in zip(*gptq_chunks(*args, **kwargs)))


def correlated_stats(k, seed=0, tokens=512):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = torch.randn(tokens, k, generator=g) @ mix * torch.exp(torch.randn(k, generator=g))
    st_ = LayerStats(k)
    st_.add(x)
    return st_


# ------------------------------------------------------------------------------ registry


def test_registry_has_both_methods_with_their_own_configs():
    assert {"sinq", "rtn"} <= set(METHODS)
    assert isinstance(make_config("sinq", bits=3, group_size=32), SINQConfig)
    with pytest.raises(ValueError, match="method 'rtn' has no setting 'sinkhorn_iters'"):
        make_config("rtn", bits=3, sinkhorn_iters=4)  # a knob it would ignore is refused
    with pytest.raises(ValueError, match="unknown quantization method 'nf4'"):
        make_config("nf4")


@pytest.mark.parametrize("method", ["sinq", "rtn"])
@pytest.mark.parametrize("calibrated", [False, True])
def test_every_method_yields_an_integer_zero_point_record(method, calibrated):
    w = outlier_matrix(64, 200)  # K not a multiple of the group
    stats = correlated_stats(200) if calibrated else None
    for bits in (2, 3, 4, 8):
        q = quantize(w, make_config(method, bits=bits, group_size=64), calibration=stats)
        assert isinstance(q, QuantizedWeight) and not hasattr(q, "g_idx")
        assert int(q.zeros().max()) <= 2**bits - 1 and q.zeros().dtype == torch.uint8
        assert int(q.codes().max()) <= 2**bits - 1


# ------------------------------------------------------------------------------ range search


def numpy_search(x, imp, bits, grid=SHRINK_GRID):
    """Brute-force reference: every shrink factor per group, then the least-squares refit."""
    qmax = 2**bits - 1
    out_s, out_z = [], []
    for row, w in zip(x.astype(np.float64), imp.astype(np.float64)):
        def err(s, z, row=row, w=w):
            q = np.clip(np.round(row / s + z), 0, qmax)
            return float((w * (row - (q - z) * s) ** 2).sum()), q
        best = None
        for p in grid:
            lo, hi = min(row.min(), 0.0) * p, max(row.max(), 0.0) * p
            s = max((hi - lo) / qmax, 1e-10)
            z = np.clip(np.round(-lo / s), 0, qmax)
            e, _ = err(s, z)
            if best is None or e < best[0]:
                best = (e, s, z)
        e, s, z = best
        _, q = err(s, z)
        d = q - z
        if (w * d * d).sum() > 0:
            s2 = (w * row * d).sum() / (w * d * d).sum()
            if s2 > 1e-10 and err(s2, z)[0] < e:
                s = s2
        out_s.append(s)
        out_z.append(z)
    return np.array(out_s), np.array(out_z)


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 6), seed=st.integers(0, 10_000), scale=st.floats(1e-3, 1e2))
def test_range_search_matches_numpy_reference_and_never_loses(bits, seed, scale):
    rng = np.random.default_rng(seed)
    x = (rng.standard_t(4, (8, 32)) * scale).astype(np.float32)
    imp = rng.uniform(0.1, 2.0, (8, 32)).astype(np.float32)
    s, z = search_params(torch.from_numpy(x), bits, torch.from_numpy(imp))
    rs, rz = numpy_search(x, imp, bits)
    np.testing.assert_allclose(s.numpy(), rs, rtol=2e-4)
    np.testing.assert_array_equal(z.numpy(), rz)
    assert float(z.min()) >= 0 and float(z.max()) <= 2**bits - 1
    ms, mz = minmax_params(torch.from_numpy(x), bits)

    def err(s_, z_):
        q = np.clip(np.round(x / s_[:, None] + z_[:, None]), 0, 2**bits - 1)
        return (imp * (x - (q - z_[:, None]) * s_[:, None]) ** 2).sum(1)

    assert (err(s.numpy(), z.numpy()) <= err(ms.numpy(), mz.numpy()) * (1 + 1e-5) + 1e-12).all()


# ------------------------------------------------------------------------------ GPTQ


def numpy_gptq(w, t, h, bits, g, damp=0.01):
    """Textbook unblocked GPTQ in float64 with min/max group parameters at each group start."""
    qmax = 2**bits - 1
    wn = (w / t).astype(np.float64)
    hp = h.astype(np.float64) * t[:, None] * t[None, :]
    hp = hp + damp * hp.diagonal().mean() * np.eye(len(t))
    u = np.linalg.cholesky(np.linalg.inv(hp)).T  # upper factor of H^-1
    codes = np.zeros_like(wn)
    s = z = None
    for i in range(wn.shape[1]):
        if i % g == 0:
            grp = wn[:, i : i + g]
            lo, hi = np.minimum(grp.min(1), 0), np.maximum(grp.max(1), 0)
            s = np.maximum((hi - lo) / qmax, 1e-10)
            z = np.clip(np.round(-lo / s), 0, qmax)
        q = np.clip(np.round(wn[:, i] / s + z), 0, qmax)
        codes[:, i] = q
        e = (wn[:, i] - (q - z) * s) / u[i, i]
        wn[:, i:] -= np.outer(e, u[i, i:])
    return codes


@settings(max_examples=15, deadline=None)
@given(bits=st.sampled_from([2, 3, 4]), seed=st.integers(0, 1000), k=st.sampled_from([64, 96, 256]))
def test_gptq_matches_numpy_reference(bits, seed, k):
    w = outlier_matrix(16, k, seed)
    t = torch.exp(torch.randn(k, generator=torch.Generator().manual_seed(seed)) * 0.3)
    h = correlated_stats(k, seed).hessian()
    cfg = make_config("sinq", bits=bits, group_size=32, scale_search=False)
    codes, _, _ = gptq_codes(w, t, h, cfg)
    ref = numpy_gptq(w.double().numpy(), t.double().numpy(), h.double().numpy(), bits, 32)
    assert float((codes.numpy() == ref).mean()) > 0.98  # float32 vs float64 near-ties


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 1000), rows=st.integers(1, 40))
def test_gptq_in_row_chunks_is_the_whole_sweep(seed, rows):
    """Rows are independent given the Hessian: sweeping them in chunks (bounded memory for a
    big head) gives the whole sweep's codes, scales and zero points."""
    w = outlier_matrix(40, 96, seed)
    t = torch.exp(torch.randn(96, generator=torch.Generator().manual_seed(seed)) * 0.3)
    h = correlated_stats(96, seed).hessian()
    cfg = make_config("sinq", bits=3, group_size=32, scale_search=True)
    whole = gptq_codes(w, t, h, cfg, chunk_bytes=1 << 40)
    parts = gptq_codes(w, t, h, cfg, chunk_bytes=rows * 96 * 4)
    assert [p.shape for p in parts] == [p.shape for p in whole]
    assert float((parts[0] == whole[0]).float().mean()) > 0.99  # float32 near-ties only
    torch.testing.assert_close(parts[1], whole[1], rtol=1e-4, atol=0)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_lowers_the_output_error(bits):
    wins = 0
    for seed in range(4):
        w, st_ = outlier_matrix(48, 128, seed), correlated_stats(128, seed)
        base = make_config("sinq", bits=bits, group_size=32, awq=False, gptq=False,
                           scale_search=True)
        gptq = make_config("sinq", bits=bits, group_size=32, awq=False, gptq=True,
                           scale_search=True)
        e0 = output_error(w, quantize(w, base, calibration=st_).dequantize(), st_.hessian())
        e1 = output_error(w, quantize(w, gptq, calibration=st_).dequantize(), st_.hessian())
        wins += e1 < e0
    assert wins == 4


def test_hessian_weighted_range_search_lowers_the_output_error():
    w, st_ = outlier_matrix(48, 128, 1), correlated_stats(128, 1)
    errs = [output_error(w, quantize(w, make_config("sinq", bits=3, group_size=32, awq=False,
                                                     gptq=False, scale_search=s),
                                     calibration=st_).dequantize(), st_.hessian())
            for s in (False, True)]
    assert errs[1] < errs[0]


def test_activation_aware_scale_never_loses_on_calibration_data():
    w, st_ = outlier_matrix(48, 128, 3), correlated_stats(128, 3)
    plain = make_config("sinq", bits=3, group_size=32, awq=False, gptq=False)
    awq = make_config("sinq", bits=3, group_size=32, awq=True, gptq=False)
    e0 = output_error(w, quantize(w, plain, calibration=st_).dequantize(), st_.hessian())
    e1 = output_error(w, quantize(w, awq, calibration=st_).dequantize(), st_.hessian())
    assert e1 <= e0 * (1 + 1e-6)


def test_layer_stats_hessian_is_the_mean_outer_product():
    x = torch.randn(3, 40, 16)
    st_ = LayerStats(16)
    st_.add(x[:2])
    st_.add(x[2:])
    flat = x.reshape(-1, 16).double()
    torch.testing.assert_close(st_.hessian().double(), flat.T @ flat / 120, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st_.abs_mean().double(), flat.abs().mean(0), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ allocation


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_allocation_dp_matches_brute_force(data):
    n_layers = data.draw(st.integers(1, 4))
    widths = data.draw(st.lists(st.sampled_from([2, 3, 4, 5, 6, 8]), min_size=1, max_size=4,
                                unique=True))
    costs, sizes = {}, {}
    for i in range(n_layers):
        costs[f"l{i}"] = {b: data.draw(st.floats(0, 100)) for b in widths}
        sizes[f"l{i}"] = {b: data.draw(st.integers(1, 20)) * b for b in widths}
    budget = data.draw(st.integers(0, 200))
    best = None
    for combo in itertools.product(widths, repeat=n_layers):
        size = sum(sizes[f"l{i}"][b] for i, b in enumerate(combo))
        cost = sum(costs[f"l{i}"][b] for i, b in enumerate(combo))
        if size <= budget and (best is None or cost < best):
            best = cost
    if best is None:
        with pytest.raises(ValueError, match="fits"):
            allocate(costs, sizes, budget, unit=1)
        return
    got = allocate(costs, sizes, budget, unit=1)
    assert sum(sizes[n][b] for n, b in got.items()) <= budget
    assert sum(costs[n][b] for n, b in got.items()) == pytest.approx(best, abs=1e-9)


def test_allocation_options_bracket_the_budget_width():
    """The widest uniform width that fits and the next one, at half / once / twice the group."""
    from sinq_export.quant.allocate import allocation_options, budget_bytes

    shapes = {"a": (64, 256), "b": (128, 256)}
    at = {b: budget_bytes(shapes, b, 64) for b in (2, 3, 4, 8)}
    assert allocation_options(shapes, at[4], 64) == [(b, g) for b in (4, 5) for g in (32, 64, 128)]
    assert allocation_options(shapes, (at[3] + at[4]) // 2, 64)[0] == (3, 32)
    assert allocation_options(shapes, at[8] * 2, 256) == [(8, 128), (8, 256)]
    assert allocation_options(shapes, at[2] - 1, 16) == [(2, 16), (2, 32), (3, 16), (3, 32)]


def test_allocation_over_group_sizes_is_exact():
    """(bits, group) options: the DP agrees with brute force on real layer sizes."""
    from sinq_export.quant.allocate import allocation_options, budget_bytes, layer_bytes

    shapes = {"a": (64, 256), "b": (128, 256), "c": (32, 512)}
    budget = budget_bytes(shapes, 4, 64)
    options = allocation_options(shapes, budget, 64)
    rng = np.random.default_rng(0)
    costs = {n: {o: float(rng.uniform(0, 10)) / o[0] ** 2 for o in options} for n in shapes}
    sizes = {n: {o: layer_bytes(shapes[n], *o) for o in options} for n in shapes}
    best = min((sum(costs[n][o] for n, o in zip(shapes, combo)), combo)
               for combo in itertools.product(options, repeat=3)
               if sum(sizes[n][o] for n, o in zip(shapes, combo)) <= budget)
    got = allocate(costs, sizes, budget, unit=1)
    assert sum(costs[n][o] for n, o in got.items()) == pytest.approx(best[0])


def test_layer_bytes_matches_a_record():
    q = quantize(outlier_matrix(64, 192), make_config("sinq", bits=3, group_size=64))
    assert layer_bytes((64, 192), 3, 64) == q.nbytes()


# ------------------------------------------------------------------------------ calibrated model


@torch.no_grad()
def test_calibrated_quantize_model_runs_block_by_block_and_beats_calibration_free():
    import copy

    from sinq_export import SinqConfig, quantize_model
    from sinq_export.nn import quantized_layers

    model = tiny_llama()
    windows = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    ref = model(input_ids=windows).logits
    errs = {}
    for calibrate in (False, True):
        q = copy.deepcopy(model)
        cfg = SinqConfig(bits=3, group_size=32, calibrate=calibrate, lm_head_bits=4)
        report = quantize_model(q, cfg, progress=False, calibration=windows)
        assert len(quantized_layers(q)) == 15 and report.n_layers == 15
        errs[calibrate] = float((q(input_ids=windows).logits - ref).square().mean())
    assert errs[True] < errs[False]
    with pytest.raises(ValueError, match="no calibration windows"):
        quantize_model(copy.deepcopy(model), SinqConfig(calibrate=True, group_size=32),
                       progress=False)


def test_linears_reading_one_input_share_their_statistics():
    from sinq_export.calibration.forward import collect_stats

    torch.manual_seed(0)
    model = nn_three()
    x = torch.randn(5, 16)
    stats, _ = collect_stats(model, ["a", "b", "c"], lambda: model(x))
    assert stats["a"] is stats["b"] and stats["c"] is not stats["a"]
    torch.testing.assert_close(stats["a"].hessian(), x.T @ x / 5)
    h = torch.relu(model.a(x)) + model.b(x)
    torch.testing.assert_close(stats["c"].hessian(), h.T @ h / 5)


def nn_three():
    from torch import nn

    class Three(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)

        def forward(self, x):
            return self.c(torch.relu(self.a(x)) + self.b(x))

    return Three()


def char_tokenizer(text, add_special_tokens=False):
    """Characters of the real text as ids < 128: enough tokens for the tiny model's vocabulary."""
    return {"input_ids": [ord(c) % 128 for c in text]}


def test_output_fisher_costs_match_autograd_per_token():
    """cost = 1/2 sum_t sum_i (dL/dy_ti)^2 ((E x_t)_i)^2, with dL/dy from torch.autograd on the
    layer's output itself; a larger error costs more."""
    from sinq_export.calibration.sensitivity import output_fisher_costs

    model = tiny_llama()
    name = "model.layers.1.self_attn.v_proj"
    lin = model.get_submodule(name)
    gen = torch.Generator().manual_seed(0)
    e_small = torch.randn(lin.weight.shape, generator=gen) * 1e-3
    windows = torch.randint(0, 128, (2, 24), generator=gen)
    got = output_fisher_costs(model, {name: {2: lambda: 4 * e_small, 4: lambda: e_small}}, windows)

    want = 0.0
    for win in windows:
        ids = win.reshape(1, -1)
        seen = {}
        handle = lin.register_forward_hook(lambda _m, a, o, seen=seen: seen.update(x=a[0], y=o))
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        handle.remove()
        (g,) = torch.autograd.grad(loss, seen["y"])
        want += 0.5 * float((g.square() * (seen["x"] @ e_small.T).square()).sum().detach())
    assert got[name][4] == pytest.approx(want, rel=1e-4)
    assert got[name][2] == pytest.approx(16 * want, rel=1e-4)


@torch.no_grad()
def test_plan_quantization_allocates_widths_within_the_budget():
    from sinq_export import SinqConfig, quantize_model
    from sinq_export.nn import plan_quantization, quantized_layers
    from sinq_export.quant.allocate import budget_bytes

    model = tiny_llama()
    cfg = SinqConfig(group_size=32, avg_bits=3.0, calibration_windows=4, calibration_length=64)
    with torch.enable_grad():
        plan = plan_quantization(model, char_tokenizer, cfg, sensitivity_windows=2)
    alloc = plan.manifest["allocation"]
    assert "calibration" not in plan.manifest  # no text calibration: the probe's ids
    assert plan.calibration.shape == (1, cfg.probe_tokens) and "probe" in plan.manifest
    assert set(alloc["widths"]) == {n for n in quantized_names(model)}
    assert [tuple(o) for o in alloc["options"]] == [(b, g) for b in (3, 4) for g in (16, 32, 64)]
    assert set(alloc["widths"].values()) <= {3, 4}
    quantize_model(model, plan.config, progress=False)
    layers = quantized_layers(model)
    assert {n: m.bits for n, m in layers.items()} == alloc["widths"]
    assert {n: m.group_size for n, m in layers.items()} == alloc["group_sizes"]
    shapes = {n: (m.out_features, m.in_features) for n, m in layers.items()}
    assert sum(m.record.nbytes() for m in layers.values()) <= budget_bytes(shapes, 3.0, 32)


@torch.no_grad()
def test_allocation_leaves_user_overrides_pinned_within_the_budget():
    """--override layers keep the user's width; the rest share what is left of the budget,
    so the whole still fits. An override that eats the budget is one clear error."""
    from sinq_export import ConfigError, SinqConfig, quantize_model
    from sinq_export.nn import plan_quantization, quantized_layers
    from sinq_export.quant.allocate import budget_bytes

    model = tiny_llama()
    cfg = SinqConfig(group_size=32, avg_bits=4.0, overrides=((r"down_proj", 8),),
                     calibration_windows=4, calibration_length=64)
    with torch.enable_grad():
        plan = plan_quantization(model, char_tokenizer, cfg, sensitivity_windows=2)
    alloc = plan.manifest["allocation"]
    assert alloc["pinned_by_overrides"] == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert not set(alloc["widths"]) & set(alloc["pinned_by_overrides"])
    quantize_model(model, plan.config, progress=False)
    layers = quantized_layers(model)
    assert {layers[n].bits for n in alloc["pinned_by_overrides"]} == {8}
    shapes = {n: (m.out_features, m.in_features) for n, m in layers.items() if n != "lm_head"}
    assert sum(m.record.nbytes() for n, m in layers.items() if n in shapes) \
        <= budget_bytes(shapes, 4.0, 32)
    with pytest.raises(ConfigError, match="too few; the narrowest choice"):
        plan_quantization(tiny_llama(), char_tokenizer, cfg.replace(avg_bits=None, max_size_mb=1e-3,
                                                                    overrides=()))
    with pytest.raises(ConfigError, match="override layers take"):
        with torch.enable_grad():
            plan_quantization(tiny_llama(), char_tokenizer,
                              cfg.replace(avg_bits=2.0, overrides=((r".", 8),)),
                              sensitivity_windows=2)


def quantized_names(model):
    from torch import nn

    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]


def test_plan_quantization_records_the_calibration_windows():
    from sinq_export import SinqConfig
    from sinq_export.nn import plan_quantization

    cfg = SinqConfig(calibrate=True, calibration_windows=2, calibration_length=64)
    plan = plan_quantization(tiny_llama(), char_tokenizer, cfg)
    assert plan.calibration.shape == (2, 64)
    assert plan.manifest["calibration"]["token_range"] == [65536, 65536 + 128]
    want = "bfloat16" if calibration.native_bf16() else "float32"
    assert plan.manifest["calibration"]["forward_dtype"] == want
    plan = plan_quantization(tiny_llama(), char_tokenizer, cfg.replace(calibration_dtype="float32"))
    assert plan.manifest["calibration"]["forward_dtype"] == "float32"


def test_the_method_configs_damping_reaches_gptq(monkeypatch):
    """``gptq_damp`` is what GPTQ regularises its Hessian with: more damping, codes closer to
    plain rounding (in the limit GPTQ is RTN on the same grid)."""
    from sinq_export.quant import gptq

    seen = []
    real = gptq.gptq_chunks
    monkeypatch.setattr("sinq_export.quant.core.gptq_chunks",
                        lambda *a, damp, **k: seen.append(damp) or real(*a, damp=damp, **k))
    torch.manual_seed(3)
    w = torch.randn(48, 64)
    x = torch.randn(256, 64) @ torch.randn(64, 64)  # correlated inputs: compensation matters
    stats = LayerStats(64)
    stats.add(x)
    plain = quantize(w, make_config("sinq", bits=3, group_size=32, awq=False, gptq=False),
                     calibration=stats).dequantize()
    moved = []
    for damp in (0.01, 1.0, 1000.0):
        cfg = make_config("sinq", bits=3, group_size=32, awq=False, gptq_damp=damp)
        moved.append(float((quantize(w, cfg, calibration=stats).dequantize() - plain).abs().sum()))
    assert seen == [0.01, 1.0, 1000.0]
    assert moved[0] > moved[1] > moved[2]


def test_forward_dtype_is_bfloat16_only_where_asked_or_native(monkeypatch):
    from sinq_export import SinqConfig
    from sinq_export.config import ConfigError

    assert calibration.forward_dtype("float32") == torch.float32
    assert calibration.forward_dtype("bfloat16") == torch.bfloat16
    for native in (True, False):
        monkeypatch.setattr(calibration, "native_bf16", lambda native=native: native)
        assert calibration.forward_dtype("auto") == (torch.bfloat16 if native else torch.float32)
    with pytest.raises(ConfigError, match="calibration_dtype"):
        SinqConfig(calibration_dtype="fp8")


@torch.no_grad()
def test_bfloat16_calibration_forwards_keep_float32_statistics_and_calibrate_as_well():
    """bfloat16 autocast changes only the rounding of each block's matmuls: the residual stream
    and the statistics stay float32, and the calibrated model is as close to the float one as
    with float32 forwards (and closer than calibration-free)."""
    import copy

    from sinq_export import SinqConfig, quantize_model

    model = tiny_llama()
    windows = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(2))
    ref = model(input_ids=windows).logits
    hidden, kwargs = calibration.capture_block_inputs(model, windows)
    block = model.model.layers[0]
    seen = {}

    def quantize_unit(_blk, stats):
        seen.update(stats)

    out = calibration.calibrate_block(block, hidden, kwargs, quantize_unit,
                                    ["self_attn.o_proj", "mlp.down_proj"], dtype=torch.bfloat16)
    exact = calibration._block_output(block, hidden, kwargs)
    assert out.dtype == torch.float32 and seen["mlp.down_proj"].xtx.dtype == torch.float32
    assert 0 < float((out - exact).abs().max()) < 0.05 * float(exact.abs().max())
    errs = {}
    for dtype in ("float32", "bfloat16", None):
        q = copy.deepcopy(model)
        cfg = SinqConfig(bits=3, group_size=32, calibrate=dtype is not None, lm_head_bits=4,
                         calibration_dtype=dtype or "auto")
        quantize_model(q, cfg, progress=False, calibration=windows)
        errs[dtype] = float((q(input_ids=windows).logits - ref).square().mean())
    assert errs["bfloat16"] < errs[None] and errs["float32"] < errs[None]
    assert errs["bfloat16"] < 1.5 * errs["float32"]


@pytest.mark.parametrize(("max_k", "length", "want"), [
    (0, 512, 8), (576, 512, 8), (1536, 512, 8),  # SmolLM2: the minimum covers it
    (2730, 512, 8), (2731, 512, 16), (4864, 512, 16),  # Qwen2.5-0.5B down_proj: 16 measured
    (8960, 512, 32), (18944, 512, 64), (10**6, 512, 64), (4864, 64, 64),
])
def test_default_window_count_covers_the_widest_input(max_k, length, want):
    """Every linear calibrated: 1.5 tokens per input channel, at least 8 windows."""
    from sinq_export.calibration.windows import default_window_count

    got = default_window_count(max_k, length)
    assert got == want
    assert got & (got - 1) == 0 and (got * length >= 1.5 * max_k or got == 64)


@pytest.mark.parametrize(("max_k", "length", "want"), [
    (576, 512, 4), (3584, 512, 4), (18944, 512, 4), (896, 64, 32), (896, 3000, 1)])
def test_a_head_alone_gets_a_fixed_budget_of_text(max_k, length, want):
    """Calibrating the head alone: 2048 tokens whatever its K (docs/presets.md)."""
    from sinq_export.calibration.windows import HEAD_TOKENS, default_window_count

    got = default_window_count(max_k, length, head_only=True)
    assert got == want and (got - 1) * length < HEAD_TOKENS <= got * length


def test_plan_quantization_sizes_the_calibration_for_what_it_calibrates():
    """Without an explicit count: enough windows for the widest *calibrated* linear with
    ``calibrate``, `HEAD_TOKENS` of text for the head alone (``calibrate_head``)."""
    from sinq_export import SinqConfig
    from sinq_export.calibration.windows import default_window_count
    from sinq_export.nn import plan_quantization

    model = tiny_llama()
    widest = max(m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    head = model.lm_head.in_features
    for cfg, want in ((SinqConfig(calibrate=True, calibration_length=16),
                       default_window_count(widest, 16)),
                      (SinqConfig(calibrate_head=True, lm_head_bits=4, calibration_length=16),
                       default_window_count(head, 16, head_only=True))):
        plan = plan_quantization(model, char_tokenizer, cfg)
        assert plan.calibration.shape == (want, 16)
        assert plan.manifest["calibration"]["n_windows"] == plan.calibration.shape[0]


# ------------------------------------------------------------------------------ energy refit


def numpy_refit(x, imp, bits, iters):
    """Per row of ``x``: min/max, then ``iters`` weighted least-squares scale refits (codes
    re-rounded each time, zero point fixed); the scale of least weighted error wins."""
    qmax = 2**bits - 1
    out_s, out_z = [], []
    for row, w in zip(x.astype(np.float64), imp.astype(np.float64)):
        lo, hi = min(row.min(), 0.0), max(row.max(), 0.0)
        s = max((hi - lo) / qmax, 1e-10)
        z = np.clip(np.round(-lo / s), 0, qmax)
        best, cur = None, s
        for step in range(iters + 1):
            d = np.clip(np.round(row / cur + z), 0, qmax) - z
            e = (w * (row - d * cur) ** 2).sum()
            if best is None or e < best[0]:
                best = (e, cur)
            den = (w * d * d).sum()
            if step < iters and den > 0 and (w * row * d).sum() / den > 1e-10:
                cur = (w * row * d).sum() / den
        out_s.append(best[1])
        out_z.append(z)
    return np.array(out_s), np.array(out_z)


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 6), seed=st.integers(0, 10_000), scale=st.floats(1e-3, 1e2),
       iters=st.integers(0, 4))
def test_energy_refit_matches_numpy_reference_and_never_loses(bits, seed, scale, iters):
    from sinq_export.quant.rtn import refit_params

    rng = np.random.default_rng(seed)
    x = (rng.standard_t(4, (8, 32)) * scale).astype(np.float32)
    imp = np.exp(rng.normal(0, 2, (8, 32))).astype(np.float32)  # energies spread like a model's
    s, z = refit_params(torch.from_numpy(x), bits, torch.from_numpy(imp), iters)
    rs, rz = numpy_refit(x, imp, bits, iters)
    np.testing.assert_allclose(s.numpy(), rs, rtol=2e-4)
    ms, mz = minmax_params(torch.from_numpy(x), bits)
    np.testing.assert_array_equal(z.numpy(), rz)
    np.testing.assert_array_equal(z.numpy(), mz.numpy())  # never clips: min/max's zero point

    def err(s_):
        q = np.clip(np.round(x / s_[:, None] + rz[:, None]), 0, 2**bits - 1)
        return (imp * (x - (q - rz[:, None]) * s_[:, None]) ** 2).sum(1)

    assert (err(s.numpy()) <= err(ms.numpy()) * (1 + 1e-5) + 1e-12).all()


def test_energy_only_stats_are_the_hessian_diagonal():
    x = torch.randn(3, 40, 24, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 5, 24)
    full, diag = LayerStats(24), LayerStats(24, full=False)
    for part in x:
        full.add(part)
        diag.add(part)
    torch.testing.assert_close(diag.diag(), full.hessian().diagonal())
    torch.testing.assert_close(diag.abs_mean(), full.abs_mean())
    assert diag.xtx.numel() == 0
    with pytest.raises(ValueError, match="E\\[x\\^2\\]"):
        diag.hessian()


def test_energy_refit_needs_energies_and_is_off_where_calibrated():
    from sinq_export import SinqConfig
    from sinq_export.config import ConfigError

    cfg = SinqConfig(lm_head_bits=4, calibrate_head=True)
    decoder, head = cfg.method_config("model.layers.0.mlp.down_proj", 4), cfg.method_config("lm_head", 4)
    assert (decoder.scale_refit, decoder.awq, decoder.gptq) == (3, False, False)
    assert (head.scale_refit, head.awq, head.gptq) == (0, True, True)
    assert cfg.replace(energy_refit=0).method_config("model.layers.0.mlp.down_proj", 4).scale_refit == 0
    for bad in ({"energy_refit": -1}, {"energy_refit": 1.5}, {"probe_tokens": 8}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            SinqConfig(**bad)
    # without energies the refit does nothing: weighted by t^2 alone it fits the bulk, which hurts
    w = outlier_matrix(64, 128)
    refit = SinqConfig(group_size=32).method_config("x", 4)
    plain = SinqConfig(group_size=32, energy_refit=0).method_config("x", 4)
    assert torch.equal(quantize(w, refit).packed, quantize(w, plain).packed)
    energies = LayerStats(128, full=False)
    energies.add(torch.randn(256, 128, generator=torch.Generator().manual_seed(0))
                 * torch.exp(torch.randn(128, generator=torch.Generator().manual_seed(1))))
    assert not torch.equal(quantize(w, refit, calibration=energies).scales,
                           quantize(w, plain).scales)


def test_probe_window_is_reproducible_random_ids():
    a, info = windows.probe_window(320, 64)
    b, _ = windows.probe_window(320, 64)
    assert a.shape == (1, 64) and torch.equal(a, b) and 0 <= int(a.min()) and int(a.max()) < 320
    assert len(set(a.flatten().tolist())) > 32  # random, not a constant
    assert info["tokens"] == 64 and info["seed"] == windows.PROBE_SEED


@torch.no_grad()
def test_default_quantize_model_probes_a_causal_lm_and_plans_the_probe():
    import copy

    from sinq_export import SinqConfig, quantize_model
    from sinq_export.nn import plan_quantization, quantized_layers

    model = tiny_llama()
    runs = {}
    for refit in (0, 3):
        q = copy.deepcopy(model)
        quantize_model(q, SinqConfig(group_size=32, energy_refit=refit, probe_tokens=64),
                       progress=False)
        runs[refit] = {n: m.record for n, m in quantized_layers(q).items()}
    assert runs[0].keys() == runs[3].keys()
    assert all(torch.equal(runs[0][n].zero_points, runs[3][n].zero_points)
               for n in runs[0])  # the refit keeps min/max's zero points
    assert any(not torch.equal(runs[0][n].scales, runs[3][n].scales) for n in runs[0])
    plan = plan_quantization(model, None, SinqConfig(group_size=32, probe_tokens=64))
    assert plan.calibration.shape == (1, 64) and plan.manifest["probe"]["tokens"] == 64
    assert "calibration" not in plan.manifest
    assert plan_quantization(model, None, SinqConfig(energy_refit=0)).calibration is None


@pytest.mark.slow
@torch.no_grad()
def test_energy_refit_beats_weight_only_sinq_on_the_real_model(smollm2):
    """SmolLM2 at 3 bits on one evaluation window: the default (energies from 256 random ids)
    against weight-only SINQ (energy_refit=0). Measured 42.6 vs 61.4 on four windows."""
    import copy

    from sinq_export import SinqConfig, quantize_model
    from sinq_export.eval import perplexity_torch, text_windows

    model, tok = smollm2
    windows = text_windows(tok, "wikipedia", 1, 512)
    ppl = {}
    for refit in (0, 3):
        q = copy.deepcopy(model)
        quantize_model(q, SinqConfig(bits=3, energy_refit=refit), progress=False)
        ppl[refit] = perplexity_torch(q, windows).ppl
    assert ppl[3] < 0.85 * ppl[0], ppl


@pytest.mark.parametrize(("method", "knobs"), [
    ("rtn", {}), ("sinq", {}), ("sinq", {"kurtosis_gate": 5.0}), ("sinq", {"kurtosis_gate": 1e3}),
    ("sinq", {"sinkhorn_iters": 0})])
@pytest.mark.parametrize("calibrated", [False, True])
def test_a_method_declares_whether_its_record_has_a_t(method, knobs, calibrated):
    """The export plans the graph's t inputs from `yields_col_scale` before quantizing: the
    declaration must be what the handler then does, whatever the gate, the iterations and
    the calibration."""
    from sinq_export.quant.methods import yields_col_scale

    w = outlier_matrix(64, 128)
    cfg = make_config(method, bits=3, group_size=32, **knobs)
    stats = None
    if calibrated:
        stats = LayerStats(128)
        stats.add(torch.randn(256, 128, generator=torch.Generator().manual_seed(0)))
    loads = []
    declared = yields_col_scale(cfg, lambda: loads.append(1) or w, calibrated=calibrated)
    assert declared == (quantize(w, cfg, calibration=stats).col_scale is not None)
    assert len(loads) <= 1 and (loads == [] or "kurtosis_gate" in knobs)
