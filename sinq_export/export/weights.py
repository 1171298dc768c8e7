"""Bind a built graph's initializers to lazy tensors fed from a `Checkpoint`: the export streams.

Every initializer gets an ``onnx_ir.LazyTensor`` whose function reads (and, for a quantized
linear, quantizes) its source tensor only when the writer serialises it. A quantized linear
has several initializers (packed codes, scales, zero points, t) from one quantization call,
so `RecordCache` quantizes a unit once, hands out its parts, and drops the record as soon as
the last part (or the last norm / layer it was folded into) has been written. Peak memory is
therefore bounded by the few records in flight, not by the model: the float model and the
float graph never exist.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch

from ..checkpoint import Checkpoint
from ..config import SinqConfig
from ..models import ModelLoadError
from ..quant.core import tied_rows
from ..quant.int8 import int8_mask
from ..quant.record import QuantizedWeight
from ..quant.stats import LayerStats
from ..quant.units import quantize_unit
from .layout import quant_tensors

PARTS = ("qweight", "scales", "qzeros", "col_scale", "exact.weight")
EXACT_PARTS = ("exact.index", "exact.int8_mask")  # from the plan, not the record


@dataclass
class QuantStats:
    units: int = 0
    seconds: float = 0.0


class RecordCache:
    """Quantize on first use, release after ``uses[name]`` reads. Thread-safe per unit."""

    def __init__(self, checkpoint: Checkpoint, config: SinqConfig, *, sources: Mapping[str, str],
                 units: Mapping[str, tuple[str, ...]], bits: Mapping[str, int],
                 uses: Mapping[str, int],
                 precomputed: Mapping[str, QuantizedWeight] | None = None,
                 energies: Mapping[str, LayerStats] | None = None,
                 quantize_as: Mapping[str, str] | None = None, keep: bool = False) -> None:
        """``precomputed``: records quantized elsewhere (a calibrated pass over the float
        model) that are handed out instead of quantizing from the checkpoint. ``energies``:
        each linear's input energies for the scale refit (`calibration.probe.probe_energies`). ``keep``:
        also keep every record made in ``made`` (the export's PyTorch reference is built
        from exactly what shipped).
        ``quantize_as``: name -> the name whose settings and precomputed record it takes (a
        tied embedding table shared with its head is the head's record)."""
        self._ckpt = checkpoint
        self._precomputed = precomputed or {}  # read, never copied: it may live on disk
        self._as = dict(quantize_as or {})
        self._energies = dict(energies or {})
        self.made: dict[str, QuantizedWeight] | None = {} if keep else None
        self._config = config
        self._sources = sources  # linear -> checkpoint tensor of its weight
        self._units = units  # linear -> the names quantized together with it (itself included)
        self._bits = bits
        self._uses = dict(uses)
        self._records: dict[str, QuantizedWeight] = {}
        self._locks = {unit: threading.Lock() for unit in set(units.values())}
        self.stats = QuantStats()

    def _quantize(self, names: Sequence[str]) -> list[QuantizedWeight]:
        keys = [self._as.get(n, n) for n in names]
        if all(k in self._precomputed for k in keys):
            return [self._precomputed[k] for k in keys]
        method = self._config.method_config(keys[0], self._bits[names[0]])
        # as stored: the quantizer widens what it works on, a bf16 table is never float32
        weights = [self._ckpt.load(self._sources[n], dtype=None) for n in names]
        # one input: the unit shares its energies
        return quantize_unit(weights, names, method, self._energies.get(keys[0]))

    def get(self, name: str) -> QuantizedWeight:
        unit = self._units[name]
        with self._locks[unit]:
            record = self._records.get(name)
            if record is None:
                t0 = time.perf_counter()
                for n, r in zip(unit, self._quantize(unit)):
                    self._records[n] = r
                    if self.made is not None:
                        self.made[n] = r
                self.stats.units += 1
                self.stats.seconds += time.perf_counter() - t0
                record = self._records[name]
        return record

    def release(self, name: str) -> None:
        with self._locks[self._units[name]]:
            self._uses[name] -= 1
            if self._uses[name] <= 0:
                self._records.pop(name, None)


def _np_dtype(dtype: ir.DataType) -> np.dtype:
    return dtype.numpy()


def _lazy(func: Callable[[], np.ndarray], value: ir.Value) -> ir.LazyTensor:
    dtype = value.dtype
    shape = value.shape

    def make() -> ir.Tensor:
        arr = np.ascontiguousarray(func())
        if tuple(arr.shape) != tuple(shape):
            raise ModelLoadError(f"tensor {value.name!r}: computed shape {tuple(arr.shape)}, "
                                 f"graph expects {tuple(shape)}")
        return ir.tensor(arr.astype(_np_dtype(dtype), copy=False), name=value.name)

    return ir.LazyTensor(make, dtype=dtype, shape=shape, name=value.name)


@dataclass(frozen=True)
class LinearBinding:
    """What the binder needs to know about one quantized linear."""

    container_bits: int
    col_scale_input: bool  # the graph has a ``col_scale`` initializer for it
    row_scale_from: str | None  # linear whose t multiplies this linear's output rows
    flat: bool = False  # packed codes stored 2-D [N, K*bits/8] (GatherBlockQuantized)
    col_scale_over: str | None = None  # the col_scale initializer is t / this linear's t
    row_scale_heads: int = 1  # kv heads of the rows a GQA-tied t scales (`core.tied_rows`)
    exact_channels: tuple[int, ...] = ()  # input channels multiplied in float beside the node
    record_of: str | None = None  # the linear whose record it reads (a tied head: the table)


def bind_weights(
    model: ir.Model,
    checkpoint: Checkpoint,
    cache: RecordCache,
    linears: Mapping[str, LinearBinding],
    *,
    norm_folds: Mapping[str, str] | None = None,
    aliases: Mapping[str, str] | None = None,
    row_folded_t: dict[str, np.ndarray] | None = None,
) -> None:
    """Give every initializer without a value a lazy one; missing / misshapen -> ModelLoadError.

    ``norm_folds``: norm weight initializer -> linear whose t is multiplied into it.
    ``aliases``: initializer -> checkpoint tensor when the names differ (a tied head).
    ``row_folded_t``: filled, as the scales are written, with the t of every linear folded
    into another linear's rows (`validate` needs it to undo the fold: no tensor keeps it).
    """
    norm_folds = norm_folds or {}
    aliases = aliases or {}
    parts = {f"{lin}.{p}": (lin, p) for lin in linears for p in PARTS}
    exact = {f"{lin}.{p}": (lin, p) for lin in linears for p in EXACT_PARTS}
    biases = {f"{lin}.bias": lin for lin, b in linears.items() if b.row_scale_from}
    for name, value in model.graph.initializers.items():
        if value.const_value is not None:
            continue
        if name in exact:
            lin, part = exact[name]
            value.const_value = _lazy(_exact_func(linears[lin], part, value), value)
            continue
        if name in parts:
            lin, part = parts[name]
            value.const_value = _lazy(_part_func(cache, linears[lin].record_of or lin, part,
                                                 linears[lin], row_folded_t), value)
            continue
        source = aliases.get(name, name)
        checkpoint.require(source, tuple(int(d) for d in value.shape))
        if name in norm_folds:
            func = _scaled_func(checkpoint, source, cache, norm_folds[name])
        elif name in biases:
            lin = biases[name]
            func = _scaled_func(checkpoint, source, cache, linears[lin].row_scale_from,
                                heads=linears[lin].row_scale_heads)
        else:
            def func(source: str = source) -> np.ndarray:
                return checkpoint.load(source).numpy()
        value.const_value = _lazy(func, value)


def _t(record: QuantizedWeight, k: int) -> torch.Tensor:
    """The record's t; a method that yields none scales by exact ones."""
    return torch.ones(k) if record.col_scale is None else record.col_scale.float()


def _scaled_func(checkpoint: Checkpoint, source: str, cache: RecordCache,
                 linear: str, heads: int = 1) -> Callable[[], np.ndarray]:
    """``w * t`` of ``linear``: a norm weight that absorbs its readers' shared t, or the bias
    of a linear whose output rows absorb ``linear``'s t (per kv head: `tied_rows`)."""
    def func() -> np.ndarray:
        w = checkpoint.load(source)
        record = cache.get(linear)
        try:
            t = _t(record, record.in_features)
            return (w * tied_rows(t, heads, w.shape[0])).numpy()
        finally:
            cache.release(linear)
    return func


def _exact_func(binding: LinearBinding, part: str, value: ir.Value) -> Callable[[], np.ndarray]:
    """The exact channels' indices, or the mask that zeroes them in the node's input."""
    def func() -> np.ndarray:
        if part == "exact.index":
            return np.asarray(binding.exact_channels, dtype=np.int64)
        return int8_mask(int(value.shape[0]), list(binding.exact_channels)).numpy()
    return func


def _part_func(cache: RecordCache, linear: str, part: str, binding: LinearBinding,
               row_folded_t: dict[str, np.ndarray] | None = None) -> Callable[[], np.ndarray]:
    def func() -> np.ndarray:
        record = cache.get(linear)
        try:
            if part == "col_scale":
                t = _t(record, record.in_features)
                if binding.col_scale_over is not None:
                    lead = cache.get(binding.col_scale_over)
                    try:
                        t = t / _t(lead, lead.in_features)
                    finally:
                        cache.release(binding.col_scale_over)
                return t.numpy()
            if part == "exact.weight":  # what the node would multiply those channels by
                columns = torch.tensor(binding.exact_channels, dtype=torch.long)
                return record.dequantize_columns(columns).T.numpy()
            qt = quant_tensors(record, binding.container_bits)
            if part == "qweight":
                return qt.packed.reshape(qt.packed.shape[0], -1) if binding.flat else qt.packed
            if part == "qzeros":
                return qt.zero_points
            scales = qt.scales
            if binding.row_scale_from is not None:
                src = cache.get(binding.row_scale_from)
                try:
                    folded = _t(src, src.in_features)
                    if row_folded_t is not None:
                        row_folded_t[binding.row_scale_from] = folded.numpy().copy()
                    t = tied_rows(folded, binding.row_scale_heads, scales.shape[0])
                    scales = scales * t.numpy()[:, None]
                finally:
                    cache.release(binding.row_scale_from)
            return scales
        finally:
            cache.release(linear)
    return func
