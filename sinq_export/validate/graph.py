"""Reading an export folder and its ONNX graph: sessions, exposed outputs, layer sites."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import runtime_ops
from ..contract import (
    INPUT_B,
    INPUT_BIAS,
    INPUT_COL_SCALE,
    INPUT_SCALES,
    INPUT_ZERO_POINTS,
    MATMUL_NBITS_BIAS,
    MATMUL_NBITS_G_IDX,
    MODULE_ONNX_FILE,
    STOCK_OP,
)
from ..io import read_json
from ..onnx_tensors import EXTERNAL_FOLDER_KEY, graph_bytes
from ..runtime_ops import record_from_arrays
from .providers import CUSTOM_DOMAIN, EXPORT_META_FILE, PROVIDERS, QUANT_OPS, ValidationError
from .rebuild import layer_node_name, layer_rows, record_from_node

if TYPE_CHECKING:
    import onnx
    import onnxruntime as ort

# ------------------------------------------------------------------------------ export folder


@dataclass
class ExportInfo:
    out_dir: Path
    meta: dict
    onnx_path: Path
    kind: str
    dtype: str
    accuracy_level: int
    custom_domains: list[str]
    layers: dict[str, dict]

    @property
    def data_dir(self) -> Path:
        """The folder the graph's external-data locations are relative to (the graph's own)."""
        return self.onnx_path.parent


def read_export(out_dir: str | Path) -> ExportInfo:
    """Parse OUT_DIR's manifest; a missing or damaged one is a `ValidationError` (exit 2)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ValidationError(f"{out_dir}: not a folder")
    meta_file = out_dir / EXPORT_META_FILE
    if not meta_file.is_file():
        raise ValidationError(f"{out_dir}: no {EXPORT_META_FILE} (not a `sinq-export model` folder)")
    try:
        meta = read_json(meta_file)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValidationError(f"{meta_file}: cannot parse ({exc})") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("layers", {}), dict):
        raise ValidationError(f"{meta_file}: not a sinq-export manifest (no 'layers' object)")
    onnx_meta = meta.get("onnx") or {}
    onnx_path = out_dir / str(onnx_meta.get("file", MODULE_ONNX_FILE))
    if not onnx_path.is_file():
        raise ValidationError(f"{out_dir}: {onnx_path.name} is missing")
    # format 2 keeps the graph settings in "graph"; format 1 had them in "config"
    graph = {**(meta.get("config") or {}), **(meta.get("graph") or {})}
    try:
        level = _loosest_level(graph.get("accuracy_level", 0), meta.get("layers", {}))
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"{meta_file}: bad accuracy_level") from exc
    return ExportInfo(
        out_dir=out_dir,
        meta=meta,
        onnx_path=onnx_path,
        kind=meta.get("kind", "causal-lm"),
        dtype=str(graph.get("dtype", "fp32")),
        accuracy_level=level,
        custom_domains=list(onnx_meta.get("custom_domains", []) or []),
        layers=dict(meta.get("layers", {})),
    )


def _loosest_level(graph_level: Any, layers: dict) -> int:
    """The export's accuracy level for its end-to-end tolerance: the graph's, or with levels
    chosen per layer (``"auto"``) the loosest any layer got (each layer is checked at its own
    node's, `node_accuracy_level`)."""
    if graph_level != "auto":
        return int(graph_level)
    levels = [int(m["accuracy_level"]) for m in layers.values()
              if isinstance(m, dict) and m.get("accuracy_level") is not None]
    return max(levels, default=0)


def node_accuracy_level(node: Any) -> int:
    """The ``accuracy_level`` a MatMulNBits node runs at (0 when absent, as onnxruntime reads it)."""
    return int(_attr(node, "accuracy_level", 0) or 0)


# ------------------------------------------------------------------------------ onnx helpers

_NP_OF_ONNX = {1: np.float32, 10: np.float16, 11: np.float64, 7: np.int64, 6: np.int32, 9: np.bool_,
               16: np.float32}


def _initializers(model) -> dict[str, np.ndarray]:
    """Every initializer and Constant of an in-memory model (tests; small models only)."""
    from onnx import numpy_helper

    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for a in node.attribute:
                if a.name == "value":
                    out[node.output[0]] = numpy_helper.to_array(a.t)
    return out


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _float_elem_type(model) -> int:
    for o in model.graph.output:
        if o.name == "logits" or o.type.tensor_type.elem_type in (1, 10, 16):
            return o.type.tensor_type.elem_type
    return 1


def instrumented_copy(model, expose: Iterable[str], accuracy_level: int | None = None):
    """A copy of ``model`` with ``expose`` tensors added as graph outputs and, if given,
    every MatMulNBits/SinqMatMulNBits ``accuracy_level`` attribute overridden."""
    import onnx
    from onnx import helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    elem = _float_elem_type(m)
    for name in dict.fromkeys(expose):
        if name and name not in existing:
            m.graph.output.append(helper.make_tensor_value_info(name, elem, None))
            existing.add(name)
    if accuracy_level is not None:
        for node in m.graph.node:
            if node.op_type in QUANT_OPS:
                for a in list(node.attribute):
                    if a.name == "accuracy_level":
                        node.attribute.remove(a)
                node.attribute.append(helper.make_attribute("accuracy_level", int(accuracy_level)))
    return m


def _session_options(info: ExportInfo, provider: str = "cpu"):
    """SessionOptions; registers the sinq.ops library when the model uses its domain.

    A missing CPU library is bad input (`ValidationError`); a missing CUDA variant makes that
    provider skipped (RuntimeError).
    """
    import onnxruntime as ort

    if CUSTOM_DOMAIN in info.custom_domains:
        try:
            opts = runtime_ops.session_options(cuda=provider == "cuda")
        except runtime_ops.RuntimeOpsUnavailable as exc:
            if provider != "cpu":
                raise RuntimeError(f"custom-op library for {provider}: {exc}") from exc
            raise ValidationError(f"{info.onnx_path.name} needs the {CUSTOM_DOMAIN} custom-op "
                                  f"library: {exc}") from exc
    else:
        opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return opts


def _session(model_or_path: onnx.ModelProto | str | Path, info: ExportInfo,
             provider: str) -> ort.InferenceSession:
    """An InferenceSession on ``provider`` (short name). Raises RuntimeError on fallback.

    A ModelProto is the export's graph with its initializers still external (see
    `tensors`): it is passed as bytes and onnxruntime reads the data from OUT_DIR.
    """
    import onnxruntime as ort

    opts = _session_options(info, provider)
    full = PROVIDERS[provider]
    providers = [full] if provider == "cpu" else [full, "CPUExecutionProvider"]
    if isinstance(model_or_path, (str, Path)):
        sess = ort.InferenceSession(str(model_or_path), opts, providers=providers)
    else:
        opts.add_session_config_entry(EXTERNAL_FOLDER_KEY, str(info.data_dir.absolute()))
        sess = ort.InferenceSession(graph_bytes(model_or_path), opts, providers=providers)
    if full not in sess.get_providers():
        raise RuntimeError(f"onnxruntime fell back to {sess.get_providers()} instead of {full}")
    return sess


# ------------------------------------------------------------------------------ per-layer map


@dataclass
class _LayerSite:
    """Where one quantized linear lives in the graph."""

    name: str
    node: Any  # NodeProto of the MatMulNBits / SinqMatMulNBits
    output: str  # tensor compared (the contract's onnx_output)
    local_input: str  # tensor fed to the local reference
    input_has_col_scale: bool  # True: local_input already includes x * t (mul mode, folded)
    output_scaled_by: str | None
    order: int
    meta: dict = field(default_factory=dict)
    rows: tuple[int, int] | None = None  # this linear's columns of a packed node's output
    output_has_bias: bool = False  # False: the compared tensor is the node's, before a bias Add


def _producers(model) -> dict[str, Any]:
    return {o: n for n in model.graph.node for o in n.output}


def _multiplied(value: str, producers: Mapping[str, Any], constants: set[str]) -> str:
    """The activation a ``Mul(activation, constant)`` producing ``value`` multiplies, else
    ``value``."""
    mul = producers.get(value)
    if mul is not None and mul.op_type == "Mul":
        others = [i for i in mul.input if i not in constants]
        if len(others) == 1:
            return others[0]
    return value


def col_scale_mode(meta: dict) -> str:
    """``col_scale_mode`` (format 2) or ``col_scale`` (format 1: ``folded:<where>``)."""
    return str(meta.get("col_scale_mode", meta.get("col_scale", "none")))


def locate_layers(model, info: ExportInfo) -> list[_LayerSite]:
    """Map each layer of ``sinq_export.json`` to its quantized node; in graph order.

    The local reference input is the pre-``Mul`` activation for ``col_scale: mul`` (so a
    corrupted column-scale initializer is caught at its layer), the node's input otherwise.
    """
    nodes = {n.name: (i, n) for i, n in enumerate(model.graph.node)}
    producers = _producers(model)
    constants = ({t.name for t in model.graph.initializer}
                 | {n.output[0] for n in model.graph.node if n.op_type == "Constant"})
    sites = []
    for name, meta in info.layers.items():
        if meta.get("op", QUANT_OPS[0]) not in QUANT_OPS:  # a gathered table: checked end to end
            continue
        entry = nodes.get(layer_node_name(meta) or "")
        if entry is None and meta.get("onnx_output") in producers:
            node = producers[meta["onnx_output"]]
            entry = nodes.get(node.name)
        if entry is None or entry[1].op_type not in QUANT_OPS:
            raise ValidationError(
                f"{info.onnx_path.name}: layer {name}: node {layer_node_name(meta)!r} "
                f"({meta.get('op')}) not found in the graph")
        order, node = entry
        local_input, has_t = node.input[0], False
        if meta.get("exact_channels"):  # the node reads x * int8_mask; the layer's input is x
            local_input = _multiplied(local_input, producers, constants)
        mode = col_scale_mode(meta)
        if mode == "mul":
            node_input = local_input
            local_input = _multiplied(node_input, producers, constants)
            has_t = local_input == node_input
        elif mode.startswith("fold") or mode == "ratio":
            # ratio: the node's input carries t (the lead's t in the norm, the rest by the Mul)
            has_t = True
        rows = layer_rows(meta, node)
        output = meta.get("output") or meta.get("onnx_output") or node.output[0]
        # the compared tensor holds the bias when the node takes it or when it is the Add after it
        with_bias = output != node.output[0] or (len(node.input) > INPUT_BIAS
                                                 and bool(node.input[INPUT_BIAS]))
        sites.append(_LayerSite(name, node, output, local_input, has_t,
                                meta.get("output_scaled_by"), order, meta,
                                rows=None if rows == (0, int(_attr(node, "N"))) else rows,
                                output_has_bias=with_bias))
    sites.sort(key=lambda s: (s.order, s.rows or (0, 0)))
    return sites


def dequantize_node(node: onnx.NodeProto, inits: dict[str, np.ndarray]) -> dict[str, np.ndarray | None]:
    """A MatMulNBits / SinqMatMulNBits node's initializers, dequantised by the record they hold.

    Returns ``W`` (float64 ``[N, K]``, ``(Q - z) * s`` formed in float32 as the runtimes do),
    ``col_scale`` (``[K]`` or None, the custom op's fused t) and ``bias`` (``[N]`` or None).
    """
    k, n = int(_attr(node, "K")), int(_attr(node, "N"))
    bits, bs = int(_attr(node, "bits", 4)), int(_attr(node, "block_size"))

    def get(i: int) -> np.ndarray | None:
        if i < len(node.input) and node.input[i]:
            if node.input[i] not in inits:
                raise ValidationError(f"node {node.name}: input {node.input[i]!r} is not an initializer")
            return inits[node.input[i]]
        return None

    col_scale = bias = None
    if node.op_type == STOCK_OP:
        if get(MATMUL_NBITS_G_IDX) is not None:
            raise ValidationError(f"node {node.name}: g_idx is not supported by the NumPy reference")
        bias = get(MATMUL_NBITS_BIAS)
    else:
        col_scale, bias = get(INPUT_COL_SCALE), get(INPUT_BIAS)
    zp = get(INPUT_ZERO_POINTS)
    if zp is not None and zp.dtype != np.uint8:
        raise ValidationError(f"node {node.name}: float zero points are not supported by the NumPy "
                              "reference")
    try:
        record = record_from_arrays(get(INPUT_B), get(INPUT_SCALES), zp, K=k, N=n, bits=bits,
                                    block_size=bs)
    except ValueError as exc:
        raise ValidationError(f"node {node.name}: {exc}") from exc
    return {
        "W": record.dequantize_grouped().numpy().astype(np.float64),
        "col_scale": None if col_scale is None else col_scale.astype(np.float64).reshape(k),
        "bias": None if bias is None else bias.astype(np.float64).reshape(n),
    }


def exact_channel_faults(sites: Iterable[_LayerSite], inits: Mapping[str, np.ndarray]
                         ) -> dict[str, str]:
    """Layer -> what is wrong with its exact channels (input channels multiplied in float
    beside an int8 node): the index must list the manifest's channels, the mask must zero
    exactly those and pass the rest, and the float columns must be the node's own
    dequantized columns (the graph then computes the layer the reference does, whatever the
    level; the level-4 tolerance alone would let a few percent of damage through)."""
    import torch

    from ..quant.int8 import int8_mask

    faults = {}
    for s in sites:
        channels = s.meta.get("exact_channels") or []
        if not channels:
            continue
        names = s.meta.get("initializers") or {}
        index, mask, weight = (inits[names[k]] for k in ("exact_index", "int8_mask",
                                                           "exact_weight"))
        want_mask = int8_mask(int(_attr(s.node, "K")), channels).numpy()
        if index.tolist() != list(channels):
            faults[s.name] = f"exact_index {index.tolist()[:8]} is not the channels {channels[:8]}"
        elif mask.shape != want_mask.shape or not np.array_equal(mask, want_mask):
            faults[s.name] = "int8_mask does not zero exactly the exact channels"
        else:
            record = record_from_node(s.node, inits, names=names)
            columns = record.dequantize_columns(torch.tensor(channels)).T
            if weight.shape != tuple(columns.shape) or not np.allclose(
                    weight, columns.numpy(), rtol=1e-6, atol=0.0):
                faults[s.name] = "exact_weight is not the node's dequantized columns"
    return faults
