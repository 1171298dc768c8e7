"""Float ONNX graph + quantized torch layers -> the SINQ graph (one function, `quantize_graph`).

Used by the plain-module route (causal LMs are built directly, see `decoder`): the route
traces a float graph with torch.onnx.export and quantizes the module into `SinqLinear`
records; this module swaps every traced
linear for ``[Mul(x, t)] -> MatMulNBits(B, scales, zero_points) [-> Add(bias)]`` whose
initializers are the records' tensors (re-packed into a 4/8-bit container only when stock
onnxruntime cannot run the width), folds column scales where asked, and drops the float
weights that no node reads any more.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from ..config import GraphConfig
from ..contract import STOCK_OP, custom_op_inputs
from ..quant.record import QuantizedWeight
from .folding import plan_col_scales
from .graph import (
    GraphIndex,
    LinearSite,
    ensure_opset,
    find_linear_sites,
    quantized_node,
    remove_dead_initializers,
    remove_dead_nodes,
    tensor,
)
from .layout import choose_node, quant_tensors


@dataclass(frozen=True)
class LayerInput:
    """What the rewrite needs from one quantized torch layer."""

    record: QuantizedWeight
    fingerprint: str  # `graph.fingerprint` of the float weight the graph was traced with


@dataclass
class RewriteReport:
    layers: dict[str, dict] = field(default_factory=dict)  # manifest entries (docs/export-format.md)
    mul_nodes: int = 0
    linear_weight_bytes: int = 0  # bytes of the quantized linears' initializers
    float_linear_bytes: int = 0  # bytes those linears' float weights had in the float graph
    removed_initializers: int = 0


def _node_base(site: LinearSite) -> str:
    name = site.node.name or f"/{site.module.replace('.', '/')}/{site.node.op_type}"
    return name.rsplit("/", 1)[0] if "/" in name else name


def _col_scale_array(record: QuantizedWeight) -> np.ndarray | None:
    return None if record.col_scale is None else record.col_scale.detach().cpu().float().numpy()


def quantize_graph(
    model: onnx.ModelProto,
    layers: Mapping[str, LayerInput],
    config: GraphConfig,
) -> RewriteReport:
    """Rewrite ``model`` in place; returns the per-layer manifest and counts."""
    graph = model.graph
    fingerprints = {m: (li.fingerprint, li.record.shape) for m, li in layers.items()}
    sites = find_linear_sites(graph, fingerprints)
    index = GraphIndex.build(graph)
    report = RewriteReport()

    choices = {m: choose_node(li.record.bits, config.runtime, config.col_scale) for m, li in layers.items()}
    col_scales = {m: _col_scale_array(li.record) for m, li in layers.items()}
    plan = plan_col_scales(
        sites, col_scales, {m: c.fused_col_scale for m, c in choices.items()}, config.col_scale, index
    )

    new_inits: dict[str, onnx.TensorProto] = {}
    replacements: dict[str, list[onnx.NodeProto]] = {}  # key: old node's first output
    input_rewires: list[tuple[onnx.NodeProto, int, str]] = []
    muls: dict[tuple[str, bytes], str] = {}
    layer_tensors: set[str] = set()  # initializers that belong to quantized linears

    def add_init(name: str, array: np.ndarray) -> str:
        if name not in new_inits:
            new_inits[name] = tensor(name, array)
        return name

    for update in plan.updates:
        add_init(update.name, update.array)
        input_rewires.append((update.node, update.input_index, update.name))

    order = {id(n): i for i, n in enumerate(graph.node)}
    ordered = sorted(sites, key=lambda m: order[id(sites[m][0].node)])
    for module in ordered:
        li, choice = layers[module], choices[module]
        rec = li.record
        n, k = rec.shape
        qt = quant_tensors(rec, choice.container_bits)
        scales = qt.scales
        row = plan.row_scale.get(module)
        if row is not None:
            scales = (scales * row[1][:, None]).astype(np.float32)
        t = col_scales[module]
        mode = plan.col_scale[module]
        b_name = add_init(f"{module}.qweight", qt.packed)
        s_name = add_init(f"{module}.scales", scales)
        z_name = add_init(f"{module}.qzeros", qt.zero_points)
        weight_names = [b_name, s_name, z_name]
        t_name = None
        if mode in ("mul", "fused"):
            t_name = add_init(f"{module}.col_scale", t)
            weight_names.append(t_name)
        layer_tensors.update(weight_names)
        report.float_linear_bytes += n * k * 4

        for site in sites[module]:
            base = _node_base(site)
            nodes: list[onnx.NodeProto] = []
            x = site.input
            if mode == "mul":
                key = (x, t.tobytes())
                if key not in muls:
                    muls[key] = f"{base}/ColScaleMul_output_0"
                    nodes.append(helper.make_node("Mul", [x, t_name], [muls[key]],
                                                  name=f"{base}/ColScaleMul"))
                    report.mul_nodes += 1
                x = muls[key]
            fused_t = t_name if choice.op != STOCK_OP and mode == "fused" else None
            inputs = custom_op_inputs({"A": x, "B": b_name, "scales": s_name,
                                       "zero_points": z_name, "col_scale": fused_t})
            gemm_bias = site.node.op_type == "Gemm" and site.bias
            out = f"{site.output}_nobias" if gemm_bias else site.matmul_output
            nodes.append(quantized_node(
                op=choice.op, domain=choice.domain, name=f"{base}/{choice.op}", inputs=inputs,
                output=out, k=k, n=n, bits=choice.container_bits, block_size=rec.group_size,
                accuracy_level=config.accuracy_level if choice.op == STOCK_OP else None,
            ))
            bias = site.bias
            if bias is not None and row is not None:
                bias = add_init(f"{module}.bias.row_scaled",
                                (index.array(site.bias) * row[1]).astype(np.float32))
            if gemm_bias:
                nodes.append(helper.make_node("Add", [out, bias], [site.output], name=f"{base}/BiasAdd"))
            elif site.bias_node is not None and bias != site.bias:
                pos = list(site.bias_node.input).index(site.bias)
                input_rewires.append((site.bias_node, pos, bias))
            replacements[site.node.output[0]] = nodes
            ensure_opset(model, choice.domain)

        report.layers[module] = {
            "shape": [n, k],
            "bits": rec.bits,
            "group_size": rec.group_size,
            "op": choice.op,
            "container_bits": choice.container_bits,
            "col_scale": mode,
            "output_scaled_by": row[0] if row is not None else None,
            "onnx_node": f"{_node_base(sites[module][0])}/{choice.op}",
            "onnx_output": sites[module][0].output,
        }

    for node, pos, name in input_rewires:
        node.input[pos] = name
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        new_nodes.extend(replacements.get(node.output[0], [node]) if node.output else [node])
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    for existing in graph.initializer:  # a folded norm weight keeps its name
        if existing.name in new_inits:
            existing.CopyFrom(new_inits.pop(existing.name))
    graph.initializer.extend(new_inits.values())
    remove_dead_nodes(graph)
    report.removed_initializers = len(remove_dead_initializers(graph))
    report.linear_weight_bytes = sum(
        len(t.raw_data) for t in graph.initializer if t.name in layer_tensors
    )
    return report
