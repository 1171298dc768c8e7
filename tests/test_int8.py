"""The int8-activation emulation (`quant.int8`) against a real onnxruntime MatMulNBits session.

onnxruntime at accuracy_level 4 must agree with ``int8_activations(x) @ W_hat^T`` to float
summation rounding, far closer than with the float product (which differs by the int8 error
itself): that proves the emulation models the kernel (block size, scale, rounding), not merely
something of the same size.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from sinq_export.quant import packing
from sinq_export.quant.int8 import int8_activations, int8_error, loudest_channels, relative_error


def _matmulnbits(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, bits: int,
                 block: int, level: int) -> ort.InferenceSession:
    n, k = codes.shape
    packed = packing.pack_codes(torch.from_numpy(codes), bits, block).numpy()
    inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "scales")]
    inputs = ["A", "B", "scales"]
    if zeros is not None:
        zp = packing.pack_zero_points(torch.from_numpy(zeros), bits).numpy()
        inits.append(numpy_helper.from_array(zp, "zp"))
        inputs.append("zp")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=k, N=n,
                            bits=bits, block_size=block, accuracy_level=level)
    return _session([node], inits, k, n)


def _session(nodes: list, inits: list, k: int, n: int) -> ort.InferenceSession:
    """One-thread CPU session of the graph ``A [M, k] -> nodes -> Y [M, n]``."""
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT,
                                                                         ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _dequantized(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, bits: int,
                 block: int) -> torch.Tensor:
    n, k = codes.shape
    z = np.full(scales.shape, 1 << (bits - 1), np.float32) if zeros is None else zeros.astype(np.float32)
    col = np.arange(k) // block
    return torch.from_numpy((codes.astype(np.float32) - z[:, col]) * scales[:, col])


@settings(deadline=None, max_examples=24)
@given(bits=st.sampled_from([4, 8]), block=st.sampled_from([16, 32, 64, 128]),
       k_blocks=st.integers(1, 6), tail=st.sampled_from([0, 0, 8]), n=st.integers(2, 24),
       m=st.integers(1, 5), zero_points=st.booleans(), outliers=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_emulation_matches_onnxruntime_acc4(bits, block, k_blocks, tail, n, m, zero_points,
                                            outliers, seed):
    rng = np.random.default_rng(seed)
    k = block * k_blocks + tail
    nb = packing.n_blocks(k, block)
    codes = rng.integers(0, 1 << bits, size=(n, k), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.1, size=(n, nb)).astype(np.float32)
    zeros = rng.integers(0, 1 << bits, size=(n, nb), dtype=np.uint8) if zero_points else None
    x = rng.standard_normal((m, k)).astype(np.float32)
    if outliers:  # a few massive channels: most of each block's entries lose their bits
        x[:, rng.choice(k, size=max(1, k // 40), replace=False)] *= 300.0
    if k >= 3:
        x[0, :3] = 0.0  # an all-zero prefix, and a whole zero row when M > 1
    if m > 1:
        x[-1] = 0.0
    w = _dequantized(codes, scales, zeros, bits, block)
    got = torch.from_numpy(_matmulnbits(codes, scales, zeros, bits, block, 4).run(
        None, {"A": x})[0])
    emulated = int8_activations(torch.from_numpy(x), block).double() @ w.double().T
    exact = torch.from_numpy(x).double() @ w.double().T
    assert relative_error(emulated, got.double()) <= 2e-5
    if outliers:  # the test can fail: the kernel really quantizes, and by this much
        assert relative_error(exact, got.double()) > 50 * relative_error(emulated, got.double())
        assert int8_error(torch.from_numpy(x), w, block) == pytest.approx(
            relative_error(exact, got.double()), rel=1e-2)


def test_acc0_is_not_quantized():
    """The control: at accuracy level 0 onnxruntime computes in float (the emulation's error
    would show)."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, size=(8, 64), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.1, size=(8, 2)).astype(np.float32)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    x[:, 5] *= 500
    w = _dequantized(codes, scales, None, 4, 32)
    got = torch.from_numpy(_matmulnbits(codes, scales, None, 4, 32, 0).run(None, {"A": x})[0])
    exact = torch.from_numpy(x) @ w.T
    assert relative_error(exact, got) < 1e-5 < int8_error(torch.from_numpy(x), w, 32)


@settings(deadline=None, max_examples=30)
@given(block=st.sampled_from([16, 32, 64]), k=st.integers(1, 200), seed=st.integers(0, 2**31 - 1))
def test_int8_activations_are_an_int8_grid_per_block(block, k, seed):
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal((3, k)).astype(np.float32))
    y = int8_activations(x, block)
    assert y.shape == x.shape
    for start in range(0, k, block):
        xb, yb = x[:, start:start + block], y[:, start:start + block]
        amax = xb.abs().amax(-1, keepdim=True)
        steps = yb / (amax / 127)
        assert torch.allclose(steps, steps.round(), atol=1e-3)  # on the block's int8 grid
        assert (steps.abs() <= 127 + 1e-3).all()
        assert ((yb - xb).abs() <= amax / 254 * (1 + 1e-5) + 1e-7).all()  # round to nearest


def test_t_is_applied_before_quantization():
    x = torch.ones(2, 64)
    x[:, 0] = 100.0
    w = torch.randn(4, 64)
    t = torch.ones(64)
    t[0] = 1e-2  # the scale that shrinks the outlier makes int8 exact on this input
    assert int8_error(x, w, 64, t) < 1e-6 < int8_error(x, w, 64)


@settings(deadline=None, max_examples=25)
@given(block=st.sampled_from([16, 32]), k=st.integers(2, 96), n=st.integers(1, 12),
       seed=st.integers(0, 2**31 - 1))
def test_int8_error_is_the_output_difference_and_takes_a_computed_output(block, k, n, seed):
    """The error is computed as one product (rounding times weight) and may be given the
    output a forward already computed: both agree with the difference of the two outputs."""
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal((5, k)).astype(np.float32))
    x[:, int(rng.integers(k))] *= 40.0  # a loud channel: a real int8 error
    w = torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32))
    t = torch.from_numpy(rng.uniform(0.5, 2.0, k).astype(np.float32))
    xt = (x * t).double()
    ref = xt @ w.double().T
    test = int8_activations(x * t, block).double() @ w.double().T
    expected = relative_error(ref, test)
    assert int8_error(x, w, block, t) == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert int8_error(x, w, block, t, reference=ref.float()) == pytest.approx(
        expected, rel=1e-4, abs=1e-7)
    assert int8_error(x, w, block, t, reference=2 * ref.float()) == pytest.approx(
        expected / 2, rel=1e-4, abs=1e-7)



def _split_matmulnbits(codes: np.ndarray, scales: np.ndarray, block: int, exact: np.ndarray
                       ) -> ort.InferenceSession:
    """``MatMulNBits(A * mask)`` at level 4 plus ``Gather(A, exact) @ W[:, exact]^T``: the
    graph `export.builder.SinqMatMul` emits for a node with exact channels."""
    n, k = codes.shape
    w = _dequantized(codes, scales, None, 4, block).numpy()
    mask = np.ones(k, np.float32)
    mask[exact] = 0.0
    packed = packing.pack_codes(torch.from_numpy(codes), 4, block).numpy()
    inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "scales"),
             numpy_helper.from_array(mask, "mask"), numpy_helper.from_array(exact, "index"),
             numpy_helper.from_array(np.ascontiguousarray(w[:, exact].T), "exact_w")]
    nodes = [helper.make_node("Mul", ["A", "mask"], ["Aq"]),
             helper.make_node("MatMulNBits", ["Aq", "B", "scales"], ["Yq"], domain="com.microsoft",
                              K=k, N=n, bits=4, block_size=block, accuracy_level=4),
             helper.make_node("Gather", ["A", "index"], ["Ae"], axis=-1),
             helper.make_node("MatMul", ["Ae", "exact_w"], ["Ye"]),
             helper.make_node("Add", ["Yq", "Ye"], ["Y"])]
    return _session(nodes, inits, k, n)


@settings(deadline=None, max_examples=16)
@given(block=st.sampled_from([16, 32, 64]), k_blocks=st.integers(1, 4), n=st.integers(2, 16),
       m=st.integers(1, 4), loud=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_exact_channels_emulation_matches_onnxruntime(block, k_blocks, n, m, loud, seed):
    """Loud channels taken out of the int8 input and multiplied in float beside the node:
    `loudest_channels` finds them, ``int8_activations(..., exact_channels=)`` is what
    onnxruntime computes, and the quiet channels get their bits back."""
    rng = np.random.default_rng(seed)
    k = block * k_blocks
    codes = rng.integers(0, 16, size=(n, k), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.1, size=(n, packing.n_blocks(k, block))).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    channels = np.sort(rng.choice(k, size=min(loud, k), replace=False))
    x[:, channels] = np.copysign(300.0 * (1.0 + np.abs(x[:, channels])), x[:, channels])
    xt = torch.from_numpy(x)
    exact = loudest_channels(xt, len(channels))
    assert exact.tolist() == channels.tolist()
    w = _dequantized(codes, scales, None, 4, block)
    got = torch.from_numpy(_split_matmulnbits(codes, scales, block, exact.numpy()).run(
        None, {"A": x})[0]).double()
    emulated = int8_activations(xt, block, exact).double() @ w.double().T
    assert relative_error(emulated, got) <= 2e-5
    # exact channels come back unrounded; every other one rounds on its block's grid set by
    # the quiet channels alone (the loud ones no longer set the step)
    xe = int8_activations(xt, block, exact)
    assert torch.equal(xe[:, exact], xt[:, exact])
    quiet = xt.clone()
    quiet[:, exact] = 0.0
    step = quiet.reshape(m, -1, block).abs().amax(-1, keepdim=True) / 127
    err = (xe - xt).abs()
    err[:, exact] = 0.0
    assert (err.reshape(m, -1, block) <= step / 2 * (1 + 1e-5) + 1e-7).all()
