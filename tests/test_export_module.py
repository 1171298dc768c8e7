"""Exporter on small torch modules (fast): parity, layouts, folding, determinism, bad input."""

from __future__ import annotations

import errno

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from sinq_export import ConfigError, SinqConfig
from sinq_export.config import GraphConfig
from sinq_export.contract import MANIFEST_FILE, REFERENCE_DIR
from sinq_export.export import export_module
from sinq_export.io import OutputExistsError, read_json
from sinq_export.quant import packing


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(128, 256)
        self.fc2 = nn.Linear(256, 192, bias=False)
        self.fc3 = nn.Linear(192, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class GatedMLP(nn.Module):
    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """RMSNorm -> LLaMA-style gated MLP -> residual: the shapes of a decoder's MLP half."""

    def __init__(self, d: int = 128, f: int = 256) -> None:
        super().__init__()
        self.norm_weight = nn.Parameter(1 + 0.1 * torch.randn(d))
        self.mlp = GatedMLP(d, f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        normed = self.norm_weight * h
        # a shape-only reader of the norm output (LLaMA attention reads hidden_states.shape)
        return (x + self.mlp(normed)).reshape(normed.shape)


def _session(path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path / "model.onnx"), so, providers=["CPUExecutionProvider"])


def _rel_err(onnx_out: np.ndarray, torch_out: torch.Tensor) -> float:
    ref = torch_out.detach().float().numpy()
    return float(np.abs(onnx_out.astype(np.float32) - ref).max() / np.ptp(ref))


def _export(module, x, path, config, graph=None, **kw):
    kw.setdefault("input_names", ["x"])
    kw.setdefault("output_names", ["y"])
    kw.setdefault("dynamic_axes", {"x": {0: "batch"}})
    return export_module(module, x, path, config, graph, **kw)


@pytest.fixture(scope="module")
def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP().eval()


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("shape", [(5, 128), (2, 3, 128)], ids=["gemm-2d", "matmul-3d"])
def test_mlp_parity_all_bits(mlp, tmp_path, bits, shape):
    torch.manual_seed(1)
    x = torch.randn(*shape)
    res = _export(mlp, x, tmp_path / "out", SinqConfig(bits=bits, group_size=32))
    y = _session(tmp_path / "out").run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        assert _rel_err(y, res.model(x)) <= 1e-4
    man = res.manifest
    assert set(man["layers"]) == {"fc1", "fc2", "fc3"}
    for layer in man["layers"].values():
        assert layer["op"] == "MatMulNBits"
        assert layer["container_bits"] == packing.container_bits(bits)
    assert man["mul_nodes"] == 3
    # the caller's module stays float
    assert isinstance(mlp.fc1, nn.Linear)


def test_initializers_are_the_record_tensors(mlp, tmp_path):
    x = torch.randn(4, 128)
    res = _export(mlp, x, tmp_path / "out", SinqConfig(bits=4, group_size=32))
    model = onnx.load(str(tmp_path / "out" / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for name, layer in (("fc1", res.model.fc1), ("fc2", res.model.fc2)):
        rec = layer.record
        np.testing.assert_array_equal(inits[f"{name}.qweight"], rec.packed.numpy())
        np.testing.assert_array_equal(inits[f"{name}.scales"], rec.scales.numpy())
        np.testing.assert_array_equal(inits[f"{name}.qzeros"], rec.zero_points.numpy())
        np.testing.assert_array_equal(inits[f"{name}.col_scale"], rec.col_scale.numpy())
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 3 and all(len(n.input) == 4 and n.input[3] for n in nodes)  # explicit zp
    assert not [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    assert model.ir_version == 10
    # float weights are gone
    assert not any(n.endswith(".weight") for n in inits)


def test_container_bits_hold_the_same_codes(mlp, tmp_path):
    x = torch.randn(4, 128)
    res = _export(mlp, x, tmp_path / "out", SinqConfig(bits=3, group_size=32))
    graph = onnx.load(str(tmp_path / "out" / "model.onnx")).graph
    inits = {t.name: numpy_helper.to_array(t).copy() for t in graph.initializer}
    rec = res.model.fc2.record
    codes = packing.unpack_codes(torch.from_numpy(inits["fc2.qweight"]), 4, 32, rec.in_features)
    assert torch.equal(codes, rec.codes())
    zeros = packing.unpack_zero_points(torch.from_numpy(inits["fc2.qzeros"]), 4, rec.n_blocks)
    assert torch.equal(zeros, rec.zeros())


def test_linear_weight_bytes_4bit(mlp, tmp_path):
    res = _export(mlp, torch.randn(4, 128), tmp_path / "out", SinqConfig(bits=4, group_size=64))
    sizes = res.manifest["sizes"]
    assert sizes["linear_weight_bytes"] <= 0.2 * sizes["float_linear_weight_bytes"]


@pytest.mark.parametrize("shared", [False, True])
def test_col_scale_fold(tmp_path, shared):
    torch.manual_seed(2)
    block = Block().eval()
    x = torch.randn(2, 3, 128)
    cfg = SinqConfig(bits=4, group_size=32, shared_col_scale=shared)
    res = _export(block, x, tmp_path / "out", cfg, GraphConfig(col_scale="fold"),
                  dynamic_axes={"x": {0: "batch", 1: "seq"}})
    y = _session(tmp_path / "out").run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        assert _rel_err(y, res.model(x)) <= 1e-4
    layers = res.manifest["layers"]
    assert layers["mlp.down_proj"]["col_scale"] == "folded:mlp.up_proj"
    assert layers["mlp.up_proj"]["output_scaled_by"] == "mlp.down_proj"
    if shared:  # one t for gate/up: folded into the norm weight, no Mul left
        assert layers["mlp.gate_proj"]["col_scale"].startswith("folded:")
        assert res.manifest["mul_nodes"] == 0
    else:
        assert res.manifest["mul_nodes"] == 2
    # validator contract: each layer's onnx_output is a tensor of the graph
    model = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False)
    produced = {o for n in model.graph.node for o in n.output}
    assert all(la["onnx_output"] in produced for la in layers.values())


def test_col_scale_mul_matches_fold(tmp_path):
    torch.manual_seed(2)
    block = Block().eval()
    x = torch.randn(2, 3, 128)
    outs = []
    for mode in ("mul", "fold"):
        _export(block, x, tmp_path / mode, SinqConfig(bits=4, group_size=32), GraphConfig(col_scale=mode))
        outs.append(_session(tmp_path / mode).run(None, {"x": x.numpy()})[0])
    assert np.abs(outs[0] - outs[1]).max() <= 1e-4 * np.ptp(outs[0])


def test_two_runs_byte_identical(tmp_path):
    torch.manual_seed(3)
    block = Block().eval()
    x = torch.randn(2, 3, 128)
    cfg = SinqConfig(bits=3, group_size=32, shared_col_scale=True)
    for name in ("a", "b"):
        _export(block, x, tmp_path / name, cfg, GraphConfig(col_scale="fold"))
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) >= 4
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_fp16(mlp, tmp_path):
    x = torch.randn(3, 128)
    res = _export(mlp, x, tmp_path / "out", SinqConfig(bits=4, group_size=32), GraphConfig(dtype="fp16"))
    sess = _session(tmp_path / "out")
    assert sess.get_inputs()[0].type == "tensor(float16)"
    y = sess.run(None, {"x": x.numpy().astype(np.float16)})[0]
    assert y.dtype == np.float16
    with torch.no_grad():
        assert _rel_err(y, res.model(x)) <= 1e-2


def test_manifest_and_files(mlp, tmp_path):
    _export(mlp, torch.randn(4, 128), tmp_path / "out", SinqConfig(bits=4, group_size=32))
    out = tmp_path / "out"
    assert (out / "model.onnx").is_file() and (out / "model.onnx.data").is_file()
    man = read_json(out / MANIFEST_FILE)
    assert man["kind"] == "module" and man["format_version"] == 2
    assert man["graph"] == GraphConfig().to_dict() and man["source"]["path"] is None
    assert man["onnx"]["ir_version"] == 10 and man["onnx"]["custom_domains"] == ["com.microsoft"]
    assert str(tmp_path) not in (out / MANIFEST_FILE).read_text()
    from sinq_export.nn import load_quantized

    model, cfg = load_quantized(out / REFERENCE_DIR, MLP())
    assert cfg.bits == 4 and model.fc1.bits == 4
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)


def test_output_exists_refused(mlp, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputExistsError):
        _export(mlp, torch.randn(2, 128), tmp_path / "out", SinqConfig())
    res = _export(mlp, torch.randn(2, 128), tmp_path / "out", SinqConfig(group_size=32), overwrite=True)
    assert (res.out_dir / "model.onnx").is_file()


def test_disk_full_leaves_nothing(mlp, tmp_path, monkeypatch):
    import sinq_export.export.pipeline as mod

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mod, "write_model", full)
    with pytest.raises(OSError):
        _export(mlp, torch.randn(2, 128), tmp_path / "out", SinqConfig(group_size=32))
    assert list(tmp_path.iterdir()) == []


def test_fused_needs_custom_runtime():
    with pytest.raises(ConfigError, match="custom"):
        GraphConfig(col_scale="fused", runtime="stock")


def _custom_session_options():
    try:
        from sinq_export import runtime_ops  # noqa: PLC0415
    except ImportError:
        return None
    try:
        return runtime_ops.session_options()
    except Exception:  # library not built
        return None


@pytest.mark.parametrize("bits,col_scale", [(3, "mul"), (5, "mul"), (4, "fused")])
def test_custom_runtime_graph(mlp, tmp_path, bits, col_scale):
    x = torch.randn(2, 3, 128)
    cfg = SinqConfig(bits=bits, group_size=32)
    res = _export(mlp, x, tmp_path / "out", cfg, GraphConfig(runtime="custom", col_scale=col_scale))
    model = onnx.load(str(tmp_path / "out" / "model.onnx"))
    ops = [n for n in model.graph.node if n.domain == "sinq.ops"]
    assert len(ops) == 3 and all(n.op_type == "SinqMatMulNBits" for n in ops)
    assert res.manifest["onnx"]["custom_domains"] == ["sinq.ops"]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(inits["fc1.qweight"], res.model.fc1.record.packed.numpy())  # true size
    assert res.manifest["mul_nodes"] == (0 if col_scale == "fused" else 3)
    so = _custom_session_options()
    if so is None:
        pytest.fail("custom op library (sinq_export.runtime_ops) not built: run install.sh")
    sess = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), so, providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        assert _rel_err(y, res.model(x)) <= 1e-4


def test_summary_table(mlp, tmp_path):
    from sinq_export.api import model_summary_lines

    res = _export(mlp, torch.randn(2, 128), tmp_path / "out", SinqConfig(bits=4, group_size=32))
    summary = res.summary()
    assert summary["layers_quantized"] == 3 and summary["layers_by_bits"] == {"4": 3}
    assert set(summary["timings_s"]) == {"float_export", "quantize", "rewrite", "write", "check"}
    out = "\n".join(model_summary_lines(summary))
    for word in ("layers quantized", "linear weights", "col-scale Mul nodes", "time", "total"):
        assert word in out


def test_shared_col_scale_shares_one_mul(tmp_path):
    torch.manual_seed(4)
    block = Block().eval()
    x = torch.randn(2, 3, 128)
    cfg = SinqConfig(bits=4, group_size=32, shared_col_scale=True)
    res = _export(block, x, tmp_path / "out", cfg, GraphConfig(col_scale="mul"))
    assert res.manifest["mul_nodes"] == 2  # gate/up share one Mul, down_proj has its own
    y = _session(tmp_path / "out").run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        assert _rel_err(y, res.model(x)) <= 1e-4
