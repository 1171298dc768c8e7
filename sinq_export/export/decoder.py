"""Causal-LM route: HF folder -> built fused graph (mobius) -> streamed SINQ weights -> OUT_DIR.

Stages: ``plan`` (config.json -> which linears are quantized, how their t is placed), ``build``
(mobius' CPU decoder with our quantized linears swapped in, no weights), ``write`` (onnx_ir's
writer pulls each initializer in graph order; a quantized linear is quantized the moment its
first tensor is asked for and released after its last), ``check`` (onnx checker on the files).
The float torch model and the float graph never exist, so memory is bounded by the largest
tensor plus the few records in flight (docs/export-format.md, "Streaming").
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import onnx
import onnx_ir as ir
import torch

from ..calibration.probe import probe_energies
from ..checkpoint import Checkpoint
from ..config import ACCURACY_AUTO, ConfigError, GraphConfig, SinqConfig
from ..contract import (
    CUSTOM_DOMAIN,
    DATA_FILE_LIMIT,
    DIM_NAMES,
    EMBEDDING_OP,
    FOLDED_T_FILE,
    MODEL_FILE,
    STANDARD_DOMAIN,
    STANDARD_TABLE_OP,
    STOCK_DOMAIN,
    STOCK_OP,
    TABLE_OPS,
    add_transformers_js_config,
    data_file_names,
)
from ..io import atomic_output_dir, check_output, scratch_dir, write_json
from ..linear import SinqLinear, set_module
from ..models import hub_offline, load_causal_lm, missing_tokenizer
from ..planning import quantize_planned
from ..presets import DEFAULT_PRESET, Preset, get_preset
from ..quant.allocate import WIDTHS as ALLOCATION_WIDTHS
from ..quant.methods import yields_col_scale
from ..quant.record import QuantizedWeight
from ..quant.units import SHARED_INPUT_GROUPS, joint_groups
from ..quantize import quantize_model
from ..saved import SpilledRecords
from . import builder
from .accuracy import (
    INT8_LEVEL,
    Int8Measurement,
    Int8Observer,
    accuracy_section,
    choose_levels,
    exact_channels,
    measure_int8,
)
from .diskspace import check_free_space, estimate_output_bytes, quantized_tensor_bytes
from .fusions import PackedRows, pack_qkv
from .genai import genai_config
from .graph import ExportError
from .layout import NodeChoice, choose_node
from .manifest import MANIFEST_FILE, MANIFEST_MARKER, ExportResult, build_manifest, versions
from .placement import FUSED, MUL, NONE, Placement, folded, ratio
from .reference import save_reference
from .stages import Stages
from .weights import PARTS, LinearBinding, RecordCache, bind_weights

if TYPE_CHECKING:  # typing only: transformers is slow to import
    from transformers import PretrainedConfig

# onnx_ir writes the IR version of the opsets it saw (11 for mobius' opset 24); onnxruntime
# 1.32 reads <= 13. Pinned so the bytes do not move with onnx_ir releases.
IR_VERSION = 11
# initializers larger than this go to the data files (onnx_ir's default threshold)
EXTERNAL_THRESHOLD = 256
_HF_FILE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
_NOT_COPIED = ("model.safetensors.index.json",)


@dataclass(frozen=True)
class Plan:
    linears: dict[str, builder.LinearPlan]
    sources: dict[str, str]  # linear -> checkpoint tensor of its float weight
    units: dict[str, tuple[str, ...]]  # linear -> joint quantization unit
    row_scale_from: dict[str, str]  # up_proj -> down_proj (v_proj -> o_proj) whose t scales its rows
    norm_folds: dict[str, str]  # norm weight initializer -> linear whose t it absorbs
    quantize_as: dict[str, str]  # a tied table quantized as its head (one record for both)
    row_scale_heads: dict[str, int] = field(default_factory=dict)  # v_proj -> kv heads of its rows


def _weight_source(name: str, ckpt: Checkpoint, tied: bool) -> str:
    own = f"{name}.weight"
    if own not in ckpt and name == "lm_head" and tied and "model.embed_tokens.weight" in ckpt:
        return "model.embed_tokens.weight"
    ckpt.require(own)
    return own


def _has_col_scale(names: tuple[str, ...], sources: Mapping[str, str], ckpt: Checkpoint,
                   config: SinqConfig, bits: int) -> bool:
    """Whether the unit's records will carry a t, as its method declares (decided before the
    graph exists; a method that decides per weight reads the unit's weights once more)."""
    method = config.method_config(names[0], bits)
    return yields_col_scale(method, lambda: torch.cat([ckpt.load(sources[n]) for n in names]),
                            calibrated=config.is_calibrated(names[0]))


def _norm_read_by(name: str) -> str | None:
    """The norm weight whose output ``name`` reads, in Llama-family decoders (every type in
    `contract.SUPPORTED_MODEL_TYPES`): q/k/v (Phi3's fused qkv_proj) read ``input_layernorm``'s
    output, gate/up (gate_up_proj) ``post_attention_layernorm``'s, ``lm_head`` the final norm."""
    parent, _, leaf = name.rpartition(".")
    layer = parent.rpartition(".")[0]
    if leaf in ("q_proj", "k_proj", "v_proj", "qkv_proj"):
        return f"{layer}.input_layernorm.weight"
    if leaf in ("gate_proj", "up_proj", "gate_up_proj"):
        return f"{layer}.post_attention_layernorm.weight"
    return "model.norm.weight" if name == "lm_head" else None


# How many linears read the norm before each one (the widest same-input groups): a t folds into
# the norm only when the linear's unit holds all of them.
NORM_READERS = {leaf: len(group) for group in SHARED_INPUT_GROUPS["all"] for leaf in group}


def _fold_targets(name: str, units: Mapping[str, tuple[str, ...]], planned: Mapping[str, int],
                  offset_norms: bool, o_proj_tied: bool) -> tuple[str, str] | None:
    """('norm', initializer) or ('rows', linear) where ``name``'s t folds exactly, else None.

    A t that every reader of a norm shares (one joint unit, or a single reader) multiplies that
    norm's weight; ``down_proj`` reads ``act(gate) * up``, so its t multiplies ``up_proj``'s
    output rows; ``o_proj`` reads each query head's ``softmax(q k^T) v``, linear in its kv
    head's values, so a t tied across each GQA group (``o_proj_tied``) multiplies
    ``v_proj``'s rows. Norms computed as ``x * (1 + w)`` (``offset_norms``: Gemma) cannot
    absorb a t into ``w``; only the row folds apply.
    """
    parent, _, leaf = name.rpartition(".")
    if leaf == "down_proj" and f"{parent}.up_proj" in planned:
        return ("rows", f"{parent}.up_proj")
    if leaf == "o_proj" and o_proj_tied and f"{parent}.v_proj" in planned:
        return ("rows", f"{parent}.v_proj")
    norm = _norm_read_by(name)
    if offset_norms or norm is None:
        return None
    if len(units[name]) == NORM_READERS.get(leaf, 1):
        return ("norm", norm)
    return None


def _fold_lead_into_norms(modes: dict[str, Placement], norm_folds: dict[str, str],
                          linears: Sequence[str]) -> None:
    """Readers of one norm with their own t: the first one's t goes into the norm weight,
    each other reader multiplies by its t over the first's (a ratio placement).

    ``(x * w * t_q) * (t_k / t_q) = (x * w) * t_k``: exact, and one Mul fewer per norm (q/k/v:
    three Muls become two; gate/up: two become one). Only when every reader of the norm is a
    quantized linear applying its t by a Mul (a float reader would see the scaled norm).
    """
    readers: dict[str, list[str]] = defaultdict(list)
    for name in linears:
        if (norm := _norm_read_by(name)) is not None:
            readers[norm].append(name)
    for norm, names in readers.items():
        if norm in norm_folds or len(names) < 2 or any(modes.get(n) != MUL for n in names):
            continue
        lead = names[0]
        norm_folds[norm] = lead
        modes[lead] = folded(norm.removesuffix(".weight"))
        for n in names[1:]:
            modes[n] = ratio(lead)


EMBEDDING = "model.embed_tokens"


def _embedding_shape(module: object) -> tuple[int, int] | None:
    from mobius.components import Embedding

    parent, leaf = builder._submodule(module, EMBEDDING)
    emb = getattr(parent, leaf, None)
    return tuple(int(d) for d in emb.weight.shape) if isinstance(emb, Embedding) else None


def _default_zero_points(config: SinqConfig, bits: int, choice: NodeChoice,
                         shared_with: str | None) -> bool:
    """Whether every zero point is stock MatMulNBits' implied 2^(bits-1), so the node can
    omit the input: symmetric codes stored at their own width (a 3-bit symmetric zero point,
    4, is not a 4-bit container's 8). Tables (GatherBlockQuantized) and the head that reads
    a table keep theirs."""
    return (config.symmetric and choice.op == STOCK_OP and choice.container_bits == bits
            and shared_with is None)


def plan_export(module: object, ckpt: Checkpoint, config: SinqConfig, graph: GraphConfig,
                tied: bool) -> Plan:
    """Decide every quantized linear's node, container and t placement from the config
    (with accuracy level ``"auto"`` every node at level 4 until `_measured_levels`)."""
    shapes = builder.linear_shapes(module)
    bits = {n: b for n in shapes if (b := config.bits_for(n)) is not None}
    sources = {n: _weight_source(n, ckpt, tied) for n in bits}
    for n, src in sources.items():
        ckpt.require(src, shapes[n][0])
    embedding, shared_head = None, False
    group_sizes = {n: config.group_size_for(n) for n in bits}
    if graph.embedding_bits is not None:
        embedding = _embedding_shape(module)
        if embedding is None:
            raise ExportError(f"embedding_bits: this architecture has no plain {EMBEDDING} table")
        # a tied head at the same width reads the embedding's record: one table on disk,
        # quantized as the head (its group size, its calibration)
        shared_head = tied and bits.get("lm_head") == graph.embedding_bits
        group = config.group_size_for("lm_head") if shared_head else config.group_size
        if embedding[1] % group:
            raise ExportError(f"embedding_bits: hidden size {embedding[1]} is not a multiple of "
                              f"group_size {group} (GatherBlockQuantized blocks)")
        sources[EMBEDDING] = _weight_source(EMBEDDING, ckpt, tied)
        shapes[EMBEDDING] = (embedding, False)
        bits[EMBEDDING] = graph.embedding_bits
        group_sizes[EMBEDDING] = group
    groups = joint_groups(bits, {n: (bits[n], group_sizes[n]) for n in bits},
                          config.shared_col_scale)
    units = {n: (n,) for n in bits}
    for g in groups:
        for n in g:
            units[n] = tuple(g)
    if shared_head:
        units["lm_head"] = (EMBEDDING,)
    offset_norms = ckpt.config.get("model_type") in builder.OFFSET_NORM_MODEL_TYPES
    o_proj_tied = _check_o_proj_tie(config, ckpt)
    has_t = {}
    for unit in dict.fromkeys(units.values()):
        t = _has_col_scale(unit, sources, ckpt, config, bits[unit[0]])
        has_t.update(dict.fromkeys(unit, t))
    if shared_head:
        has_t["lm_head"] = has_t[EMBEDDING]

    modes: dict[str, Placement] = {}
    row_scale_from: dict[str, str] = {}
    row_scale_heads: dict[str, int] = {}
    norm_folds: dict[str, str] = {}
    choices = {n: choose_node(bits[n], graph.runtime, graph.col_scale) for n in bits}
    if embedding is not None:
        choices[EMBEDDING] = (
            NodeChoice(EMBEDDING_OP, STOCK_DOMAIN, graph.embedding_bits, False)
            if graph.table_ops == "contrib" else
            NodeChoice(STANDARD_TABLE_OP, STANDARD_DOMAIN, graph.embedding_bits, False))
    for n in bits:
        choice = choices[n]
        if not has_t[n]:
            modes[n] = NONE
        elif n == EMBEDDING:
            modes[n] = MUL  # t scales the gathered rows' columns: after the gather
        elif choice.fused_col_scale and not (shared_head and n == "lm_head"):
            modes[n] = FUSED
        elif graph.col_scale == "fold" and (
                target := _fold_targets(n, units, bits, offset_norms, o_proj_tied)):
            kind, where = target
            if kind == "rows":
                row_scale_from[where] = n
                if where.endswith(".v_proj"):
                    row_scale_heads[where] = config.o_proj_tie[0]
            else:
                norm_folds.setdefault(where, units[n][0])
            modes[n] = folded(where.removesuffix(".weight"))
        else:
            modes[n] = MUL
    if graph.col_scale == "fold" and not offset_norms:
        _fold_lead_into_norms(modes, norm_folds, list(shapes))
    if o_proj_tied:  # a tie that does not fold is perplexity lost for nothing
        into_rows = set(row_scale_from.values())
        stuck = next((n for n in bits if n.endswith(".o_proj") and n not in into_rows), None)
        if stuck is not None:
            raise ExportError(f"o_proj_tie: {stuck}'s t cannot fold into a v_proj (it needs "
                              "col_scale 'fold' and a quantized, separate v_proj)")
    if shared_head:
        choices["lm_head"] = NodeChoice(STOCK_OP, STOCK_DOMAIN, graph.embedding_bits, False)
    shared = {n: EMBEDDING if shared_head and n == "lm_head" else None for n in bits}
    linears = {
        n: builder.LinearPlan(
            name=n, shape=shapes[n][0], bits=bits[n], group_size=group_sizes[n],
            choice=choices[n], col_scale=modes[n], has_bias=shapes[n][1],
            accuracy_level=INT8_LEVEL if graph.accuracy_level == ACCURACY_AUTO
            else graph.accuracy_level, shared_with=shared[n],
            zero_points=not _default_zero_points(config, bits[n], choices[n], shared[n]))
        for n in bits
    }
    if shared_head:
        del units["lm_head"], sources["lm_head"]
    quantize_as = {EMBEDDING: "lm_head"} if shared_head else {}
    return Plan(linears, sources, units, row_scale_from, norm_folds, quantize_as, row_scale_heads)


def _check_o_proj_tie(config: SinqConfig, ckpt: Checkpoint) -> bool:
    """Whether o_proj's t is tied per GQA group; a tie that is not this model's attention
    layout would fold wrong values into v_proj's rows, so it is refused."""
    if config.o_proj_tie is None:
        return False
    try:
        expected = config.tie_o_proj_for(ckpt.config).o_proj_tie
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    if config.o_proj_tie != expected:
        raise ExportError(f"o_proj_tie={list(config.o_proj_tie)} does not match the model's "
                          f"attention (kv heads, heads per kv head) = {list(expected)}")
    return True


def _measured_levels(folder: Path, ckpt: Checkpoint, plan: Plan,
                     records: Mapping[str, QuantizedWeight], tied: bool, observer: Int8Observer
                     ) -> tuple[Plan, Int8Measurement]:
    """``plan`` with each MatMulNBits node's accuracy level chosen from its measured int8 error
    (`export.accuracy`), the exact channels of an output projection at level 4, and the
    measurement. ``observer`` rode on the export's float pass (probe or calibration); without
    one it gets its own pass now."""
    nodes = {n: p.group_size for n, p in plan.linears.items() if p.choice.op not in TABLE_OPS}
    sources = {n: _weight_source(n, ckpt, tied) for n in nodes}
    col_scales = {n: r.col_scale for n, r in records.items()}
    try:
        if not observer.done:
            measure_int8(folder, observer)
        measured = observer.measurement(ckpt, nodes, sources, col_scales,
                                        splittable=[n for n in plan.linears if _splittable(n, plan)])
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    levels = choose_levels(measured.errors, measured.divergence, head_top1=measured.head_top1)
    exact = exact_channels(levels, measured)
    linears = {n: replace(p, accuracy_level=levels[n], exact_channels=exact.get(n, ()))
               if n in levels else p for n, p in plan.linears.items()}
    return replace(plan, linears=linears), measured


def _splittable(name: str, plan: Plan) -> bool:
    """Whether the graph can take input channels of this linear's node out of its int8 input
    (`builder.ExactChannels`): a MatMulNBits (a tied head's reads the table's record) whose
    float columns are its dequantized ones, so no t may be folded into its rows."""
    return plan.linears[name].choice.op == STOCK_OP and name not in plan.row_scale_from


def _check_records(records: Mapping[str, QuantizedWeight], plan: Plan, config: SinqConfig
                   ) -> None:
    """Precomputed records must be what the plan would have quantized (name, shape, bits,
    group size), and carry no t where the plan places none (the graph would drop it)."""
    for name, record in records.items():
        p = plan.linears.get(name)
        if p is None:
            continue  # kept float
        if p.shared_with is not None:  # a tied head's record becomes the shared table
            p = plan.linears[p.shared_with]
        if tuple(record.shape) != tuple(p.shape) or record.bits != p.bits \
                or record.group_size != p.group_size:
            raise ExportError(f"{name}: given record is {record.bits}-bit g{record.group_size} "
                              f"{list(record.shape)}, the plan wants {p.bits}-bit "
                              f"g{p.group_size} {list(p.shape)}")
        if record.col_scale is not None and p.col_scale == NONE:
            raise ExportError(f"{name}: given record has a column scale t; the config's "
                              f"method {config.method!r} gives this layer none")


def _uses(plan: Plan) -> dict[str, int]:
    """How many lazy tensors read each record (so the cache knows when to drop it)."""
    uses = {n: 2 + int(p.zero_points) + int(p.col_scale_input) for n, p in plan.linears.items()
            if p.shared_with is None}
    for n, p in plan.linears.items():
        if p.exact_channels:  # their float columns read the record (a tied head's: the table's)
            uses[p.shared_with or n] += 1
    for src in plan.norm_folds.values():
        uses[src] += 1
    for p in plan.linears.values():
        if (lead := p.ratio_of) is not None:
            uses[lead] += 1
    for target, src in plan.row_scale_from.items():
        uses[src] += 1 + int(plan.linears[target].has_bias)
    return uses


def _copy_hf_files(src: Path, dest: Path) -> None:
    """config, generation config, tokenizer, chat template: every small non-weight file."""
    for path in sorted(src.iterdir()):
        if path.is_file() and path.name.endswith(_HF_FILE_SUFFIXES) and path.name not in _NOT_COPIED:
            shutil.copyfile(path, dest / path.name)


def _copy_ops_library(out: Path) -> None:
    """Put the ``sinq.ops`` library in OUT_DIR: genai loads custom ops only from there, and the
    folder then runs on any machine with the same onnxruntime ABI."""
    from ..runtime_ops import LIB_NAME, RuntimeOpsUnavailable, library_path

    try:
        shutil.copyfile(library_path(), out / LIB_NAME)
    except RuntimeOpsUnavailable as exc:
        raise ExportError(f"runtime=custom needs the sinq.ops library: {exc}") from None


def _value(model: ir.Model, name: str) -> ir.Value:
    """The node output of ``model``'s graph given the name ``name`` when it was built (the
    builder puts the module's scope in front of it)."""
    found = [v for node in model.graph for v in node.outputs if (v.name or "").endswith(name)]
    if len(found) != 1:
        raise ExportError(f"the graph has {len(found)} values named ...{name!r}, expected 1")
    return found[0]


def _layer_records(model: ir.Model, plan: Plan, packed: Mapping[str, PackedRows],
                   int8_errors: Mapping[str, float]) -> dict[str, dict]:
    """Manifest ``layers`` (docs/export-format.md); a linear packed with
    others (q/k/v) names the packed node and its ``rows`` of it. ``int8_errors``: with
    accuracy level ``"auto"``, each linear's measured int8 error (`export.accuracy`)."""
    out = {}
    for name, p in plan.linears.items():
        owner = p.shared_with or name
        rows = [0, p.shape[0]]
        if name in packed:
            owner, rows = packed[name].owner, [packed[name].start, packed[name].stop]
        node = builder.node_of(model, f"{owner}.qweight", p.choice.op)
        # a standard-op table's node gathers its codes; its rows come out several nodes on
        output = (node.outputs[0] if p.choice.op != STANDARD_TABLE_OP
                  else _value(model, builder.table_rows(name)))
        for added in (bool(p.exact_channels), p.has_bias):  # the exact channels' sum, the bias
            users = [u.node for u in output.uses()]
            if added and len(users) == 1 and users[0].op_type == "Add":
                output = users[0].outputs[0]
        out[name] = {
            "bits": p.bits,
            "group_size": p.group_size,
            "op": p.choice.op,
            "container_bits": p.choice.container_bits,
            "shape": list(p.shape),
            "node": node.name,
            "output": output.name,
            "initializers": {
                "packed": f"{owner}.qweight",
                "scales": f"{owner}.scales",
                "zero_points": f"{owner}.qzeros" if p.zero_points else None,
                "col_scale": f"{owner}.col_scale" if p.col_scale_input else None,
                **({"exact_index": f"{name}.exact.index", "int8_mask": f"{name}.exact.int8_mask",
                    "exact_weight": f"{name}.exact.weight"} if p.exact_channels else {}),
            },
            "shared_with": p.shared_with,
            "rows": rows,
            "col_scale_mode": p.col_scale.mode.value,
            "folded_into": p.col_scale.folded_into,
            "ratio_of": p.ratio_of,
            "output_scaled_by": plan.row_scale_from.get(name),
            "output_scale_heads": plan.row_scale_heads.get(name, 1),
            "accuracy_level": None if p.choice.op in TABLE_OPS else p.accuracy_level,
            "exact_channels": list(p.exact_channels),
        }
        if name in int8_errors:
            out[name]["int8_error"] = int8_errors[name]
    return out


def rename_dims(model: ir.Model, names: Mapping[str, str] = DIM_NAMES) -> None:
    """Give every symbolic dim of the graph's values the name other runtimes resolve
    (`contract.DIM_NAMES`); dims not in ``names`` keep theirs."""
    values = [*model.graph.inputs, *model.graph.outputs,
              *(v for node in model.graph for v in node.outputs)]
    for value in values:
        shape = value.shape
        if shape is None or not any(isinstance(d, ir.SymbolicDim) and d.value in names
                                    for d in shape):
            continue
        value.shape = ir.Shape([ir.SymbolicDim(names[d.value]) if isinstance(d, ir.SymbolicDim)
                                and d.value in names else d for d in shape])


def shard_tensors(sizes: Sequence[int], limit: int, pad: int) -> list[int]:
    """How many of the tensors (in order) each data file takes so that no file passes
    ``limit`` bytes (each tensor counted with ``pad`` bytes of alignment). A tensor larger
    than ``limit`` alone gets a file of its own: no runtime can split one tensor."""
    counts: list[int] = []
    used = 0
    for size in sizes:
        if counts and counts[-1] and used + pad + size <= limit:
            counts[-1] += 1
            used += pad + size
        else:
            counts.append(1)
            used = pad + size
    return counts


def _save(model: ir.Model, path: Path, stages: Stages, limit: int = DATA_FILE_LIMIT) -> list[str]:
    """Write the graph and its data files (``model.onnx_data``, ``_1``, ... below ``limit``
    bytes each); returns the data files' names relative to the export folder.

    onnx_ir evaluates each lazy initializer in graph order, writes it and lets it go (measured:
    peak RSS stays flat, see docs/export-format.md); the in-memory values are swapped for
    references to the written files before the graph itself is serialised.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    values = [v for v in model.graph.initializers.values()
              if v.const_value is not None and v.const_value.nbytes > EXTERNAL_THRESHOLD]
    counts = shard_tensors([v.const_value.nbytes for v in values], limit, pad=4096)
    names = data_file_names(path.name, len(counts))
    total = sum(v.const_value.nbytes for v in values)
    try:
        with stages.tensors(total, len(values), desc="write") as bar:
            start = 0
            for name, count in zip(names, counts):
                group = values[start:start + count]
                written = ir.external_data.convert_tensors_to_external(
                    [_WrittenByFile(v.const_value) for v in group], path.parent, name,
                    alignment=64,
                    callback=lambda tensor, info: bar.advance(tensor.name or "", tensor.nbytes))
                for value, tensor in zip(group, written):
                    value.const_value = tensor
                start += count
        ir.save(model, path)  # the small tensors stay inline: evaluated here
    except ir.serde.SerdeError as exc:
        cause = _raised_by_a_tensor(exc)
        raise cause from cause.__cause__
    prefix = path.parent.name
    return [f"{prefix}/{name}" for name in names]


class _WrittenByFile(ir.LazyTensor):
    """A tensor whose bytes go through the data file's own ``write``.

    onnx_ir's default is numpy's ``tofile`` (C ``fwrite``), which reports a full disk or a
    quota as "N requested and M written" / "Not enough free space", without the errno; the
    file's ``write`` raises the OSError with it (ENOSPC, EDQUOT, EFBIG, EIO), so a failed
    write says what happened. A memoryview of the array: the tensor is not copied.
    """

    def __init__(self, tensor: ir.TensorProtocol) -> None:
        super().__init__(lambda: tensor, dtype=tensor.dtype, shape=tensor.shape, name=tensor.name)
        self.source = tensor

    def tofile(self, file: BinaryIO) -> None:
        array = self.source.numpy()  # evaluated once: a quantized part is computed when pulled
        if (array.dtype.kind in "biuf" and array.dtype.isnative and sys.byteorder == "little"
                and array.flags.c_contiguous):
            file.write(memoryview(array).cast("B"))
        else:  # bytes onnx_ir reorders or repacks: its own writer
            ir.Tensor(array, dtype=self.dtype).tofile(file)


def _raised_by_a_tensor(exc: ir.serde.SerdeError) -> BaseException:
    """The error a lazy initializer raised (a damaged checkpoint tensor, an OS error while
    reading it): the serializer wraps it in one SerdeError per level of the model, which
    would turn a bad input into an internal error."""
    cause: BaseException = exc
    while isinstance(cause, ir.serde.SerdeError) and cause.__cause__ is not None:
        cause = cause.__cause__
    return exc if isinstance(cause, ir.serde.SerdeError) else cause


def _transformers_config(folder: Path) -> PretrainedConfig:
    """transformers' config object; a config.json it rejects (a rope dict missing required
    keys, a bad field) is bad input, named in one line."""
    from transformers import AutoConfig

    try:
        with hub_offline():
            return AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (KeyError, ValueError, TypeError) as exc:
        reason = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise ExportError(f"{folder}: transformers rejects config.json ({reason})") from exc


def _save_folded_t(row_folded_t: Mapping[str, np.ndarray], out: Path) -> str | None:
    """``FOLDED_T_FILE`` (None when no t is folded into rows): the t `validate` divides out
    of the rows that absorbed it. It is a witness, not trusted: a t that lets both linears
    match the source weights proves the shipped pair computes what the source does."""
    if not row_folded_t:
        return None
    from safetensors.numpy import save_file

    save_file({n: np.ascontiguousarray(t, dtype=np.float32) for n, t in row_folded_t.items()},
              str(out / FOLDED_T_FILE))
    return FOLDED_T_FILE


def _check_disk(ckpt: Checkpoint, bits: Mapping[str, int], config: SinqConfig,
                graph: GraphConfig, out_dir: Path, spilled: bool) -> None:
    """Refuse (ENOSPC, one line) when OUT_DIR's file system cannot hold the export, its
    checkpoint tensors stored at ``bits`` (tensor -> width; any other tensor in float), and,
    when ``spilled``, the calibrated records that wait beside it until written."""
    needed = estimate_output_bytes(ckpt, lambda name, shape: bits.get(name), config.group_size,
                                   runtime=graph.runtime,
                                   float_bytes=2 if graph.dtype == "fp16" else 4)
    if spilled:
        needed += sum(quantized_tensor_bytes(ckpt.shape(name), b, config.group_size, 4)
                      for name, b in bits.items() if name in ckpt)
    check_free_space(out_dir, needed)


def _planned_widths(plan: Plan) -> dict[str, int]:
    """Checkpoint tensor -> width of every linear the plan quantizes from its own weight."""
    return {src: plan.linears[n].bits for n, src in plan.sources.items() if src == f"{n}.weight"}


def _config_widths(module: object, config: SinqConfig, graph: GraphConfig) -> dict[str, int]:
    """Checkpoint tensor -> width from the config alone, before any statistic is measured. A
    width allocation is not known yet: its linears count at the narrowest width it can pick,
    so this never refuses an export that fits (the plan's exact check follows)."""
    if config.budgeted:
        config = config.replace(bits=min(ALLOCATION_WIDTHS))
    widths = {f"{n}.weight": b for n in builder.linear_shapes(module)
              if (b := config.bits_for(n)) is not None}
    if graph.embedding_bits is not None:
        widths[f"{EMBEDDING}.weight"] = graph.embedding_bits
    return widths


def export_causal_lm(
    model_dir: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    config: SinqConfig | None = None,
    graph_config: GraphConfig | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    with_reference: bool = False,
    allow_unquantized: bool = False,
    records: Mapping[str, QuantizedWeight] | None = None,
    manifest_extra: Mapping[str, object] | None = None,
    preset: str | Preset | None = None,
) -> ExportResult:
    """Quantize a HF causal LM with SINQ and write OUT_DIR (docs/export-format.md).

    ``model_dir=None`` uses the bundled SmolLM2-135M-Instruct. The configs come from
    ``preset`` (a name of `presets.PRESETS` or a `presets.Preset`), or, with no configs and no
    preset, from the ``default`` preset: what ``sinq-export model`` writes (docs/presets.md).
    A config passed without the other keeps the other's plain dataclass defaults.
    ``with_reference`` also writes ``OUT_DIR/reference`` (the PyTorch model, for validating
    away from the source folder; it loads the float model, unlike the export itself). An
    export that quantizes nothing is an error unless ``allow_unquantized``.

    The energy refit (the default, ``config.energy_refit``) first measures every linear's
    input energies on the random-id probe, one float block at a time (`calibration.probe.probe_energies`,
    stage ``calibrate``; manifest section ``probe``), then quantizes tensor by tensor as the
    graph is written. A config that calibrates or allocates widths is quantized first, block
    by block (`planning.quantize_planned`, stage ``calibrate``; sections ``calibration``,
    ``allocation``). ``records``: linears already quantized elsewhere (then nothing is run);
    each must match the plan's shape and width, and the rest are quantized from the
    checkpoint (weight-only). ``manifest_extra``: further manifest sections.
    """
    from ..models import default_model_dir

    out_dir = Path(out_dir)
    folder = default_model_dir() if model_dir is None else Path(model_dir).expanduser()
    config, graph_config, preset_warnings = _configs(folder, config, graph_config, preset)
    check_output(out_dir, overwrite=overwrite, marker=MANIFEST_MARKER, protect=[folder])
    # what the folder will lack, recorded in the manifest as well as returned
    warnings = preset_warnings + [w for w in (missing_tokenizer(folder),) if w]
    run_model = records is None and (config.needs_calibration or config.budgeted)
    probe = records is None and not run_model and config.energy_refit > 0
    auto = graph_config.accuracy_level == ACCURACY_AUTO
    stages = Stages(["plan"] + ["calibrate", "plan"] * (run_model or probe)
                    + ["accuracy"] * auto + ["build", "write", "check"], progress=progress)
    energies = None
    # the accuracy measurement rides on the export's one float pass (probe or calibration)
    observer = Int8Observer(config, {n: r.col_scale for n, r in (records or {}).items()}
                            ) if auto else None
    scratch = contextlib.ExitStack()
    try:
        with stages.stage("plan"):  # everything that can refuse, before the model runs
            ckpt = Checkpoint.open(folder)
            builder.check_supported(ckpt.config, folder)
            hf_config = _transformers_config(folder)
            dtype = ir.DataType.FLOAT16 if graph_config.dtype == "fp16" else ir.DataType.FLOAT
            module, cfg = builder.mobius_model(hf_config, dtype)
            # before the minutes of probing or calibration, not after them
            _check_disk(ckpt, _config_widths(module, config, graph_config), config, graph_config,
                        out_dir, spilled=run_model)
        if run_model:
            with stages.stage("calibrate"):  # statistics from the probe or the calibration text
                # records wait on disk, next to the output, until the writer takes them
                spill = SpilledRecords(scratch.enter_context(scratch_dir(out_dir)))
                config, records, planned = quantize_planned(folder, config, progress=progress,
                                                            spill=spill, observer=observer)
            manifest_extra = {**planned, **(manifest_extra or {})}
        elif probe:
            with stages.stage("calibrate"):  # the input energies, one float block at a time
                measured = probe_energies(folder, config, observer)
            if measured is not None:
                energies, info = measured
                manifest_extra = {"probe": info, **(manifest_extra or {})}
        with stages.stage("plan"):
            tied = bool(getattr(cfg, "tie_word_embeddings", False))
            plan = plan_export(module, ckpt, config, graph_config, tied)
            if not plan.linears and not allow_unquantized:
                raise ExportError("the config quantizes no linear layer (check --exclude / "
                                  "--include); pass allow_unquantized (--allow-unquantized) "
                                  "to export a float model")
            _check_records(records or {}, plan, config)
            # the spilled records are on disk by now: the free space already lacks them
            _check_disk(ckpt, _planned_widths(plan), config, graph_config, out_dir,
                        spilled=False)
        measured = None
        if observer is not None:
            with stages.stage("accuracy"):  # the output projection's int8 error, the levels
                plan, measured = _measured_levels(folder, ckpt, plan, records or {}, tied, observer)
            manifest_extra = {"accuracy": accuracy_section(
                {n: p.accuracy_level for n, p in plan.linears.items() if n in measured.errors},
                measured), **(manifest_extra or {})}
        with stages.stage("build"):
            builder.replace_linears(module, plan.linears)
            model = builder.build_graph(module, cfg)
            packed = pack_qkv(model)
            rename_dims(model)
            model.ir_version = IR_VERSION
            model.producer_name = "sinq-export"
            model.producer_version = versions()["sinq_export"] or ""
            model.graph.name = "sinq-export-decoder"
            cache = RecordCache(ckpt, config, sources=plan.sources, units=plan.units,
                                bits={n: p.bits for n, p in plan.linears.items()},
                                uses=_uses(plan), precomputed=records, energies=energies,
                                quantize_as=plan.quantize_as, keep=with_reference)
            bindings = {n: LinearBinding(p.choice.container_bits, p.col_scale_input,
                                         plan.row_scale_from.get(n),
                                         flat=p.choice.op in TABLE_OPS,
                                         col_scale_over=p.ratio_of,
                                         row_scale_heads=plan.row_scale_heads.get(n, 1),
                                         exact_channels=p.exact_channels,
                                         record_of=p.shared_with)
                        for n, p in plan.linears.items()
                        if p.shared_with is None or p.exact_channels}
            aliases = {"lm_head.weight": "model.embed_tokens.weight"} if tied else {}
            row_folded_t: dict[str, np.ndarray] = {}
            bind_weights(model, ckpt, cache, bindings, norm_folds=plan.norm_folds, aliases=aliases,
                         row_folded_t=row_folded_t)
            builder.fold_constant_transposes(model)
            layers = _layer_records(model, plan, packed, measured.errors if measured else {})
        with atomic_output_dir(out_dir, overwrite, marker=MANIFEST_MARKER,
                               protect=[folder]) as tmp_out:
            with stages.stage("write"):
                data_files = _save(model, tmp_out / MODEL_FILE, stages)
                folded_t_file = _save_folded_t(row_folded_t, tmp_out)
                _copy_hf_files(folder, tmp_out)
                if (tmp_out / "config.json").is_file():
                    add_transformers_js_config(tmp_out / "config.json", len(data_files))
                custom = any(p.choice.domain == CUSTOM_DOMAIN for p in plan.linears.values())
                if custom:
                    _copy_ops_library(tmp_out)
                write_json(tmp_out / "genai_config.json",
                           genai_config(hf_config, folder, custom_ops=custom, filename=MODEL_FILE,
                                        in_place_kv=any(n.op_type == "GroupQueryAttention"
                                                        for n in model.graph)))
                if with_reference:
                    _write_reference(folder, tmp_out, config, cache.made or {})
                manifest = _manifest(model, plan, layers, config, graph_config, folder, tmp_out,
                                     data_files, warnings,
                                     {**(manifest_extra or {}), "folded_t_file": folded_t_file})
                write_json(tmp_out / MANIFEST_FILE, manifest)
            with stages.stage("check"):
                onnx.checker.check_model(str(tmp_out / MODEL_FILE), full_check=False)
        # quantization runs inside the writer's pulls: report it apart from the I/O
        stages.timings["quantize"] = cache.stats.seconds
        stages.timings["write"] -= cache.stats.seconds
    finally:
        stages.close()
        scratch.close()
    return ExportResult(out_dir=out_dir, manifest=manifest, timings=stages.timings,
                        peak_rss=stages.report()["peak_rss_mb"], warnings=warnings)


def _configs(folder: Path, config: SinqConfig | None, graph_config: GraphConfig | None,
             preset: str | Preset | None) -> tuple[SinqConfig, GraphConfig, list[str]]:
    """(config, graph config, warnings) of an export: the preset's, or the ones given."""
    if preset is not None and (config is not None or graph_config is not None):
        raise ConfigError("pass a preset or configs, not both (Preset.override sets fields "
                          "of a preset)")
    if preset is None and config is None and graph_config is None:
        preset = DEFAULT_PRESET
    if preset is not None:
        return get_preset(preset).configs(folder)
    return config or SinqConfig(), graph_config or GraphConfig(), []


def _manifest(model: ir.Model, plan: Plan, layers: dict, config: SinqConfig, graph: GraphConfig,
              folder: Path, out: Path, data_files: Sequence[str], warnings: Sequence[str],
              extra: Mapping[str, object]) -> dict:
    return build_manifest(
        kind="causal-lm", config=config, graph_config=graph, source_model=folder.name,
        source=folder, out=out, onnx_file=MODEL_FILE, data_files=data_files, layers=layers,
        mul_nodes=sum(1 for n in model.graph if n.op_type == "Mul" and any(
            v is not None and v.name.endswith(".col_scale") for v in n.inputs)),
        linear_weight_bytes=sum(
            int(model.graph.initializers[init].const_value.nbytes)
            for rec in layers.values() for init in rec["initializers"].values() if init),
        float_linear_weight_bytes=sum(4 * p.shape[0] * p.shape[1] for p in plan.linears.values()),
        warnings=warnings, extra=extra)


def _write_reference(folder: Path, out: Path, config: SinqConfig,
                     records: Mapping[str, QuantizedWeight]) -> None:
    """``OUT_DIR/reference``: the quantized PyTorch model (loads the float model: opt-in).

    Its linears get the very ``records`` the export wrote (precomputed or made by the record
    cache); any other is quantized from its weight alone, as the record cache would."""
    model, tokenizer = load_causal_lm(folder)
    for name, record in records.items():
        linear = model.get_submodule(name)
        if isinstance(linear, torch.nn.Linear):  # not a quantized table sharing a head's record
            set_module(model, name, SinqLinear(record, linear.bias))
    quantize_model(model, config.replace(energy_refit=0, calibrate=False, calibrate_head=False),
                   progress=False)
    save_reference(model, out, config, tokenizer=tokenizer)


__all__ = ["PARTS", "export_causal_lm", "plan_export"]
