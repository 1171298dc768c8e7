"""Graph surgery on an ONNX ``ModelProto``: find float linears, replace them, tidy up.

Small pure-ish functions in the spirit of onnxscript's rewriter (pattern -> replacement), on
the protobuf directly (no extra IR copy of a 0.5 GB graph):

* `find_linear_sites`: pattern ``MatMul(x, W^T)`` / ``Gemm(x, W, c)`` with a constant weight,
  optionally followed by ``Add(., bias)``. A site is tied to a torch module by *content*: the
  initializer's bytes (transposed back to ``[N, K]``) must hash to the torch weight's
  fingerprint, so renamed nodes or reordered exports cannot mis-assign a weight. The node name
  (``/model/layers.0/self_attn/q_proj/MatMul``) only breaks ties between identical weights.
* `replace_site`: replacement ``[Mul(x, t)] -> MatMulNBits | SinqMatMulNBits [-> Add(bias)]``.
* `remove_dead_initializers`, `ensure_opset`.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper


class ExportError(ValueError):
    """The graph cannot be rewritten as asked; the message names the layer and the problem."""


def fingerprint(weight: torch.Tensor | np.ndarray) -> str:
    """Content hash of a float ``[N, K]`` weight (float32 bytes + shape)."""
    w = weight.detach().cpu().float().numpy() if isinstance(weight, torch.Tensor) else weight
    w = np.ascontiguousarray(w, dtype=np.float32)
    h = hashlib.sha256(repr(w.shape).encode())
    h.update(memoryview(w).cast("B"))
    return h.hexdigest()


@dataclass
class GraphIndex:
    """Who produces and who consumes each tensor name, and the initializers by name."""

    initializers: dict[str, onnx.TensorProto]
    producer: dict[str, onnx.NodeProto]
    consumers: dict[str, list[onnx.NodeProto]]
    graph_outputs: set[str]

    @classmethod
    def build(cls, graph: onnx.GraphProto) -> GraphIndex:
        producer: dict[str, onnx.NodeProto] = {}
        consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for out in node.output:
                producer[out] = node
            for name in node.input:
                if name:
                    consumers[name].append(node)
        return cls(
            initializers={t.name: t for t in graph.initializer},
            producer=producer,
            consumers=consumers,
            graph_outputs={o.name for o in graph.output},
        )

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.initializers[name])


@dataclass
class LinearSite:
    """One float linear layer as the exporter traced it."""

    module: str  # torch module name
    node: onnx.NodeProto  # the MatMul or Gemm node
    input: str  # activation tensor
    weight: str  # weight initializer name
    matmul_output: str  # output of the product, before any bias
    bias: str | None  # bias initializer, when the graph adds one
    bias_node: onnx.NodeProto | None  # the Add node (MatMul) or None (Gemm carries it)
    output: str  # tensor after the bias: what the torch module returns

    @property
    def scope(self) -> str:
        return self.node.name


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _module_from_node_name(node_name: str) -> str:
    """``/model/layers.0/self_attn/q_proj/MatMul`` -> ``model.layers.0.self_attn.q_proj``."""
    parts = [p for p in node_name.split("/") if p]
    return ".".join(parts[:-1])


def _weight_candidate(node: onnx.NodeProto, index: GraphIndex) -> tuple[str, bool] | None:
    """(initializer name, is_transposed_kn) when ``node`` multiplies by a constant 2-D weight."""
    if node.op_type == "MatMul" and len(node.input) == 2:
        name, transposed = node.input[1], True
    elif node.op_type == "Gemm" and len(node.input) >= 2:
        if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0:
            return None
        if len(node.input) > 2 and node.input[2] and _attr(node, "beta", 1.0) != 1.0:
            return None
        name, transposed = node.input[1], not _attr(node, "transB", 0)
    else:
        return None
    if name not in index.initializers:  # MatMul(x, Transpose(W)): a tied lm_head
        tr = index.producer.get(name)
        if tr is None or tr.op_type != "Transpose" or list(_attr(tr, "perm", [1, 0])) != [1, 0]:
            return None
        name, transposed = tr.input[0], not transposed
    init = index.initializers.get(name)
    if init is None or len(init.dims) != 2 or init.data_type != onnx.TensorProto.FLOAT:
        return None
    return name, transposed


def _bias_after(node: onnx.NodeProto, out: str, n: int, index: GraphIndex
                ) -> tuple[str, onnx.NodeProto] | tuple[None, None]:
    """The ``Add(out, bias[N])`` that follows a MatMul, when it is the output's only use."""
    users = index.consumers.get(out, [])
    if len(users) != 1 or out in index.graph_outputs:
        return None, None
    add = users[0]
    if add.op_type != "Add" or len(add.input) != 2:
        return None, None
    other = add.input[1] if add.input[0] == out else add.input[0]
    init = index.initializers.get(other)
    if init is None or tuple(init.dims) != (n,) or init.data_type != onnx.TensorProto.FLOAT:
        return None, None
    return other, add


def find_linear_sites(
    graph: onnx.GraphProto, fingerprints: Mapping[str, tuple[str, tuple[int, int]]]
) -> dict[str, list[LinearSite]]:
    """Map each torch module name in ``fingerprints`` to the graph node(s) computing it.

    ``fingerprints``: module name -> (`fingerprint` of its float ``[N, K]`` weight, (N, K)).
    Raises `ExportError` when a module is not found or a weight is ambiguous.
    """
    index = GraphIndex.build(graph)
    by_hash: dict[str, list[str]] = defaultdict(list)
    shapes = set()
    for module, (digest, shape) in fingerprints.items():
        by_hash[digest].append(module)
        shapes.add(tuple(shape))
    hash_cache: dict[tuple[str, bool], str] = {}
    sites: dict[str, list[LinearSite]] = defaultdict(list)
    for node in graph.node:
        cand = _weight_candidate(node, index)
        if cand is None:
            continue
        name, transposed = cand
        dims = tuple(index.initializers[name].dims)
        nk = dims[::-1] if transposed else dims
        if nk not in shapes:
            continue
        if (name, transposed) not in hash_cache:
            arr = index.array(name)
            hash_cache[(name, transposed)] = fingerprint(arr.T if transposed else arr)
        modules = by_hash.get(hash_cache[(name, transposed)], [])
        if not modules:
            continue
        if len(modules) > 1:
            scoped = [m for m in modules if m == _module_from_node_name(node.name)]
            if len(scoped) != 1:
                raise ExportError(
                    f"node {node.name!r}: its weight matches several modules "
                    f"({', '.join(sorted(modules))}) and the node name does not say which"
                )
            modules = scoped
        module = modules[0]
        n = nk[0]
        out = node.output[0]
        if node.op_type == "Gemm":
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            sites[module].append(LinearSite(module, node, node.input[0], name, out, bias, None, out))
        else:
            bias, add = _bias_after(node, out, n, index)
            final = add.output[0] if add is not None else out
            sites[module].append(LinearSite(module, node, node.input[0], name, out, bias, add, final))
    missing = sorted(set(fingerprints) - set(sites))
    if missing:
        raise ExportError(
            f"{len(missing)} quantized layer(s) not found in the float ONNX graph "
            f"(their weights do not appear as MatMul/Gemm constants): {', '.join(missing[:8])}"
            + (" ..." if len(missing) > 8 else "")
        )
    return dict(sites)


def quantized_node(
    *,
    op: str,
    domain: str,
    name: str,
    inputs: list[str],
    output: str,
    k: int,
    n: int,
    bits: int,
    block_size: int,
    accuracy_level: int | None,
) -> onnx.NodeProto:
    """A MatMulNBits / SinqMatMulNBits node (attributes in a fixed order: deterministic)."""
    attrs = {"K": k, "N": n, "bits": bits, "block_size": block_size}
    if accuracy_level is not None:
        attrs["accuracy_level"] = accuracy_level
    return helper.make_node(op, inputs, [output], name=name, domain=domain, **attrs)


def tensor(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name=name)


def replace_nodes(graph: onnx.GraphProto, old: onnx.NodeProto, new: Iterable[onnx.NodeProto]) -> None:
    """Put ``new`` where ``old`` was (keeps topological order when ``new`` reads only old's inputs)."""
    nodes = list(graph.node)
    pos = next(i for i, n in enumerate(nodes) if n is old)
    nodes[pos : pos + 1] = list(new)
    del graph.node[:]
    graph.node.extend(nodes)


def remove_nodes(graph: onnx.GraphProto, dead: Iterable[onnx.NodeProto]) -> None:
    dead_ids = {id(n) for n in dead}
    keep = [n for n in graph.node if id(n) not in dead_ids]
    del graph.node[:]
    graph.node.extend(keep)


def _used_names(graph: onnx.GraphProto) -> set[str]:
    used = {o.name for o in graph.output}
    stack = [graph]
    while stack:
        g = stack.pop()
        for node in g.node:
            used.update(i for i in node.input if i)
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    stack.append(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    stack.extend(a.graphs)
    return used


def remove_dead_nodes(graph: onnx.GraphProto) -> int:
    """Drop nodes none of whose outputs is read (e.g. a Transpose that fed a replaced MatMul)."""
    removed = 0
    while True:
        used = _used_names(graph)
        dead = [n for n in graph.node if n.output and not any(o in used for o in n.output)]
        if not dead:
            return removed
        remove_nodes(graph, dead)
        removed += len(dead)


def remove_dead_initializers(graph: onnx.GraphProto) -> list[str]:
    """Drop initializers nothing reads; returns their names."""
    used = _used_names(graph)
    dead = [t.name for t in graph.initializer if t.name not in used]
    if dead:
        keep = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(keep)
    return dead


def ensure_opset(model: onnx.ModelProto, domain: str, version: int = 1) -> None:
    if not any(o.domain == domain for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(domain, version))


def custom_domains(model: onnx.ModelProto) -> list[str]:
    return sorted(o.domain for o in model.opset_import if o.domain not in ("", "ai.onnx"))
