"""Where the column scale ``t`` goes: an explicit ``Mul``, the custom op, or folded away.

A quantized linear computes ``(x * t) @ W'^T``. Folding moves ``* t`` into whatever produced
``x`` when that is exact:

* **into a linear's output rows** (``row fold``): ``x = a * u(y)`` with ``u`` another quantized
  linear (LLaMA's ``down_proj`` reads ``silu(gate) * up``). Then ``x * t = a * (u(y) * t)``, so
  ``t`` multiplies ``u``'s group scales row-wise (and its bias). The validator sees ``u``'s
  output scaled by ``t``: the manifest records ``output_scaled_by``.
* **into a norm weight** (``norm fold``): ``x = y * w`` (RMSNorm's last Mul) or
  ``x = LayerNormalization(y, w, b)`` and *every* consumer of ``x`` is a quantized linear with
  the same ``t`` (``shared_col_scale`` makes q/k/v and gate/up share one). Then ``w * t``
  (and ``b * t``) replace the weights and no Mul is needed.

Everything else keeps a Mul (o_proj in LLaMA: its input mixes heads through attention).
The plan is computed first (pure function of sites, records and the graph index) and applied
by `rewrite`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from .graph import GraphIndex, LinearSite
from .placement import FUSED, MUL, NONE, Placement, folded

NORM_OPS = ("LayerNormalization", "SimplifiedLayerNormalization")
# Readers that see only a tensor's shape, never its values: scaling the values is invisible
# to them (LLaMA's attention reads ``hidden_states.shape`` off the norm output).
SHAPE_ONLY_OPS = ("Shape", "Size")


@dataclass(frozen=True)
class InitializerUpdate:
    """Replace input ``input_index`` of ``node`` by a new constant ``array`` named ``name``."""

    node: onnx.NodeProto
    input_index: int
    name: str
    array: np.ndarray


@dataclass
class FoldPlan:
    col_scale: dict[str, Placement] = field(default_factory=dict)  # module -> where its t goes
    row_scale: dict[str, tuple[str, np.ndarray]] = field(default_factory=dict)  # target -> (src, t)
    updates: list[InitializerUpdate] = field(default_factory=list)


def _only_user(index: GraphIndex, tensor: str, node: onnx.NodeProto) -> bool:
    users = index.consumers.get(tensor, [])
    return tensor not in index.graph_outputs and len(users) == 1 and users[0] is node


def _row_fold_target(
    site: LinearSite, t: np.ndarray, single: Mapping[str, LinearSite], taken: Mapping, index: GraphIndex
) -> str | None:
    """Module whose output rows can absorb ``t`` (``x = a * u(y)``), or None."""
    mul = index.producer.get(site.input)
    if mul is None or mul.op_type != "Mul" or len(mul.input) != 2 or mul.input[0] == mul.input[1]:
        return None
    if not _only_user(index, site.input, site.node):
        return None
    by_output = {s.output: m for m, s in single.items()}
    for operand in mul.input:
        target = by_output.get(operand)
        if target is None or target == site.module or target in taken:
            continue
        if not _only_user(index, operand, mul):
            continue
        if _n_of(single[target], index) != t.size:
            continue
        return target
    return None


def _n_of(site: LinearSite, index: GraphIndex) -> int:
    dims = tuple(index.initializers[site.weight].dims)
    transposed = site.node.op_type == "MatMul" or not any(
        a.name == "transB" and a.i for a in site.node.attribute
    )
    return dims[1] if transposed else dims[0]


def _channel_weight(index: GraphIndex, name: str, k: int) -> np.ndarray | None:
    init = index.initializers.get(name)
    if init is None or init.data_type != onnx.TensorProto.FLOAT:
        return None
    dims = tuple(init.dims)
    if not dims or dims[-1] != k or any(d != 1 for d in dims[:-1]):
        return None
    return index.array(name)


def _fresh_name(index: GraphIndex, name: str, node: onnx.NodeProto) -> str:
    """Keep the initializer's name when ``node`` is its only reader, else make a new one."""
    return name if _only_user(index, name, node) else f"{name}.col_scaled"


def _norm_fold(x: str, t: np.ndarray, index: GraphIndex) -> tuple[str, list[InitializerUpdate]] | None:
    """Updates that fold ``t`` into the per-channel weight producing ``x``, or None."""
    node = index.producer.get(x)
    if node is None or x in index.graph_outputs:
        return None
    k = t.size
    if node.op_type == "Mul" and len(node.input) == 2:
        for i, name in enumerate(node.input):
            w = _channel_weight(index, name, k)
            if w is not None and node.input[1 - i] != name:
                label = name[: -len(".weight")] if name.endswith(".weight") else node.name
                new = (w * t).astype(np.float32)
                return label, [InitializerUpdate(node, i, _fresh_name(index, name, node), new)]
        return None
    if node.op_type in NORM_OPS and node.output[0] == x:
        updates = []
        for i in (1, 2):
            if i >= len(node.input) or not node.input[i]:
                continue
            w = _channel_weight(index, node.input[i], k)
            if w is None:
                return None
            updates.append(InitializerUpdate(node, i, _fresh_name(index, node.input[i], node),
                                             (w * t).astype(np.float32)))
        if not updates:
            return None
        name = node.input[1]
        label = name[: -len(".weight")] if name.endswith(".weight") else node.name
        return label, updates
    return None


def plan_col_scales(
    sites: Mapping[str, list[LinearSite]],
    col_scales: Mapping[str, np.ndarray | None],
    fused: Mapping[str, bool],
    mode: str,
    index: GraphIndex,
) -> FoldPlan:
    """Decide, per quantized module, how its ``t`` is applied (see module docstring)."""
    plan = FoldPlan()
    candidates = []
    for module in sites:
        t = col_scales.get(module)
        if t is None:
            plan.col_scale[module] = NONE
        elif fused.get(module):
            plan.col_scale[module] = FUSED
        elif mode == "fold" and len(sites[module]) == 1:
            candidates.append(module)
        else:
            plan.col_scale[module] = MUL
    if not candidates:
        return plan

    single = {m: s[0] for m, s in sites.items() if len(s) == 1}
    remaining = []
    for module in candidates:
        target = _row_fold_target(single[module], col_scales[module], single, plan.row_scale, index)
        if target is None:
            remaining.append(module)
            continue
        plan.row_scale[target] = (module, col_scales[module])
        plan.col_scale[module] = folded(target)

    by_input: dict[str, list[str]] = defaultdict(list)
    for module in remaining:
        by_input[single[module].input].append(module)
    for x, modules in by_input.items():
        readers = {id(n) for n in index.consumers.get(x, []) if n.op_type not in SHAPE_ONLY_OPS}
        mine = {id(single[m].node) for m in modules}
        t0 = col_scales[modules[0]]
        same_t = all(np.array_equal(col_scales[m], t0) for m in modules)
        norm_fold = _norm_fold(x, t0, index) if readers == mine and same_t else None
        if norm_fold is None:
            for m in modules:
                plan.col_scale[m] = MUL
            continue
        label, updates = norm_fold
        plan.updates.extend(updates)
        for m in modules:
            plan.col_scale[m] = folded(label)
    return plan
