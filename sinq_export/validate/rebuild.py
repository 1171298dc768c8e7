"""The validator's PyTorch reference, rebuilt from the source folder + the ONNX model's tensors.

Why rebuild instead of shipping a ``reference/`` copy: that copy doubled OUT_DIR, and it
checked the exporter against its own in-memory result rather than against what ships. Here
the reference is transformers' own model class for the source ``config.json``, with

* every quantized linear of ``sinq_export.json["layers"]`` replaced by a `SinqLinear` whose
  packed codes / scales / zero points / column scale are read back from ``model.onnx``'s
  external data (a packed node such as qkv gives each linear its ``rows``);
* every other parameter (embeddings, norms, biases, a float lm_head) loaded from the source
  checkpoint, one tensor at a time (`Checkpoint`).

Memory: the model is constructed on the meta device (no float weights allocated), so the
float linear weights of the source are never read. The reference computes in float32 (the
tolerances are measured against float32 arithmetic), yet stays far smaller than the float32
model: its linears hold packed codes and dequantize on each forward (`_PackedSinqLinear`),
instead of caching a float32 copy per layer, so only the non-linear parameters (mostly
embedding / lm_head) are float32.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..checkpoint import Checkpoint
from ..contract import CUSTOM_OP, INPUT_COL_SCALE, TABLE_OPS
from ..models import ModelLoadError, hub_offline
from ..nn import SinqLinear
from ..quant import packing
from ..quant.core import tied_rows
from ..quant.record import QuantizedWeight
from .providers import REFERENCE_DIR, ValidationError

if TYPE_CHECKING:
    import onnx

# A graph's initializers by name (`tensors.OnnxTensors`, or a plain dict in tests).
Tensors = Mapping[str, np.ndarray]


class _PackedSinqLinear(SinqLinear):
    """`SinqLinear` that dequantizes per call: a cached float32 weight per layer would make
    the reference as large as the float32 model."""

    def grouped_weight(self) -> torch.Tensor:
        return self.record.dequantize_grouped()


# ------------------------------------------------------------------------------ where from


@dataclass(frozen=True)
class ReferenceSource:
    """What `validate` rebuilds its reference from: a source model folder or OUT_DIR/reference."""

    kind: str  # "source" | "reference"
    path: Path
    note: str = ""


def config_sha256(folder: Path) -> str:
    return hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()


def resolve_source(out_dir: Path, meta: dict, override: str | Path | None) -> ReferenceSource | None:
    """``--source DIR`` > the recorded ``source.path`` (same config.json) > ``reference/``.

    None means no reference at all (the caller decides whether ONNX-only checks are enough).
    A source that exists but whose config.json changed since the export is not used: it
    would validate the export against another model.
    """
    recorded = meta.get("source") or {}
    want_sha = recorded.get("config_sha256")
    ref_dir = out_dir / REFERENCE_DIR
    has_ref = (ref_dir / "sinq_quantized.json").is_file()
    if override is not None:
        folder = Path(override).expanduser()
        if not (folder / "config.json").is_file():
            raise ValidationError(f"--source {folder}: not a model folder (no config.json)")
        _check_same_config(folder, want_sha, "--source")
        return ReferenceSource("source", folder)
    path = recorded.get("path")
    if path and (Path(path) / "config.json").is_file():
        folder = Path(path)
        if want_sha is None or config_sha256(folder) == want_sha:
            return ReferenceSource("source", folder)
        if not has_ref:
            _check_same_config(folder, want_sha, "source folder")
        return ReferenceSource("reference", ref_dir,
                               note=f"source folder {folder} changed since the export "
                                    f"(config.json differs): using {REFERENCE_DIR}/")
    if has_ref:
        return ReferenceSource("reference", ref_dir)
    if path:
        raise ValidationError(
            f"{out_dir}: the source model folder {path} recorded in sinq_export.json is missing "
            f"and the export has no {REFERENCE_DIR}/; pass --source DIR (the model it was "
            "exported from)")
    return None


def _check_same_config(folder: Path, want_sha: str | None, what: str) -> None:
    if want_sha is not None and config_sha256(folder) != want_sha:
        raise ValidationError(f"{what} {folder}: config.json differs from the one the export was "
                              "made from (sha256 mismatch); pass the model it was exported from")


# ------------------------------------------------------------------------------ ONNX -> record


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def record_from_node(node, tensors, rows: tuple[int, int] | None = None,
                     col_scale: str | None = None, names: dict | None = None) -> QuantizedWeight:
    """The `QuantizedWeight` a MatMulNBits / SinqMatMulNBits node holds (rows ``[a, b)``).

    Codes are unpacked at the node's ``bits`` (a 3-bit layer in a 4-bit container is a 4-bit
    record with the same numbers). ``col_scale`` names the initializer of ``t`` (a ``Mul``
    constant or the custom op's input); None: no ``t`` in front of this node. ``names``: the
    manifest's ``initializers`` (a tied head reads the embedding's codes through a Reshape,
    so its B input is not itself an initializer).
    """
    k, n = int(_attr(node, "K")), int(_attr(node, "N"))
    bits, bs = int(_attr(node, "bits", 4)), int(_attr(node, "block_size"))
    nb = packing.n_blocks(k, bs)

    by_input = {1: "packed", 2: "scales", 3: "zero_points"}

    def get(i: int) -> np.ndarray | None:
        if i >= len(node.input) or not node.input[i]:
            return None
        named = (names or {}).get(by_input.get(i, ""))
        if node.input[i] not in tensors and named in tensors:
            return tensors[named]
        if node.input[i] not in tensors:
            raise ValidationError(f"node {node.name}: input {node.input[i]!r} is not an initializer")
        return tensors[node.input[i]]

    try:
        packed = get(1).reshape(n, nb, packing.packed_block_bytes(bs, bits))
        scales = get(2).astype(np.float32).reshape(n, nb)
        zp = get(3)
        if zp is None:
            zeros = np.full((n, nb), packing.default_zero_point(bits), dtype=np.uint8)
            zp = packing.pack_zero_points(torch.from_numpy(zeros), bits).numpy()
        elif zp.dtype != np.uint8:
            raise ValidationError(f"node {node.name}: float zero points are not supported")
        zp = zp.reshape(n, packing.packed_zero_point_bytes(nb, bits))
    except (ValueError, AttributeError) as exc:
        raise ValidationError(f"node {node.name}: initializers do not match K={k} N={n} "
                              f"bits={bits} block_size={bs} ({exc})") from exc
    a, b = rows if rows is not None else (0, n)
    if not 0 <= a < b <= n:
        raise ValidationError(f"node {node.name}: rows {[a, b]} outside its N={n}")
    t = None
    if col_scale is not None:
        t = torch.from_numpy(np.array(tensors[col_scale], dtype=np.float32).reshape(k))
    return QuantizedWeight(
        packed=torch.from_numpy(np.array(packed[a:b])),
        scales=torch.from_numpy(np.array(scales[a:b])),
        zero_points=torch.from_numpy(np.array(zp[a:b])),
        col_scale=t, bits=bits, group_size=bs, shape=(b - a, k),
    )


def layer_rows(meta: dict, node: onnx.NodeProto) -> tuple[int, int]:
    rows = meta.get("rows")
    return (0, int(_attr(node, "N"))) if rows is None else (int(rows[0]), int(rows[1]))


def layer_node_name(meta: dict) -> str | None:
    """The node of a layer record (``node``; ``onnx_node`` in format 1 manifests)."""
    return meta.get("node") or meta.get("onnx_node")


def layer_col_scale(meta: dict, node: onnx.NodeProto) -> str | None:
    """Initializer name of ``t`` for this layer, if the graph applies one in front of it."""
    inits = meta.get("initializers") or {}
    if inits.get("col_scale"):
        return inits["col_scale"]
    if node.op_type == CUSTOM_OP and len(node.input) > INPUT_COL_SCALE and node.input[INPUT_COL_SCALE]:
        return node.input[INPUT_COL_SCALE]
    return None


def norm_folds(layers: dict[str, dict]) -> dict[str, str]:
    """Norm weight -> the ONNX initializer holding it with a column scale folded in.

    ``folded_into`` names a norm module (or a linear, for a fold into up_proj's
    rows, which needs nothing here: that linear's ONNX scales already carry it). The source
    norm lacks ``t``, so the reference takes the folded one from the graph.
    """
    out = {}
    for meta in layers.values():
        target = meta.get("folded_into")
        if str(meta.get("col_scale_mode")) == "fold" and target and target not in layers:
            weight = target if target.endswith(".weight") else target + ".weight"
            out[weight] = weight  # the graph names its norm initializers like HF parameters
    return out


# ------------------------------------------------------------------------------ the model


def _set_parameter(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)


def _replace_module(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, leaf, new)


def build_reference(ckpt: Checkpoint, layers: dict[str, dict], nodes: dict, tensors,
                    float_overrides: dict[str, str] | None = None) -> torch.nn.Module:
    """transformers' model for ``ckpt`` with the ONNX model's quantized linears (see module doc).

    ``nodes``: node name -> NodeProto; ``tensors``: initializer name -> array (lazy);
    ``float_overrides``: parameter name -> ONNX initializer that replaces the source tensor
    (a norm weight with a column scale folded into it).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with hub_offline():
            config = AutoConfig.from_pretrained(str(ckpt.folder), local_files_only=True,
                                                trust_remote_code=False)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except Exception as exc:  # unknown model_type, bad field: the source folder is the problem
        raise ValidationError(f"{ckpt.folder}: transformers cannot build the model ({exc})") from exc
    modules = dict(model.named_modules())
    tables: dict[str, torch.Tensor] = {}
    for name, meta in layers.items():
        if meta.get("op") in TABLE_OPS:  # a quantized embedding: its float table
            tables[name + ".weight"] = _embedding_table(meta, tensors)
            continue
        node = nodes.get(layer_node_name(meta) or "")
        if node is None:
            raise ValidationError(f"layer {name}: node {layer_node_name(meta)!r} is not in the graph")
        linear = modules.get(name)
        if not isinstance(linear, torch.nn.Linear):
            raise ValidationError(f"layer {name} of sinq_export.json is not a linear of "
                                  f"{type(model).__name__}")
        record = record_from_node(node, tensors, layer_rows(meta, node), layer_col_scale(meta, node),
                                  meta.get("initializers"))
        if record.shape != (linear.out_features, linear.in_features):
            raise ValidationError(f"layer {name}: ONNX rows give shape {list(record.shape)}, the "
                                  f"model has {[linear.out_features, linear.in_features]}")
        bias = None
        if linear.bias is not None:
            bias = (_graph_bias(meta, node, tensors) if meta.get("output_scaled_by")
                    else _load(ckpt, name + ".bias"))
        _replace_module(model, name, _PackedSinqLinear(record, bias))
    float_overrides = float_overrides or {}
    tied = dict(getattr(model, "_tied_weights_keys", None) or {})
    loaded: dict[str, torch.nn.Parameter] = {}
    for name, param in list(model.named_parameters(remove_duplicate=False)):
        if param.device.type != "meta":
            continue
        if name in tables:
            value = tables[name]
        elif name in float_overrides:
            value = torch.from_numpy(np.array(tensors[float_overrides[name]], dtype=np.float32))
        elif name not in ckpt and name in tied and getattr(config, "tie_word_embeddings", False):
            continue  # tied below, to the very parameter of its source
        else:
            value = _load(ckpt, name)
        if tuple(value.shape) != tuple(param.shape):
            raise ValidationError(f"{ckpt.folder}: tensor {name!r} has shape {list(value.shape)}, "
                                  f"the model expects {list(param.shape)}")
        _set_parameter(model, name, value)
        loaded[name] = model.get_parameter(name)
    for target, source in tied.items():
        owner = target.rpartition(".")[0]
        if owner in layers or source not in loaded:
            continue
        if model.get_parameter(target).device.type == "meta":
            # a float head beside a quantized table: its graph node reads the float weight
            if source in tables:
                _set_parameter(model, target, _load(ckpt, source))
            else:
                model.get_submodule(owner)._parameters[target.rpartition(".")[2]] = loaded[source]
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise ValidationError(f"{ckpt.folder}: checkpoint lacks tensor {still_meta[0]!r}")
    return model.eval()


def quantization_steps(weight: torch.Tensor, record: QuantizedWeight, rms: bool = False) -> float:
    """Largest ``|W - W_hat|`` of a layer, in units of its own quantization step ``s * t``
    (from the grid's edge for a weight past it: the quantizer clamps those).

    The parity run uses the ONNX tensors on both sides, so it cannot see a weight that was
    damaged (or mis-quantized) before it shipped; this can. Round-to-nearest with the zero
    point rounded too stays within 1 step (0.5 from the code, 0.5 from the zero point at the
    clamped edge); one flipped packed byte moves codes by up to 2^bits - 1 steps. Columns
    whose ``t`` is NaN (not recoverable, see `weight_steps`) are left out.
    """
    n, k = record.shape
    g = record.group_size
    step = record.scales.float().repeat_interleave(g, dim=1)[:, :k]
    if record.col_scale is not None:
        step = step * record.col_scale.float()
    step = torch.where(step.abs() < 1e-30, torch.full_like(step, 1e-30), step)
    zeros = record.zeros().float().repeat_interleave(g, dim=1)[:, :k]
    # the code W would round to on the record's grid, clamped as the quantizer clamps: a
    # refitted or searched scale may put a group's extremes past the grid's edge by design
    target = (weight.float() / step + zeros).clamp(0, (1 << record.bits) - 1)
    steps = (target - record.codes().float()).abs()
    steps = steps[~steps.isnan()]
    if steps.numel() == 0:
        return 0.0
    return float(steps.square().mean().sqrt() if rms else steps.max())


def _folded_norm_t(ckpt: Checkpoint, tensors: Tensors, norm: str) -> torch.Tensor:
    """The t folded into a norm weight: the graph's weight over the source's (NaN where the
    source weight is 0 and t cannot be read back)."""
    weight = norm if norm.endswith(".weight") else norm + ".weight"
    src = _load(ckpt, weight).float()
    t = torch.from_numpy(np.array(tensors[weight], dtype=np.float32)) / src
    t[src == 0] = torch.nan
    return t


def _checkable_record(ckpt: Checkpoint, layers: dict[str, dict], name: str, tensors: Tensors,
                      record: QuantizedWeight, folded_t: Mapping[str, torch.Tensor]
                      ) -> QuantizedWeight | None:
    """``record`` with the t it is quantized against and its own scales, or None when the
    export does not let the folds be undone. A t folded into a norm is read back from the
    norm; a ``ratio`` layer's t is its Mul's ratio times its lead's, read back the same way;
    a t folded into another linear's rows comes from ``folded_t`` (the export's
    ``folded_t_file``), divided out of those rows here and given back to its own linear."""
    meta = layers[name]
    scaled_by = meta.get("output_scaled_by")
    if scaled_by:
        if scaled_by not in folded_t:
            return None
        rows = tied_rows(folded_t[scaled_by], int(meta.get("output_scale_heads") or 1),
                         record.shape[0])
        record = replace(record, scales=record.scales.float() / rows[:, None])
    mode = str(meta.get("col_scale_mode", ""))
    if mode != "ratio" and not mode.startswith("fold"):
        return record
    owner = (layers.get(meta.get("ratio_of") or "") or {}) if mode == "ratio" else meta
    target = owner.get("folded_into")
    if target in layers:  # this t is folded into another linear's rows
        t = folded_t.get(name) if mode != "ratio" else None
        return None if t is None else replace(record, col_scale=t)
    if tensors is None or not target:
        return None
    t = _folded_norm_t(ckpt, tensors, target)
    if mode == "ratio":
        if record.col_scale is None:
            return None
        t = record.col_scale.float() * t
    return replace(record, col_scale=t)


def read_folded_t(out_dir: Path, meta: Mapping) -> dict[str, torch.Tensor]:
    """The export's ``folded_t_file`` (empty for an export without one: those folds stay
    unchecked by the source check). Named but missing or unreadable: ValidationError."""
    name = meta.get("folded_t_file")
    if not name:
        return {}
    path = out_dir / str(name)
    try:
        from safetensors.torch import load_file

        return {k: v.float() for k, v in load_file(str(path)).items()}
    except (OSError, ValueError, RuntimeError) as exc:
        raise ValidationError(f"{path}: cannot read the folded column scales ({exc})") from None


def weight_steps(ckpt: Checkpoint, layers: dict[str, dict], modules: dict,
                 compensated: Collection[str] = (), tensors: Tensors | None = None,
                 folded_t: Mapping[str, torch.Tensor] | None = None) -> dict[str, float | None]:
    """`quantization_steps` of every layer against the source weight (one at a time).

    A t folded into a norm weight is read back from it (``tensors``: the ONNX initializers);
    a t folded into another layer's rows is divided out of them with ``folded_t`` (see
    `_checkable_record`); None where neither is possible. ``compensated``: the layers GPTQ
    calibrated, whose codes it moves away from round-to-nearest by design (up to ~8 steps
    measured on SmolLM2), so they report the RMS distance instead of the largest: it still
    flags a wrong or mis-scaled tensor, not a single flipped byte.
    """
    out: dict[str, float | None] = {}
    for name, meta in layers.items():
        record = None
        if name in modules and name + ".weight" in ckpt:
            record = _checkable_record(ckpt, layers, name, tensors, modules[name].record,
                                       folded_t or {})
        out[name] = None if record is None else quantization_steps(
            _load(ckpt, name + ".weight"), record,
            rms=name in compensated and meta.get("shared_with") is None)
    return out


def _graph_bias(meta: dict, node: onnx.NodeProto, tensors: Tensors) -> torch.Tensor:
    """The graph's bias of a row-scaled layer (it carries the other layer's t, the source's
    does not): ``<owner>.bias``, this layer's rows of it when the node is packed."""
    owner = meta["initializers"]["packed"].removesuffix(".qweight")
    name = f"{owner}.bias"
    try:
        bias = np.array(tensors[name], dtype=np.float32)
    except KeyError:
        raise ValidationError(f"layer {meta.get('node')}: the graph has no bias {name!r}") from None
    start, stop = layer_rows(meta, node)
    return torch.from_numpy(bias[start:stop])


def _embedding_table(meta: dict, tensors: Tensors) -> torch.Tensor:
    """``(Q - z) * s * t`` of a quantized table's record (what the gather returns per row)."""
    names = meta["initializers"]
    n, k = meta["shape"]
    bits, g = int(meta["container_bits"]), int(meta["group_size"])
    nb = packing.n_blocks(k, g)
    t = names.get("col_scale")
    record = QuantizedWeight(
        packed=torch.from_numpy(np.array(tensors[names["packed"]]).reshape(
            n, nb, packing.packed_block_bytes(g, bits))),
        scales=torch.from_numpy(np.array(tensors[names["scales"]], dtype=np.float32).reshape(n, nb)),
        zero_points=torch.from_numpy(np.array(tensors[names["zero_points"]]).reshape(
            n, packing.packed_zero_point_bytes(nb, bits))),
        col_scale=None if not t else torch.from_numpy(np.array(tensors[t], dtype=np.float32)),
        bits=bits, group_size=g, shape=(n, k))
    return record.dequantize()


def _load(ckpt: Checkpoint, name: str) -> torch.Tensor:
    if name not in ckpt:
        raise ValidationError(f"{ckpt.folder}: checkpoint lacks tensor {name!r}")
    try:
        return ckpt.load(name, dtype=torch.float32)
    except ModelLoadError as exc:
        raise ValidationError(str(exc)) from exc
