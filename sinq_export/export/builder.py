"""HF ``config.json`` -> a fused onnxruntime decoder graph, built (not traced) with mobius-onnx.

Why mobius: it is the onnxruntime organisation's set of decoder definitions on
``onnxscript.nn``; with ``execution_provider="cpu"`` it emits the same fused contrib ops as the
onnxruntime-genai model builder (``GroupQueryAttention`` with rotary inside,
``SkipSimplifiedLayerNormalization``), for every decoder family it registers, from the config
alone, without weights and without torch modules.

What we add around it (and why it is not mobius' own quantized path):

* **Module replacement after construction** (`replace_linears`). Every mobius ``Linear`` the
  `SinqConfig` quantizes is swapped for `SinqMatMul`, which emits ``[Mul(x, t)] ->
  MatMulNBits | sinq.ops::SinqMatMulNBits [-> Add(bias)]``. Generic over architectures (no
  per-family ``linear_class`` plumbing, which e.g. mobius' Gemma3 layer ignores), and it
  carries our column scale ``t`` and custom op, which mobius' ``QuantizedLinear`` lacks.
* **Weights are bound afterwards, lazily** (`weights.bind_weights`): the graph is built with
  empty initializers and nothing is loaded until the writer asks for a tensor.
* Lazy constant folds (`fold_constant_transposes`): mobius leaves ``Transpose(W)`` in front of a
  float ``MatMul`` and folds it once weights are loaded (which would materialise them all);
  we replace it by a lazily transposed initializer instead.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnxscript import OpBuilder, nn

from ..contract import (
    EMBEDDING_OP,
    STOCK_OP,
    SUPPORTED_MODEL_TYPES,
    TABLE_OPS,
    custom_op_inputs,
)
from ..quant import packing
from . import families
from .graph import ExportError
from .layout import NodeChoice
from .placement import Mode, Placement
from .rope import rope_sections, rope_type, transformers_tables, use_transformers_tables

# Their RMSNorm weights enter the graph as ``1 + w``: no column scale folds into them.
OFFSET_NORM_MODEL_TYPES = ("gemma3_text",)
# rope_scaling / rope_parameters "rope_type" values whose transformers tables we ship and test
# (`rope`: dynamic and longrope only where their angles do not depend on the sequence length).
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "dynamic", "yarn", "longrope")


@dataclass(frozen=True)
class LinearPlan:
    """How one HF linear becomes a quantized node (decided before the graph is built)."""

    name: str  # HF module name, e.g. model.layers.0.self_attn.q_proj
    shape: tuple[int, int]  # (N, K)
    bits: int
    group_size: int
    choice: NodeChoice
    col_scale: Placement
    has_bias: bool
    accuracy_level: int
    shared_with: str | None = None  # a tied head reads this embedding's tensors
    # False: every zero point is MatMulNBits' default 2^(bits-1) (symmetric codes at the
    # container's width), so the input is left out: onnxruntime then runs its zero-point-free
    # kernel, ~15 % faster per call on SmolLM2's shapes (bench/results/decode_step.md).
    zero_points: bool = True
    # Input channels taken out of an int8-activation node's input and multiplied in float
    # beside it (`quant.int8`): the few loud channels that would take the rest of their
    # blocks' int8 bits (`export.accuracy`).
    exact_channels: tuple[int, ...] = ()

    @property
    def col_scale_input(self) -> bool:
        return self.col_scale.has_input

    @property
    def col_scale_mul(self) -> bool:
        return self.col_scale.multiplied

    @property
    def ratio_of(self) -> str | None:
        """The linear whose t the input already carries (folded into the norm both read)."""
        return self.col_scale.ratio_of


class ExactChannels(nn.Module):
    """The plan's exact channels, taken out of an int8-activation node's input and multiplied
    in float beside it: ``y = node(x * int8_mask) + x[..., index] @ weight`` (``weight``
    ``[c, N]``: the node's own dequantized columns); the node and the sum stay the linear's
    own. Parameters ``<linear>.exact.{index,int8_mask,weight}``."""

    def __init__(self, plan: LinearPlan) -> None:
        super().__init__()
        n, k = plan.shape
        c = len(plan.exact_channels)
        if c and plan.choice.op != STOCK_OP:
            raise ExportError(f"{plan.name}: exact channels need MatMulNBits, not {plan.choice.op}")
        self.index = nn.Parameter([c], dtype=ir.DataType.INT64) if c else None
        self.int8_mask = nn.Parameter([k]) if c else None
        self.weight = nn.Parameter([c, n]) if c else None

    def forward(self, op: OpBuilder, x: ir.Value) -> tuple[ir.Value, ir.Value | None]:
        """(the node's input, the exact channels' product to add to its output, or None)."""
        if self.index is None:
            return x, None
        return op.Mul(x, self.int8_mask), op.MatMul(op.Gather(x, self.index, axis=-1),
                                                   self.weight)


class SinqMatMul(nn.Module):
    """``y = (x * t) @ ((Q - z) * s).T + b`` as onnxruntime nodes; parameters = record tensors.

    Parameter names (``qweight``, ``scales``, ``qzeros``, ``col_scale``, ``bias`` under the HF
    module name; with exact channels ``exact.index``, ``exact.int8_mask``, ``exact.weight``)
    are the export format's contract (docs/export-format.md).
    """

    def __init__(self, plan: LinearPlan) -> None:
        super().__init__()
        self._plan = plan
        n, k = plan.shape
        nb = packing.n_blocks(k, plan.group_size)
        bits = plan.choice.container_bits
        self.qweight = nn.Parameter([n, nb, packing.packed_block_bytes(plan.group_size, bits)],
                                    dtype=ir.DataType.UINT8)
        self.scales = nn.Parameter([n, nb])
        self.qzeros = nn.Parameter([n, packing.packed_zero_point_bytes(nb, bits)],
                                   dtype=ir.DataType.UINT8) if plan.zero_points else None
        self.col_scale = nn.Parameter([k]) if plan.col_scale_input else None
        self.bias = nn.Parameter([n]) if plan.has_bias else None
        self.exact = ExactChannels(plan)

    def forward(self, op: OpBuilder, x: ir.Value) -> ir.Value:
        plan = self._plan
        n, k = plan.shape
        attrs = {"K": k, "N": n, "bits": plan.choice.container_bits,
                 "block_size": plan.group_size}
        if plan.choice.op == STOCK_OP:
            if plan.col_scale_mul:
                x = op.Mul(x, self.col_scale)
            x, exact = self.exact(op, x)
            zero_points = () if self.qzeros is None else (self.qzeros,)
            y = op.MatMulNBits(x, self.qweight, self.scales, *zero_points,
                               accuracy_level=plan.accuracy_level, _domain=plan.choice.domain,
                               **attrs)
            if exact is not None:
                y = op.Add(y, exact)
            return y if self.bias is None else op.Add(y, self.bias)
        op.builder.graph.opset_imports[plan.choice.domain] = 1
        if plan.col_scale_mul:
            x = op.Mul(x, self.col_scale)
        t = self.col_scale if plan.col_scale.mode is Mode.FUSED else None
        inputs = custom_op_inputs({"A": x, "B": self.qweight, "scales": self.scales,
                                   "zero_points": self.qzeros, "col_scale": t, "bias": self.bias})
        y = op.SinqMatMulNBits(*inputs, _domain=plan.choice.domain, **attrs)
        y.dtype = self.scales.dtype  # the graph's float type (custom ops carry no inference)
        # decoder activations are [batch, sequence, features]
        y.shape = ir.Shape([*x.shape[:-1], n]) if x.shape is not None else ir.Shape(
            ["batch", "sequence_len", n])
        return y


# ------------------------------------------------------------------------------ config


def check_supported(config: Mapping, folder: object) -> str:
    """The config's model_type, after refusing what the builder cannot honour (one line each).

    (`Checkpoint.open` has already refused a model_type that disagrees with architectures.)
    """
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ExportError(
            f"{folder}: config.json model_type={model_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    heads = config.get("num_attention_heads") or 1
    head_dim = config.get("head_dim") or (config.get("hidden_size") or 0) // heads
    if head_dim % 16:
        field = "head_dim" if config.get("head_dim") else "hidden_size / num_attention_heads"
        raise ExportError(f"{folder}: config.json {field}={head_dim} is not supported "
                          "(GroupQueryAttention's rotary needs a multiple of 16)")
    for field, rope in rope_sections(config):
        kind = rope_type(rope)
        if kind not in SUPPORTED_ROPE_TYPES:
            raise ExportError(
                f"{folder}: config.json {field}.rope_type={kind!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    families.check_family_config(config, folder)
    return model_type


def mobius_model(hf_config: object, dtype: ir.DataType = ir.DataType.FLOAT):
    """(mobius module, mobius config) for a transformers config; no weights involved."""
    from mobius._config_resolver import _config_from_hf  # the resolver mobius.build uses
    from mobius._registry import registry

    families.check_window(hf_config, dtype)
    tables = transformers_tables(hf_config)  # refuses a rope a static table cannot hold
    module_class = registry.get(hf_config.model_type)
    cfg = _config_from_hf(hf_config, parent_config=hf_config, module_class=module_class)
    if dtype != cfg.dtype:
        cfg = dataclasses.replace(cfg, dtype=dtype)
    module = families.adapt(module_class(cfg), cfg, hf_config)
    use_transformers_tables(module, tables)
    return module, cfg


def linear_shapes(module: nn.Module) -> dict[str, tuple[tuple[int, int], bool]]:
    """HF module name -> ((N, K), has_bias) for every mobius ``Linear`` (tied heads included)."""
    from mobius.components import Linear

    out = {}
    for name, m in module.named_modules():
        if isinstance(m, Linear):
            n, k = (int(d) for d in m.weight.shape)
            out[name] = ((n, k), m.bias is not None)
    return out


class SinqEmbedding(nn.Module):
    """Quantized token embedding: ``GatherBlockQuantized`` rows (or the same in standard ops,
    ``GraphConfig.table_ops``), then ``* t`` (t acts on the columns, so it follows the
    gather). ``qweight`` is the record's packed codes viewed 2-D ``[V, K*bits/8]`` (same
    bytes), the layout GatherBlockQuantized reads. ``embed_scale`` is the factor of the
    embedding it replaces (Gemma's ``sqrt(hidden)``; 1 elsewhere)."""

    def __init__(self, plan: LinearPlan, embed_scale: float = 1.0) -> None:
        super().__init__()
        self._plan = plan
        self._embed_scale = float(embed_scale)
        v, k = plan.shape
        nb = packing.n_blocks(k, plan.group_size)
        bits = plan.choice.container_bits
        self.qweight = nn.Parameter([v, k * bits // 8], dtype=ir.DataType.UINT8)
        self.scales = nn.Parameter([v, nb])
        self.qzeros = nn.Parameter([v, packing.packed_zero_point_bytes(nb, bits)],
                                   dtype=ir.DataType.UINT8)
        self.col_scale = nn.Parameter([k]) if plan.col_scale_input else None

    def forward(self, op: OpBuilder, input_ids: ir.Value) -> ir.Value:
        plan = self._plan
        if plan.choice.op == EMBEDDING_OP:
            y = op.GatherBlockQuantized(self.qweight, input_ids, self.scales, self.qzeros,
                                        bits=plan.choice.container_bits, block_size=plan.group_size,
                                        gather_axis=0, quantize_axis=1, _domain=plan.choice.domain)
        else:
            y = self._dequantized_rows(op, input_ids)
        y.dtype = self.scales.dtype
        y.shape = ir.Shape([*(input_ids.shape or ["batch", "sequence_len"]), plan.shape[1]])
        if self._embed_scale != 1.0:
            y = op.Mul(y, self._embed_scale)
        return y if self.col_scale is None else op.Mul(y, self.col_scale)

    def _dequantized_rows(self, op: OpBuilder, input_ids: ir.Value) -> ir.Value:
        """What GatherBlockQuantized returns, in standard ops: the rows' codes, zero points
        and scales gathered, then ``(q - z) * s`` per block (every step exact but the one
        product, so the numbers are the contrib op's)."""
        plan = self._plan
        _, k = plan.shape
        g, bits = plan.group_size, plan.choice.container_bits
        nb = packing.n_blocks(k, g)
        dtype = self.scales.dtype
        codes = _unpacked(op, op.Gather(self.qweight, input_ids, axis=0), bits, dtype)
        zeros = _unpacked(op, op.Gather(self.qzeros, input_ids, axis=0), bits, dtype)
        if bits * nb % 8:  # the last byte's high nibble pads an odd count of 4-bit zero points
            zeros = op.Slice(zeros, [0], [nb], [2])
        scales = op.Gather(self.scales, input_ids, axis=0)
        blocks = op.Reshape(codes, [0, 0, nb, g])
        rows = op.Mul(op.Sub(blocks, op.Unsqueeze(zeros, [-1])), op.Unsqueeze(scales, [-1]))
        return op.Reshape(rows, [0, 0, k], _outputs=[table_rows(plan.name)])


def table_rows(name: str) -> str:
    """The name given to the gathered, dequantized rows of the standard-op table ``name``
    (what GatherBlockQuantized's own output holds); the graph's value ends with it."""
    return f"{name}.rows"


def _unpacked(op: OpBuilder, packed: ir.Value, bits: int, dtype: ir.DataType) -> ir.Value:
    """uint8 ``[batch, sequence, bytes]`` -> the codes they hold as ``dtype`` ``[batch, sequence,
    bytes * 8 / bits]``, low nibble first (`quant.packing`). The nibbles are split in float
    arithmetic (exact below 256), which needs only ops every runtime has for floats, rather
    than integer bit operations."""
    value = op.Cast(packed, to=dtype)
    if bits == 8:
        return value
    high = op.Floor(op.Mul(value, 1.0 / 16))
    low = op.Sub(value, op.Mul(high, 16.0))
    pairs = op.Concat(op.Unsqueeze(low, [-1]), op.Unsqueeze(high, [-1]), axis=-1)
    return op.Reshape(pairs, [0, 0, -1])


class SinqTiedHead(nn.Module):
    """lm_head tied to a `SinqEmbedding`: the same record (one copy of the table on disk),
    its codes reshaped back to MatMulNBits' ``[V, nb, blob]`` (a view ORT folds at load)."""

    def __init__(self, embedding: SinqEmbedding, plan: LinearPlan) -> None:
        super().__init__()
        self._plan = plan
        self.qweight, self.scales, self.qzeros = (embedding.qweight, embedding.scales,
                                                  embedding.qzeros)
        self.col_scale = embedding.col_scale if plan.col_scale.mode is Mode.MUL else None
        self.exact = ExactChannels(plan)

    def forward(self, op: OpBuilder, x: ir.Value) -> ir.Value:
        plan = self._plan
        n, k = plan.shape
        bits = plan.choice.container_bits
        blob = packing.packed_block_bytes(plan.group_size, bits)
        shape = np.array([n, packing.n_blocks(k, plan.group_size), blob], dtype=np.int64)
        if self.col_scale is not None:
            x = op.Mul(x, self.col_scale)
        x, exact = self.exact(op, x)
        w = op.Reshape(self.qweight, op.Constant(value=ir.tensor(shape)))
        y = op.MatMulNBits(x, w, self.scales, self.qzeros, K=k, N=n, bits=bits,
                           block_size=plan.group_size, accuracy_level=plan.accuracy_level,
                           _domain=plan.choice.domain)
        return y if exact is None else op.Add(y, exact)


def _submodule(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, leaf = name.rpartition(".")
    parent = module
    for part in parent_name.split(".") if parent_name else ():
        parent = getattr(parent, part) if not part.isdigit() else parent[int(part)]
    return parent, leaf


def replace_linears(module: nn.Module, plans: Mapping[str, LinearPlan]) -> None:
    """Swap each planned mobius ``Linear`` for a `SinqMatMul` and a planned embedding for a
    `SinqEmbedding` (+ `SinqTiedHead`), in place, before the build."""
    for name, plan in plans.items():
        if plan.choice.op in TABLE_OPS:
            parent, leaf = _submodule(module, name)
            old = getattr(parent, leaf)
            setattr(parent, leaf, SinqEmbedding(plan, getattr(old, "embed_scale", 1.0)))
    for name, plan in plans.items():
        parent, leaf = _submodule(module, name)
        if plan.shared_with is not None:
            emb_parent, emb_leaf = _submodule(module, plan.shared_with)
            setattr(parent, leaf, SinqTiedHead(getattr(emb_parent, emb_leaf), plan))
        elif plan.choice.op not in TABLE_OPS:
            setattr(parent, leaf, SinqMatMul(plan))


def build_graph(module: nn.Module, cfg: object) -> ir.Model:
    """mobius' CPU build: GQA + SkipSimplifiedLayerNorm fusions, q/k/v packing for float MatMuls."""
    from mobius import build_from_module

    logging.getLogger("mobius").setLevel(logging.ERROR)  # per-pass chatter
    pkg = build_from_module(module, cfg, execution_provider="cpu")
    return pkg["model"]


# ------------------------------------------------------------------------------ lazy folds


def _const_input(value: ir.Value | None) -> bool:
    return value is not None and value.is_initializer() and value.const_value is not None


# Concat outputs named by `fusions` (``<attention>.qkv_proj.qweight`` ...) keep their name.
_NAMED_PACKS = (".qweight", ".scales", ".qzeros", ".bias")


def fold_constant_transposes(model: ir.Model) -> int:
    """``Transpose(W)`` / ``Concat(W1, W2, ...)`` of initializers -> one lazy initializer.

    Run after `weights.bind_weights` (so inputs have their lazy ``const_value``). The folded
    tensor is computed only when the writer asks for it; the old initializers stay if another
    node still reads them (a tied embedding) and are dropped otherwise.
    """
    graph = model.graph
    folded = 0
    for node in list(graph):
        if node.op_type not in ("Transpose", "Concat") or node.domain not in ("", "ai.onnx"):
            continue
        if not all(_const_input(v) for v in node.inputs):
            continue
        out = node.outputs[0]
        srcs = [v.const_value for v in node.inputs]
        if node.op_type == "Transpose":
            perm = node.attributes.get_ints("perm", None)
            if perm is None or list(perm) != [1, 0]:
                continue
            shape = ir.Shape([srcs[0].shape[1], srcs[0].shape[0]])

            def func(src: ir.TensorProtocol = srcs[0]) -> ir.Tensor:
                return ir.tensor(np.ascontiguousarray(src.numpy().T))
        else:
            axis = node.attributes.get_int("axis", 0)
            dims = [list(s.shape) for s in srcs]
            cat = dims[0][:]
            cat[axis] = sum(d[axis] for d in dims)
            shape = ir.Shape(cat)

            def func(srcs: list[ir.TensorProtocol] = srcs, axis: int = axis) -> ir.Tensor:
                return ir.tensor(np.concatenate([s.numpy() for s in srcs], axis=axis))
        name = out.name if out.name and out.name.endswith(_NAMED_PACKS) else \
            f"{node.inputs[0].name}.{node.op_type.lower()}d"
        out.name = f"{name}.unfolded"  # frees the name for the initializer
        new = ir.Value(name=name, shape=shape, type=ir.TensorType(srcs[0].dtype),
                       const_value=ir.LazyTensor(func, dtype=srcs[0].dtype, shape=shape, name=name))
        graph.register_initializer(new)
        out.replace_all_uses_with(new)
        if out.is_graph_output():
            continue
        graph.remove(node, safe=True)
        folded += 1
    for name in [n for n, v in graph.initializers.items() if not v.uses() and not v.is_graph_output()]:
        graph.initializers.pop(name)
    return folded


def node_of(model: ir.Model, initializer: str, op_type: str) -> ir.Node:
    """The ``op_type`` node reading ``initializer`` (through a Reshape for a tied head)."""
    value = model.graph.initializers[initializer]
    users = [u.node for u in value.uses()]
    users += [u.node for n in users if n.op_type == "Reshape" for u in n.outputs[0].uses()]
    found = [n for n in users if n.op_type == op_type]
    if len(found) != 1:
        raise ExportError(f"initializer {initializer!r} has {len(found)} {op_type} readers, "
                          "expected 1")
    return found[0]


def hf_module_names(module: nn.Module) -> list[str]:
    """All module names (for include/exclude patterns that name nothing: a clear error)."""
    return [n for n, _ in module.named_modules() if n]


def matches_any(patterns: tuple[str, ...], name: str) -> bool:
    return any(re.search(p, name) for p in patterns)
