"""sinq.ops::SinqMatMulNBits: native CPU kernel vs NumPy reference vs stock MatMulNBits.

The library is built by `pip install -e .` (setup.py); if it is missing here the first test
that needs it builds it from the checkout (`runtime_ops.ensure_built`).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from sinq_export import runtime_ops as ro
from sinq_export.quant import packing

CPU = ["CPUExecutionProvider"]
ALL_BITS = (2, 3, 4, 5, 6, 7, 8)
BLOCKS = (16, 32, 64, 128, 256)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def lib() -> Path:
    try:
        return ro.ensure_built()
    except ro.RuntimeOpsUnavailable as e:  # pragma: no cover - shows the build problem clearly
        pytest.fail(f"custom-op library unavailable: {e}")


def make_weights(bits, bs, k, n, seed=0, zp=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (n, k), generator=g)
    nb = packing.n_blocks(k, bs)
    z = torch.randint(0, 2**bits, (n, nb), generator=g)
    s = torch.rand(n, nb, generator=g) * 0.1 + 0.01
    packed = packing.pack_codes(q, bits, bs).numpy()
    zps = packing.pack_zero_points(z, bits).numpy() if zp else None
    return packed, s.numpy().astype(np.float32), zps


def _model(nodes, inits, a_type=TensorProto.FLOAT, a_shape=None, y_type=None):
    y_type = a_type if y_type is None else y_type
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("A", a_type, a_shape)],
        [helper.make_tensor_value_info("Y", y_type, None)],
        inits,
    )
    m = helper.make_model(
        g,
        opset_imports=[
            helper.make_opsetid("", 21),
            helper.make_opsetid(ro.DOMAIN, 1),
            helper.make_opsetid("com.microsoft", 1),
        ],
        ir_version=10,
    )
    return m.SerializeToString()


def sinq_model(
    bits, bs, k, n, packed, scales, zp=None, col=None, bias=None, dtype=np.float32, attrs=None, a_shape=None
):
    t = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales.astype(dtype), "S")]
    names = ["A", "B", "S", "", "", ""]
    if zp is not None:
        inits.append(numpy_helper.from_array(zp, "Z"))
        names[3] = "Z"
    if col is not None:
        inits.append(numpy_helper.from_array(col.astype(dtype), "C"))
        names[4] = "C"
    if bias is not None:
        inits.append(numpy_helper.from_array(bias.astype(dtype), "bias"))
        names[5] = "bias"
    kw = {"K": k, "N": n, "bits": bits, "block_size": bs, **(attrs or {})}
    node = helper.make_node(ro.OP_TYPE, [x for x in names], ["Y"], domain=ro.DOMAIN, **kw)
    while node.input and node.input[-1] == "":
        node.input.pop()
    return _model([node], inits, t, a_shape)


def stock_model(bits, bs, k, n, packed, scales, zp=None, col=None, bias=None):
    """Mul(A, col_scale) -> com.microsoft::MatMulNBits -> Add(bias), accuracy_level 0."""
    inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "S")]
    nodes, x = [], "A"
    if col is not None:
        inits.append(numpy_helper.from_array(col, "C"))
        nodes.append(helper.make_node("Mul", ["A", "C"], ["AC"]))
        x = "AC"
    mm_in = [x, "B", "S"]
    if zp is not None:
        inits.append(numpy_helper.from_array(zp, "Z"))
        mm_in.append("Z")
    out = "Y" if bias is None else "Y0"
    nodes.append(
        helper.make_node(
            "MatMulNBits",
            mm_in,
            [out],
            domain="com.microsoft",
            K=k,
            N=n,
            bits=bits,
            block_size=bs,
            accuracy_level=0,
        )
    )
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "bias"))
        nodes.append(helper.make_node("Add", ["Y0", "bias"], ["Y"]))
    return _model(nodes, inits)


def run(model_bytes, a, threads=2):
    so = ro.session_options(intra_op_num_threads=threads)
    sess = ort.InferenceSession(model_bytes, so, providers=CPU)
    return sess.run(None, {"A": a})[0]


def rel_err(y, ref):
    y = np.asarray(y, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30))


def odd_k(bs):
    return 2 * bs + bs // 2 + 3  # never a multiple of the block size


def case(bits, bs, m, seed, n=37, zp=True, col=True, bias=True):
    k = odd_k(bs)
    packed, scales, zps = make_weights(bits, bs, k, n, seed=seed, zp=zp)
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, k)).astype(np.float32)
    c = rng.uniform(0.5, 2.0, k).astype(np.float32) if col else None
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    return k, n, packed, scales, zps, a, c, b


def _isa_supported(isa: str) -> bool:
    if isa == "base":
        return True
    flags = ""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    need = {"avx2": ("avx2", "fma"), "avx512": ("avx512f", "avx512bw")}[isa]
    return all(f" {f}" in flags for f in need)


# --------------------------------------------------------------------------------------------
# library wiring
# --------------------------------------------------------------------------------------------
def test_session_options_registers_library(lib):
    so = ro.session_options()
    assert isinstance(so, ort.SessionOptions)
    assert ro.library_path() == lib and lib.is_file()
    so2 = ro.session_options(ort.SessionOptions(), intra_op_num_threads=3)
    assert so2.intra_op_num_threads == 3


def test_missing_library_error_says_how_to_build(monkeypatch, tmp_path):
    monkeypatch.setattr(ro, "_PKG_DIR", tmp_path)
    monkeypatch.delenv("SINQ_OPS_LIBRARY", raising=False)
    with pytest.raises(ro.RuntimeOpsUnavailable, match="python -m sinq_export.runtime_ops build"):
        ro.library_path()
    assert not ro.is_available()
    with pytest.raises(ro.RuntimeOpsUnavailable, match="build"):
        ro.session_options()


def test_incompatible_library_error_says_how_to_rebuild(monkeypatch, tmp_path):
    bogus = tmp_path / "libsinq_ops.so"
    bogus.write_bytes(b"\x7fELF not really a library")
    monkeypatch.setenv("SINQ_OPS_LIBRARY", str(bogus))
    with pytest.raises(ro.RuntimeOpsUnavailable, match="--force"):
        ro.session_options()


def test_cuda_library_wiring(monkeypatch, tmp_path):
    monkeypatch.setattr(ro, "_PKG_DIR", tmp_path)
    monkeypatch.delenv("SINQ_OPS_CUDA_LIBRARY", raising=False)
    with pytest.raises(ro.RuntimeOpsUnavailable, match="CUDA"):
        ro.library_path(cuda=True)
    fake = tmp_path / ro.CUDA_LIB_NAME
    fake.write_bytes(b"")
    assert ro.library_path(cuda=True) == fake


def test_make_node():
    node = ro.make_node(["A", "B", "S", "", "C", ""], "Y", K=10, N=4, bits=3, block_size=16)
    assert node.domain == ro.DOMAIN and node.op_type == ro.OP_TYPE
    assert list(node.input) == ["A", "B", "S", "", "C"]
    with pytest.raises(ValueError):
        ro.make_node(["A", "B"], "Y", K=10, N=4, bits=3, block_size=16)


# --------------------------------------------------------------------------------------------
# correctness: native op == NumPy reference, all bits x block sizes x M, K % bs != 0
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("bs", BLOCKS)
def test_op_matches_reference(lib, bits, bs):
    for m in (1, 7, 64):
        k, n, packed, scales, zps, a, c, b = case(bits, bs, m, seed=bits * 1000 + bs + m)
        y = run(sinq_model(bits, bs, k, n, packed, scales, zps, c, b), a)
        ref = ro.reference_sinq_matmul(a, packed, scales, zps, c, b, K=k, N=n, bits=bits, block_size=bs)
        assert y.shape == (m, n) and y.dtype == np.float32
        assert rel_err(y, ref) <= 1e-5, (bits, bs, m)


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
def test_every_instruction_set_path(lib, isa, monkeypatch):
    monkeypatch.setenv("SINQ_OPS_ISA", isa)
    if not _isa_supported(isa):  # no skip: forcing a path the CPU lacks must fail loudly
        k, n, packed, scales, zps, a, c, b = case(4, 16, 1, seed=1, n=29)
        with pytest.raises(Exception, match="lacks"):
            run(sinq_model(4, 16, k, n, packed, scales, zps, c, b), a)
        return
    for bits in ALL_BITS:
        for bs in (16, 128):
            for m in (1, 5, 19):  # decode path (M <= 8) and prefill path with M padding
                k, n, packed, scales, zps, a, c, b = case(bits, bs, m, seed=bits + bs + m, n=29)
                y = run(sinq_model(bits, bs, k, n, packed, scales, zps, c, b), a)
                ref = ro.reference_sinq_matmul(
                    a, packed, scales, zps, c, b, K=k, N=n, bits=bits, block_size=bs
                )
                assert rel_err(y, ref) <= 1e-5, (isa, bits, bs, m)


def test_unknown_isa_is_a_clear_error(lib, monkeypatch):
    monkeypatch.setenv("SINQ_OPS_ISA", "neon9000")
    k, n, packed, scales, zps, a, c, b = case(4, 32, 1, seed=1)
    with pytest.raises(Exception, match="SINQ_OPS_ISA"):
        run(sinq_model(4, 32, k, n, packed, scales, zps), a)


@pytest.mark.parametrize("bits", (2, 4, 8))
@pytest.mark.parametrize("bs", BLOCKS)
def test_op_matches_stock_matmulnbits(lib, bits, bs):
    for m in (1, 7, 64):
        k, n, packed, scales, zps, a, c, b = case(bits, bs, m, seed=7 * bits + bs + m)
        ours = run(sinq_model(bits, bs, k, n, packed, scales, zps, c, b), a)
        stock = run(stock_model(bits, bs, k, n, packed, scales, zps, c, b), a)
        assert rel_err(ours, stock) <= 1e-5, (bits, bs, m)
        # default zero point (2^(bits-1)) when the input is absent, no col_scale / bias
        ours = run(sinq_model(bits, bs, k, n, packed, scales), a)
        stock = run(stock_model(bits, bs, k, n, packed, scales), a)
        assert rel_err(ours, stock) <= 1e-5, (bits, bs, m, "no zp")


@pytest.mark.parametrize("zp", [False, True])
@pytest.mark.parametrize("col", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_optional_input_combinations(lib, zp, col, bias):
    bits, bs = 3, 32
    k, n, packed, scales, zps, a, c, b = case(bits, bs, 3, seed=5, zp=zp, col=col, bias=bias)
    y = run(sinq_model(bits, bs, k, n, packed, scales, zps, c, b), a)
    ref = ro.reference_sinq_matmul(a, packed, scales, zps, c, b, K=k, N=n, bits=bits, block_size=bs)
    assert rel_err(y, ref) <= 1e-5


def test_leading_batch_dims_and_empty_batch(lib):
    bits, bs = 5, 64
    k, n, packed, scales, zps, a, c, b = case(bits, bs, 6, seed=11)
    model = sinq_model(bits, bs, k, n, packed, scales, zps, c, b)
    a3 = a.reshape(2, 3, k)
    y = run(model, a3)
    assert y.shape == (2, 3, n)
    ref = ro.reference_sinq_matmul(a3, packed, scales, zps, c, b, K=k, N=n, bits=bits, block_size=bs)
    assert rel_err(y, ref) <= 1e-5
    y1 = run(model, a[0])  # 1-D A: [K] -> [N]
    assert y1.shape == (n,)
    assert rel_err(y1, ref.reshape(6, n)[0]) <= 1e-5
    y0 = run(model, np.zeros((0, 4, k), np.float32))
    assert y0.shape == (0, 4, n)


def test_float16(lib):
    bits, bs = 3, 64
    k, n, packed, scales, zps, a, c, b = case(bits, bs, 4, seed=3)
    s16 = scales.astype(np.float16)
    c16, b16, a16 = c.astype(np.float16), b.astype(np.float16), a.astype(np.float16)
    y = run(sinq_model(bits, bs, k, n, packed, s16, zps, c16, b16, dtype=np.float16), a16)
    assert y.dtype == np.float16 and y.shape == (4, n)
    ref = ro.reference_sinq_matmul(
        a16.astype(np.float32),
        packed,
        s16.astype(np.float32),
        zps,
        c16.astype(np.float32),
        b16.astype(np.float32),
        K=k,
        N=n,
        bits=bits,
        block_size=bs,
    )
    assert rel_err(y, ref) <= 2e-3


def test_threads_do_not_change_the_result(lib):
    bits, bs = 6, 32
    k, n, packed, scales, zps, a, c, b = case(bits, bs, 9, seed=2, n=301)
    model = sinq_model(bits, bs, k, n, packed, scales, zps, c, b)
    y1, y4 = run(model, a, threads=1), run(model, a, threads=4)
    np.testing.assert_array_equal(y1, y4)
    np.testing.assert_array_equal(run(model, a[:1], threads=1), run(model, a[:1], threads=4))


def test_record_helper_matches_reference(lib):
    from sinq_export.quant.record import QuantizedWeight

    bits, bs, k, n = 3, 32, 70, 12
    packed, scales, zps = make_weights(bits, bs, k, n, seed=4)
    col = np.linspace(0.5, 1.5, k).astype(np.float32)
    qw = QuantizedWeight(
        torch.from_numpy(packed),
        torch.from_numpy(scales),
        torch.from_numpy(zps),
        torch.from_numpy(col),
        bits,
        bs,
        (n, k),
    )
    a = np.random.default_rng(0).standard_normal((2, k)).astype(np.float32)
    expect = a.astype(np.float64) @ qw.dequantize().double().numpy().T
    assert rel_err(ro.reference_from_record(a, qw), expect) <= 1e-5


# --------------------------------------------------------------------------------------------
# bad input: clear errors at session creation or Run, never a crash or garbage
# --------------------------------------------------------------------------------------------
def _weights(bits=3, bs=32, k=70, n=12):
    packed, scales, zps = make_weights(bits, bs, k, n, seed=9)
    return bits, bs, k, n, packed, scales, zps


def _session(model):
    return ort.InferenceSession(model, ro.session_options(), providers=CPU)


@pytest.mark.parametrize(
    "attrs, pattern",
    [
        ({"bits": 1}, "bits=1"),
        ({"bits": 9}, "bits=9"),
        ({"block_size": 24}, "block_size=24"),
        ({"block_size": 8}, "block_size=8"),
        ({"K": 0}, "K=0"),
        ({"K": 71}, None),  # same block count as K=70: caught at Run via A's last dimension
        ({"K": 200}, r"input 1 \(B\) has shape"),
        ({"N": 13}, r"input 1 \(B\) has shape"),
    ],
)
def test_bad_attributes_fail_at_session_creation(lib, attrs, pattern):
    bits, bs, k, n, packed, scales, zps = _weights()
    if attrs.get("K") == 71:  # same block count: caught at Run through A's last dimension
        model = sinq_model(bits, bs, k, n, packed, scales, zps, attrs=attrs)
        sess = _session(model)
        with pytest.raises(Exception, match="last dimension must equal K=71"):
            sess.run(None, {"A": np.zeros((1, k), np.float32)})
        return
    with pytest.raises(Exception, match=pattern):
        _session(sinq_model(bits, bs, k, n, packed, scales, zps, attrs=attrs))


def test_missing_attribute(lib):
    bits, bs, k, n, packed, scales, zps = _weights()
    node = helper.make_node(ro.OP_TYPE, ["A", "B", "S"], ["Y"], domain=ro.DOMAIN, K=k, N=n, bits=3)
    model = _model([node], [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "S")])
    with pytest.raises(Exception, match="block_size"):
        _session(model)


@pytest.mark.parametrize(
    "which, pattern",
    [
        ("scales", r"input 2 \(scales\) has shape"),
        ("zp", r"input 3 \(zero_points\) has shape"),
        ("col", r"input 4 \(col_scale\) has shape"),
        ("bias", r"input 5 \(bias\) has shape"),
        ("packed", r"input 1 \(B\) has shape"),
    ],
)
def test_bad_initializer_shapes(lib, which, pattern):
    bits, bs, k, n, packed, scales, zps = _weights()
    col = np.ones(k, np.float32)
    bias = np.zeros(n, np.float32)
    if which == "scales":
        scales = scales[:, :-1].copy()
    elif which == "zp":
        zps = np.concatenate([zps, zps], axis=1)
    elif which == "col":
        col = np.ones(k + 1, np.float32)
    elif which == "bias":
        bias = np.zeros(n + 1, np.float32)
    elif which == "packed":
        packed = packed[:, :, :-1].copy()
    with pytest.raises(Exception, match=pattern):
        _session(sinq_model(bits, bs, k, n, packed, scales, zps, col, bias))


def test_bad_runtime_shapes(lib):
    """Weights fed as graph inputs (no static shapes): checked at Run."""
    bits, bs, k, n, packed, scales, zps = _weights()
    node = helper.make_node(
        ro.OP_TYPE, ["A", "B", "S", "Z"], ["Y"], domain=ro.DOMAIN, K=k, N=n, bits=bits, block_size=bs
    )
    g = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info("A", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("B", TensorProto.UINT8, None),
            helper.make_tensor_value_info("S", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("Z", TensorProto.UINT8, None),
        ],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
    )
    m = helper.make_model(
        g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(ro.DOMAIN, 1)], ir_version=10
    )
    sess = _session(m.SerializeToString())
    a = np.ones((2, k), np.float32)
    feeds = {"A": a, "B": packed, "S": scales, "Z": zps}
    y = sess.run(None, feeds)[0]
    ref = ro.reference_sinq_matmul(a, packed, scales, zps, K=k, N=n, bits=bits, block_size=bs)
    assert rel_err(y, ref) <= 1e-5
    bad = [
        ({"A": np.ones((2, k + 1), np.float32)}, "last dimension must equal K"),
        ({"A": np.ones((), np.float32)}, "last dimension must equal K"),
        ({"B": packed.reshape(n, -1)}, r"input 1 \(B\) has shape"),
        ({"S": scales.reshape(-1)[:-1].copy()}, r"input 2 \(scales\) has shape"),
        ({"Z": zps[:-1].copy()}, r"input 3 \(zero_points\) has shape"),
    ]
    for change, pattern in bad:
        with pytest.raises(Exception, match=pattern):
            sess.run(None, {**feeds, **change})
    # flat scales / zero points (MatMulNBits also accepts these) are fine
    y2 = sess.run(None, {**feeds, "S": scales.reshape(-1), "Z": zps.reshape(-1)})[0]
    np.testing.assert_array_equal(y, y2)


def test_wrong_dtypes_are_rejected(lib):
    bits, bs, k, n, packed, scales, zps = _weights()
    # int8 codes: no kernel matches the type constraints -> session creation fails
    node = helper.make_node(
        ro.OP_TYPE, ["A", "B", "S"], ["Y"], domain=ro.DOMAIN, K=k, N=n, bits=bits, block_size=bs
    )
    model = _model(
        [node], [numpy_helper.from_array(packed.astype(np.int8), "B"), numpy_helper.from_array(scales, "S")]
    )
    with pytest.raises(Exception, match=r"tensor\(int8\).*\(B\).*SinqMatMulNBits"):
        _session(model)
    # double activations fed to a float model
    sess = _session(sinq_model(bits, bs, k, n, packed, scales))
    with pytest.raises(Exception, match=r"Actual: \(tensor\(double\)\)"):
        sess.run(None, {"A": np.ones((1, k), np.float64)})
    # float16 activations with float32 scales: no kernel matches the type constraints
    node = helper.make_node(
        ro.OP_TYPE, ["A", "B", "S"], ["Y"], domain=ro.DOMAIN, K=k, N=n, bits=bits, block_size=bs
    )
    mixed = _model(
        [node],
        [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales.astype(np.float32), "S")],
        a_type=TensorProto.FLOAT16,
    )
    with pytest.raises(Exception, match="no kernel def matches"):
        _session(mixed)


# --------------------------------------------------------------------------------------------
# the NumPy reference vs a plain, independent dequantise-then-matmul (property tests)
# --------------------------------------------------------------------------------------------
def _independent_unpack(packed, bits, bs, k):
    """Codes from the raw bytes with np.unpackbits (LSB-first), not via sinq_export.packing."""
    n, nb, nbytes = packed.shape
    assert nbytes == bs * bits // 8
    bitstream = np.unpackbits(packed.reshape(n, nb, nbytes), axis=-1, bitorder="little")
    codes = bitstream.reshape(n, nb, bs, bits).astype(np.int64)
    codes = (codes << np.arange(bits)).sum(-1).reshape(n, nb * bs)
    return codes[:, :k]


def _independent_unpack_zp(zp, bits, nb):
    n = zp.shape[0]
    bitstream = np.unpackbits(zp, axis=-1, bitorder="little")[:, : nb * bits]
    return (bitstream.reshape(n, nb, bits).astype(np.int64) << np.arange(bits)).sum(-1)


@st.composite
def problems(draw):
    bits = draw(st.sampled_from(ALL_BITS))
    bs = draw(st.sampled_from(BLOCKS))
    k = draw(st.integers(1, 3 * bs))
    n = draw(st.integers(1, 9))
    m = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    flags = draw(st.tuples(st.booleans(), st.booleans(), st.booleans()))
    return bits, bs, k, n, m, seed, flags


def problem_tensors(p):
    """Weights, activations and the optional col_scale / bias of one `problems()` draw."""
    bits, bs, k, n, m, seed, (use_zp, use_col, use_bias) = p
    packed, scales, zps = make_weights(bits, bs, k, n, seed=seed, zp=use_zp)
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, k)).astype(np.float32)
    col = rng.uniform(0.25, 4, k).astype(np.float32) if use_col else None
    bias = rng.standard_normal(n).astype(np.float32) if use_bias else None
    return packed, scales, zps, a, col, bias


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_reference_equals_plain_dequantize_matmul(p):
    bits, bs, k, n, m, seed, (use_zp, use_col, use_bias) = p
    packed, scales, zps, a, col, bias = problem_tensors(p)
    nb = -(-k // bs)
    q = _independent_unpack(packed, bits, bs, k)
    z = _independent_unpack_zp(zps, bits, nb) if use_zp else np.full((n, nb), 2 ** (bits - 1))
    g = np.arange(k) // bs
    w = (q - z[:, g]) * scales[:, g].astype(np.float64)  # [n, k] float64
    x = a.astype(np.float64) * (col.astype(np.float64) if use_col else 1.0)
    expect = x @ w.T + (bias if use_bias else 0.0)
    got = ro.reference_sinq_matmul(a, packed, scales, zps, col, bias, K=k, N=n, bits=bits, block_size=bs)
    assert got.shape == (m, n) and got.dtype == np.float32
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5 * max(np.abs(expect).max(), 1))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_native_op_equals_reference_property(lib, p):
    bits, bs, k, n, m, seed, (use_zp, use_col, use_bias) = p
    packed, scales, zps, a, col, bias = problem_tensors(p)
    y = run(sinq_model(bits, bs, k, n, packed, scales, zps, col, bias), a, threads=1)
    ref = ro.reference_sinq_matmul(a, packed, scales, zps, col, bias, K=k, N=n, bits=bits, block_size=bs)
    assert rel_err(y, ref) <= 1e-5


def test_reference_rejects_bad_arguments():
    packed, scales, zps = make_weights(3, 32, 40, 4)
    with pytest.raises(ValueError, match="bits"):
        ro.reference_sinq_matmul(
            np.ones((1, 40), np.float32), packed, scales, K=40, N=4, bits=9, block_size=32
        )
    with pytest.raises(ValueError, match="block_size"):
        ro.reference_sinq_matmul(
            np.ones((1, 40), np.float32), packed, scales, K=40, N=4, bits=3, block_size=24
        )
    with pytest.raises(ValueError, match="last dimension"):
        ro.reference_sinq_matmul(
            np.ones((1, 41), np.float32), packed, scales, K=40, N=4, bits=3, block_size=32
        )


# --------------------------------------------------------------------------------------------
# build script pieces that need no network
# --------------------------------------------------------------------------------------------
def _build_module():
    path = Path(ro.__file__).resolve().parents[2] / "runtime_ops" / "build.py"
    if not path.is_file():
        pytest.skip("runtime_ops/build.py not next to the package (wheel install)")
    spec = importlib.util.spec_from_file_location("_sinq_ops_build_t", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_build_rejects_bad_ort_include_dir(monkeypatch, tmp_path):
    mod = _build_module()
    monkeypatch.setenv("ORT_INCLUDE_DIR", str(tmp_path))
    with pytest.raises(mod.BuildError, match="ORT_INCLUDE_DIR"):
        mod.find_headers(tmp_path / "cache")


def test_build_accepts_ort_include_dir(monkeypatch, tmp_path):
    mod = _build_module()
    inc = tmp_path / "include" / "onnxruntime"
    inc.mkdir(parents=True)
    for h in mod.REQUIRED_HEADERS:
        (inc / h).write_text("#define ORT_API_VERSION 21\n")
    monkeypatch.setenv("ORT_INCLUDE_DIR", str(tmp_path / "include"))
    assert mod.find_headers(tmp_path / "cache") == inc
    assert mod._api_version(inc) == 21


def test_build_derives_debian_archive_from_apt_sources(tmp_path):
    mod = _build_module()
    d = tmp_path / "etc" / "apt" / "sources.list.d"
    d.mkdir(parents=True)
    (d / "debian.sources").write_text(
        "Types: deb\n# a comment\nURIs: http://mirror.example/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\nSigned-By: /k.gpg\n\n"
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n"
        "Components: main\nSigned-By: /k.gpg\n\n"
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm-backports\n"
        "Components: main\nSigned-By: /k.gpg\n"
    )
    (d / "other.list").write_text(
        "deb [arch=amd64 signed-by=/o.gpg] https://other.example/apt stable main\n"
        "deb http://snap.example/archive/debian/20250520T000000Z bookworm main contrib\n"
    )
    entries = mod._parse_sources(str(tmp_path))
    assert len(entries) == 5
    assert entries[0]["signed_by"] == "/o.gpg"
    archive = [(e["uris"], e["signed_by"]) for e in mod._debian_archive_entries_from(entries)]
    assert archive == [
        (["http://snap.example/archive/debian/20250520T000000Z"], None),
        (["http://mirror.example/debian"], "/k.gpg"),
    ]


# --------------------------------------------------------------------------------------------
# CUDA (skipped, never faked, without a CUDA provider)
# --------------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(),
    reason="onnxruntime has no CUDAExecutionProvider here",
)


@pytest.mark.cuda  # the CUDA build exists only where nvcc and a CUDA onnxruntime are
def test_cuda_enabled_library_loads_and_runs_on_cpu():
    """The CUDA variant also carries the CPU kernels; where it was built, it must load here too."""
    if not ro.is_available(cuda=True):
        pytest.skip("CUDA variant not built here (needs nvcc and an onnxruntime with CUDA)")
    bits, bs = 3, 32
    k, n, packed, scales, zps, a, c, b = case(bits, bs, 3, seed=21)
    so = ro.session_options(cuda=True)
    sess = ort.InferenceSession(sinq_model(bits, bs, k, n, packed, scales, zps, c, b), so, providers=CPU)
    ref = ro.reference_sinq_matmul(a, packed, scales, zps, c, b, K=k, N=n, bits=bits, block_size=bs)
    assert rel_err(sess.run(None, {"A": a})[0], ref) <= 1e-5


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("bits", ALL_BITS)
def test_cuda_op_matches_reference(bits):
    try:
        path = ro.ensure_built(cuda=True)
    except ro.RuntimeOpsUnavailable as e:
        pytest.fail(f"CUDA provider present but the CUDA library could not be built: {e}")
    assert path.is_file()
    for bs in (16, 64, 256):
        for m in (1, 7, 64):
            k, n, packed, scales, zps, a, c, b = case(bits, bs, m, seed=bits + bs + m, n=300)
            so = ro.session_options(cuda=True)
            sess = ort.InferenceSession(
                sinq_model(bits, bs, k, n, packed, scales, zps, c, b), so, providers=["CUDAExecutionProvider"]
            )
            y = sess.run(None, {"A": a})[0]
            ref = ro.reference_sinq_matmul(a, packed, scales, zps, c, b, K=k, N=n, bits=bits, block_size=bs)
            assert rel_err(y, ref) <= 1e-5, (bits, bs, m)


@pytest.mark.cuda
@needs_cuda
def test_cuda_float16():
    ro.ensure_built(cuda=True)
    bits, bs = 3, 64
    k, n, packed, scales, zps, a, c, b = case(bits, bs, 4, seed=3)
    so = ro.session_options(cuda=True)
    model = sinq_model(bits, bs, k, n, packed, scales.astype(np.float16), zps, c, b, dtype=np.float16)
    sess = ort.InferenceSession(model, so, providers=["CUDAExecutionProvider"])
    y = sess.run(None, {"A": a.astype(np.float16)})[0]
    ref = ro.reference_sinq_matmul(
        a.astype(np.float16).astype(np.float32),
        packed,
        scales.astype(np.float16).astype(np.float32),
        zps,
        c.astype(np.float16).astype(np.float32),
        b.astype(np.float16).astype(np.float32),
        K=k,
        N=n,
        bits=bits,
        block_size=bs,
    )
    assert rel_err(y, ref) <= 2e-3


if os.environ.get("SINQ_OPS_TEST_DEBUG"):  # pragma: no cover
    print("library:", ro.library_path())
