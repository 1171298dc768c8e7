"""The PyTorch stage: `SinqLinear` and `quantize_model(model, config)`.

`SinqLinear` is the reference the ONNX graph is checked against, so it computes exactly what
the graph computes, in the same order: ``y = (x * t) @ ((Q - z) * s).T + b``. Its buffers are
the very tensors of the `QuantizedWeight` record that the exporter writes as initializers.
"""

from __future__ import annotations

import gc
import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .config import ConfigError, SinqConfig
from .io import Marker, atomic_output_dir, read_json, write_json
from .quant.calibrate import InputMeter, LayerStats
from .quant.core import quantize_jointly, relative_error
from .quant.methods import quantize
from .quant.record import QuantizedWeight

# Linears that read the same input tensor, by the `SinqConfig.shared_col_scale` value that
# makes them share one t.
SHARED_INPUT_GROUPS: dict[str, tuple[tuple[str, ...], ...]] = {
    "none": (),
    "mlp": (("gate_proj", "up_proj"),),
    "all": (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")),
}

QUANTIZED_WEIGHTS_FILE = "quantized.safetensors"
QUANTIZED_META_FILE = "sinq_quantized.json"
FORMAT_VERSION = 1
# What makes a folder recognisably `save_quantized` output (only such a folder is overwritten).
QUANTIZED_MARKER = Marker(QUANTIZED_META_FILE, ("format_version", "config", "layers"))


class SinqLinear(nn.Module):
    """A linear layer whose weight is a packed SINQ/RTN `QuantizedWeight`."""

    def __init__(self, record: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = record.in_features, record.out_features
        self.bits, self.group_size = record.bits, record.group_size
        self.register_buffer("packed", record.packed)
        self.register_buffer("scales", record.scales)
        self.register_buffer("zero_points", record.zero_points)
        self.register_buffer("col_scale", record.col_scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self._dequantized: torch.Tensor | None = None

    @property
    def record(self) -> QuantizedWeight:
        return QuantizedWeight(
            packed=self.packed,
            scales=self.scales,
            zero_points=self.zero_points,
            col_scale=self.col_scale,
            bits=self.bits,
            group_size=self.group_size,
            shape=(self.out_features, self.in_features),
        )

    def grouped_weight(self) -> torch.Tensor:
        """``(Q - z) * s`` (cached: the record is immutable once built)."""
        if self._dequantized is None:
            self._dequantized = self.record.dequantize_grouped()
        return self._dequantized

    def drop_cache(self) -> None:
        """Forget the dequantized weight (a float copy of the layer) until the next call."""
        self._dequantized = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.grouped_weight().to(x.dtype)
        if self.col_scale is not None:
            x = x * self.col_scale.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, bias)

    def _load_from_state_dict(self, *args, **kwargs):  # noqa: ANN002, ANN003
        self.drop_cache()
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        t = "t" if self.col_scale is not None else "no t"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}, {t}")


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    bits: int
    method: str
    seconds: float
    rel_error: float | None = None


@dataclass
class QuantizationReport:
    config: SinqConfig
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def n_layers(self) -> int:
        return len(self.layers)


def eligible_linears(model: nn.Module, config: SinqConfig) -> dict[str, tuple[nn.Linear, int]]:
    """Module name -> (linear, bits) for every nn.Linear the config quantizes."""
    return {
        name: (m, bits)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and (bits := config.bits_for(name)) is not None
    }


def _joint_groups(names: Iterable[str], bits_of: dict[str, int], shared: str) -> list[list[str]]:
    """Group names that read one input and share a t under ``shared`` (same parent, names in
    ``SHARED_INPUT_GROUPS[shared]``, same bits)."""
    present = set(names)
    groups = []
    for name in sorted(present):
        parent, _, leaf = name.rpartition(".")
        for members in SHARED_INPUT_GROUPS[shared]:
            if leaf != members[0]:
                continue
            full = [f"{parent}.{m}" if parent else m for m in members]
            if all(f in present for f in full) and len({bits_of[f] for f in full}) == 1:
                groups.append(full)
    return groups


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


def _units(linears: dict[str, tuple[nn.Linear, int]], config: SinqConfig) -> list[list[str]]:
    """Quantization units in module order: joint groups (shared t) and single linears."""
    bits_of = {name: bits for name, (_, bits) in linears.items()}
    groups = _joint_groups(linears, bits_of, config.shared_col_scale)
    grouped = {n for g in groups for n in g}
    units = groups + [[n] for n in linears if n not in grouped]
    position = {name: i for i, name in enumerate(linears)}
    units.sort(key=lambda names: position[names[0]])
    return units


def _quantize_unit(root: nn.Module, prefix: str, names: list[str],
                   linears: dict[str, tuple[nn.Linear, int]], config: SinqConfig,
                   report: QuantizationReport, measure_error: bool, stats=None) -> None:  # noqa: ANN001
    """Quantize one unit (names relative to the model; ``root`` is the module at ``prefix``)."""
    t0 = time.perf_counter()
    bits = linears[names[0]][1]
    method = config.method_config(names[0], bits)
    weights = [linears[n][0].weight for n in names]
    calibration = None if stats is None else stats.get(names[0][len(prefix):])
    if len(names) > 1:
        records = quantize_jointly(weights, names, calibration=calibration, config=method)
    else:
        records = [quantize(weights[0], method, calibration=calibration, name=names[0])]
    dt = (time.perf_counter() - t0) / len(names)
    for name, record, weight in zip(names, records, weights):
        linear = linears[name][0]
        err = relative_error(weight, record) if measure_error else None
        _set_module(root, name[len(prefix):], SinqLinear(record, linear.bias))
        label = config.method if record.col_scale is not None or config.method == "rtn" \
            else "rtn(gated)"
        if stats is not None:
            label += "+calibrated" if config.is_calibrated(name) else "+energy"
        report.layers.append(LayerReport(name, record.shape, bits, label, dt, err))


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    config: SinqConfig | None = None,
    *,
    progress: bool = True,
    measure_error: bool = False,
    calibration: torch.Tensor | None = None,
    meter: InputMeter | None = None,
) -> QuantizationReport:
    """Replace every eligible ``nn.Linear`` of ``model`` in place by a `SinqLinear`.

    Follows torchao's ``quantize_(model, config)``: one entry point, one config object.
    Tied weights (e.g. lm_head sharing the embedding) are quantized from the shared tensor
    but the embedding itself stays float.

    With ``config.energy_refit`` (the default) the float model first runs block by block on
    ``calibration`` or, without it, on `probe_tokens` (random ids) to measure every linear's
    input energies, which weight the scale refit (`model_energies`); a module that is not a
    causal LM with decoder blocks cannot be probed and is quantized weight-only (as with
    ``energy_refit=0``).

    With ``config.calibrate`` (or ``calibrate_head``), ``calibration`` holds the ``[n, L]``
    calibration token windows (`quant.calibrate.calibration_windows`); the model is then
    quantized block by block on statistics of each block's inputs
    (`quant.calibrate.calibrate_block`; with ``calibrate_head`` alone the blocks are quantized
    calibration-free and only run to give the head its input). A model from
    `models.load_causal_lm_streamed` loads each block when it first runs and drops its float
    weights once quantized.

    ``meter`` (`quant.calibrate.InputMeter`) is shown each linear's float input on the
    energy pass, when there is one (every linear but calibrated ones).
    """
    config = config or SinqConfig()
    start = time.perf_counter()
    linears = eligible_linears(model, config)
    units = _units(linears, config)
    if meter is not None:
        meter.prepare(config, units, {n: b for n, (_, b) in linears.items()})
    report = QuantizationReport(config=config)
    if config.needs_calibration:
        if calibration is None:
            raise ValueError("config.calibrate / calibrate_head is set but no calibration "
                             "windows were given")
        _quantize_calibrated(model, linears, units, config, report, measure_error,
                             calibration, progress, meter)
    else:
        energies = model_energies(model, config, list(linears), calibration, meter=meter)
        for names in tqdm(units, desc="SINQ quantize", unit="unit", disable=not progress):
            _quantize_unit(model, "", names, linears, config, report, measure_error, energies)
    report.seconds = time.perf_counter() - start
    return report


def model_energies(model: nn.Module, config: SinqConfig, names: list[str],
                   windows: torch.Tensor | None = None, release: bool = False,
                   drop_table: bool = False, meter: InputMeter | None = None
                   ) -> dict[str, LayerStats] | None:
    """Input energies of ``names`` for the energy refit (`quant.calibrate.input_energies`) on
    ``windows`` or the random-id probe; None without ``energy_refit`` or for a module that is
    not a causal LM with decoder blocks (quantized weight-only then). ``meter`` also sees
    the inputs of the linears it names (`quant.calibrate.InputMeter`)."""
    from .quant.calibrate import forward_dtype, input_energies

    if not config.energy_refit and meter is None:
        return None
    if windows is None:
        probe = probe_tokens(model, config)
        if probe is None:
            return None
        windows = probe[0]
    energies = input_energies(model, windows, names if config.energy_refit else [],
                              forward_dtype(config.calibration_dtype), release=release,
                              drop_table=drop_table, meter=meter)
    return energies if config.energy_refit else None


def probe_energies(source, config: SinqConfig, meter: InputMeter | None = None  # noqa: ANN001
                   ) -> tuple[dict[str, LayerStats] | None, dict] | None:
    """(input energies, the manifest's ``probe`` record) of ``source``'s linears, measured on a
    streamed model (one float block at a time, each dropped once measured) so that a model
    bigger than memory is still quantized tensor by tensor afterwards; None without
    ``energy_refit`` or ``meter`` (which sees every linear's input on the same pass; the
    energies are then None without ``energy_refit``)."""
    from .models import load_causal_lm_streamed

    if not config.energy_refit and meter is None:
        return None
    model, _ = load_causal_lm_streamed(source, with_tokenizer=False, with_head=False)
    probe = probe_tokens(model, config)
    if probe is None:
        return None
    linears = eligible_linears(model, config)
    names = list(linears)
    if meter is not None:
        meter.prepare(config, _units(linears, config), {n: b for n, (_, b) in linears.items()})
    energies = model_energies(model, config, names, probe[0], release=True, drop_table=True,
                              meter=meter)
    del model
    gc.collect()  # the export that follows should not find the probe's tensors still held
    _return_freed_memory()
    return energies, probe[1]


def _return_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Why: the probe frees its float blocks, but glibc keeps the freed heap (tensors under its
    mmap threshold) and the export's writing then grows on top of it: on the Qwen2.5-1.5B
    shape the process held 2.07 GB after the probe without the trim, 0.46 GB with it."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def probe_tokens(model: nn.Module, config: SinqConfig) -> tuple[torch.Tensor, dict] | None:
    """(`quant.calibrate.probe_window` ids, their manifest record) for a causal LM's energy
    probe, or None when ``model`` has no vocabulary or decoder blocks to run them through."""
    from .models import decoder_blocks
    from .quant.calibrate import probe_window

    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    try:
        decoder_blocks(model)
    except ValueError:
        return None
    return probe_window(vocab, config.probe_tokens) if isinstance(vocab, int) else None


def _quantize_calibrated(model, linears, units, config, report, measure_error,  # noqa: ANN001
                         windows, progress, meter: InputMeter | None = None) -> None:  # noqa: ANN001
    """Block by block: statistics of each block's inputs, quantize its units, propagate.

    With ``calibrate`` every linear gets full statistics (``H``, for A-SINQ and GPTQ). With
    ``calibrate_head`` alone the blocks only run to give the head its input, and the other
    linears' energy refit takes the random-id probe's energies, measured beforehand in one
    float pass (`model_energies`). Why not the calibration text's: one Wikipedia window gave
    Qwen2.5-0.5B 39.29 against 38.66 from random ids (SmolLM2 25.81 / 26.16), and the
    energies of all the windows would cost a second forward per block (~5 s of SmolLM2's
    17 s export)."""
    from .models import decoder_blocks, ensure_loaded
    from .quant.calibrate import calibrate_block, capture_block_inputs, forward_dtype

    blocks = decoder_blocks(model)
    dtype = forward_dtype(config.calibration_dtype)
    block_prefix = {id(m): n for n, m in model.named_modules()}
    # the linears calibration leaves out (all but the head of a head-only run) get their
    # energies from the random-id probe's float pass first, as without calibration text
    energies = {} if config.calibrate else (model_energies(
        model, config, [n for n in linears if not config.is_calibrated(n)], release=True,
        meter=meter) or {})
    hidden, kwargs = capture_block_inputs(model, windows)
    done: set[str] = set()
    for block in tqdm(blocks, desc="SINQ calibrate", unit="block", disable=not progress):
        ensure_loaded(block)
        prefix = block_prefix[id(block)] + "."
        mine = [u for u in units if u[0].startswith(prefix)]
        rel = [n[len(prefix):] for u in mine for n in u]

        def quantize_block(blk, stats, mine=mine, prefix=prefix):  # noqa: ANN001, ANN202
            if stats is None:
                stats = {n[len(prefix):]: e for n, e in energies.items() if n.startswith(prefix)}
            for names in mine:
                _quantize_unit(blk, prefix, names, linears, config, report, measure_error, stats)

        hidden = calibrate_block(block, hidden, kwargs, quantize_block, rel,
                                 with_stats=config.calibrate, dtype=dtype)
        for name in (n for u in mine for n in u):  # a streamed model frees the float weights
            done.add(name)
            linears.pop(name)
        for m in block.modules():  # and holds no float copy of a quantized block either
            if isinstance(m, SinqLinear):
                m.drop_cache()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    norm = getattr(getattr(model, "model", None), "norm", None)
    for names in (u for u in units if u[0] not in done):
        stats = None
        if norm is not None and linears[names[0]][0] is head and config.is_calibrated(names[0]):
            # The output projection reads the final norm of the last block's output.
            stats = {names[0]: LayerStats(head.in_features)}
            stats[names[0]].add(norm(hidden))
        elif names[0] in energies:
            stats = energies
        _quantize_unit(model, "", names, linears, config, report, measure_error, stats)


@dataclass(frozen=True)
class QuantizationPlan:
    """What `plan_quantization` decides before any weight is quantized.

    Attributes:
        config: the config to quantize with (a bit allocation's widths are its ``overrides``).
        calibration: ``[n, L]`` token windows the quantization runs the model on: the
            calibration windows, or the energy probe's random ids (`probe_tokens`), or None
            (weight-only).
        manifest: records for ``sinq_export.json``: ``"calibration"`` (which tokens of which
            text), ``"probe"`` (the random ids that gave the input energies) and
            ``"allocation"`` (budget, per-layer widths), each present when used.
    """

    config: SinqConfig
    calibration: torch.Tensor | None = None
    manifest: dict = field(default_factory=dict)


def plan_quantization(model: nn.Module, tokenizer, config: SinqConfig,  # noqa: ANN001
                      sensitivity_windows: int = 4) -> QuantizationPlan:
    """Calibration windows and, for ``avg_bits`` / ``max_size_mb``, the per-layer widths.

    The allocation measures each layer's sensitivity on the first ``sensitivity_windows``
    calibration windows (`quant.allocate`), which needs the float model in memory.
    """
    budgeted = config.budgeted
    if not (config.needs_calibration or budgeted):
        return _probe_plan(model, config, {})
    from .quant.allocate import (
        allocatable_shapes,
        allocation_options,
        budget_bytes,
        fixed_by_overrides,
        layer_bytes,
        plan_overrides,
        quantization_costs,
    )
    from .quant.calibrate import calibration_windows, default_window_count, forward_dtype

    n_windows = config.calibration_windows
    if n_windows is None:
        calibrated = [lin.in_features for name, (lin, _) in eligible_linears(model, config).items()
                      if config.is_calibrated(name)]
        n_windows = default_window_count(max(calibrated, default=0), config.calibration_length)
    windows, info = calibration_windows(tokenizer, n_windows, config.calibration_length)
    manifest = {}
    if config.needs_calibration:
        manifest["calibration"] = {**info, "layers": "all" if config.calibrate else "lm_head",
                                   "forward_dtype": str(forward_dtype(config.calibration_dtype)
                                                        ).removeprefix("torch.")}
    if budgeted:
        shapes = allocatable_shapes(model, config)
        budget = (budget_bytes(shapes, config.avg_bits, config.group_size)
                  if config.avg_bits is not None else int(config.max_size_mb * 1e6))
        fixed = fixed_by_overrides(shapes, config)
        free = {n: s for n, s in shapes.items() if n not in fixed}
        left = budget - sum(fixed.values())
        if not free or left <= 0:
            raise ConfigError(f"the bit allocation has nothing to choose: the --override layers "
                             f"take {sum(fixed.values())} of the {budget} budget bytes"
                             + ("" if free else " and pin every layer"))
        options = allocation_options(free, left, config.group_size)
        narrowest = sum(min(layer_bytes(s, *o) for o in options) for s in free.values())
        if narrowest > left:  # refuse before the minutes of sensitivity measurement
            raise ConfigError(f"bit allocation: {left} bytes are too few; the narrowest choice "
                              f"({options[0][0]}-bit, group {max(g for _, g in options)}) "
                              f"needs {narrowest}")
        costs = quantization_costs(model, config, windows[:sensitivity_windows], options, free)
        try:
            overrides, groups, chosen = plan_overrides(costs, free, left)
        except ValueError as exc:  # even the narrowest options overflow the budget
            raise ConfigError(f"bit allocation: {exc}") from None
        # Explicit user overrides come first (first match wins), then the allocation.
        config = config.replace(overrides=tuple(config.overrides) + overrides,
                                group_overrides=tuple(config.group_overrides) + groups)
        manifest["allocation"] = {
            "budget_bytes": budget, "pinned_by_overrides": sorted(fixed),
            "options": [list(o) for o in options],
            "widths": {n: b for n, (b, _) in chosen.items()},
            "group_sizes": {n: g for n, (_, g) in chosen.items()},
            "sensitivity": f"per-token output Fisher on {sensitivity_windows} calibration windows",
            "calibration": info}
    if config.needs_calibration:
        return QuantizationPlan(config, windows, manifest)
    return _probe_plan(model, config, manifest)


def _probe_plan(model: nn.Module, config: SinqConfig, manifest: dict) -> QuantizationPlan:
    """The plan of a run without calibration windows: the energy probe's ids, if any."""
    probe = probe_tokens(model, config) if config.energy_refit else None
    if probe is None:
        return QuantizationPlan(config, None, manifest)
    ids, info = probe
    return QuantizationPlan(config, ids, {**manifest, "probe": info})


def quantize_planned(source, config: SinqConfig, progress: bool = True,  # noqa: ANN001
                     meter: InputMeter | None = None
                     ) -> tuple[SinqConfig, dict[str, QuantizedWeight], dict]:
    """(config, records, manifest sections) of a quantization that holds the model's records
    before the export writes them: ``calibrate`` / ``calibrate_head``, ``avg_bits`` /
    ``max_size_mb`` (the energy refit alone streams instead: `probe_energies`).

    The allocation needs the float model in memory once (it measures per-layer sensitivity
    on it). Everything else runs the model block by block (`models.load_causal_lm_streamed`:
    one float block at a time) to collect each linear's input statistics and quantizes there,
    so the records are handed to the export, which streams everything else (tables, norms,
    float tensors) from the checkpoint. ``meter``: see `quantize_model`.
    """
    from .models import load_causal_lm, load_causal_lm_streamed

    if config.budgeted:
        model, tokenizer = load_causal_lm(source)
    else:
        model, tokenizer = load_causal_lm_streamed(source, with_tokenizer=config.needs_calibration)
    plan = plan_quantization(model, tokenizer, config)
    quantize_model(model, plan.config, progress=progress, calibration=plan.calibration,
                   meter=meter)
    records = {name: m.record for name, m in quantized_layers(model).items()}
    return plan.config, records, plan.manifest


def quantized_layers(model: nn.Module) -> dict[str, SinqLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SinqLinear)}


def _layer_meta(m: SinqLinear) -> dict:
    return {
        "shape": [m.out_features, m.in_features],
        "bits": m.bits,
        "group_size": m.group_size,
        "col_scale": m.col_scale is not None,
        "bias": m.bias is not None,
    }


def save_quantized(
    model: nn.Module,
    out_dir: str | Path,
    config: SinqConfig,
    *,
    tokenizer=None,  # noqa: ANN001
    overwrite: bool = False,
    protect: Iterable[str | Path] = (),
) -> Path:
    """Save a quantized model as safetensors + JSON (never pickle), atomically.

    ``overwrite`` replaces only an earlier `save_quantized` folder (`QUANTIZED_MARKER`) and
    never a folder in ``protect`` (the source model) or a parent of one.
    """
    with atomic_output_dir(out_dir, overwrite, marker=QUANTIZED_MARKER, protect=protect) as tmp:
        write_quantized(model, tmp, config, tokenizer=tokenizer)
    return Path(out_dir)


def write_quantized(model: nn.Module, folder: Path, config: SinqConfig, *, tokenizer=None) -> None:  # noqa: ANN001
    """Write the `save_quantized` files into ``folder`` (a temp folder of `atomic_output_dir`).

    Layout: ``quantized.safetensors`` (float params and packed buffers), ``sinq_quantized.json``
    (format version, config, per-layer layout), plus the HF ``config.json`` and tokenizer when
    the model has them, so `load_quantized` can rebuild the module tree without the source.
    """
    from safetensors.torch import save_model

    save_model(model, str(folder / QUANTIZED_WEIGHTS_FILE), metadata={"format": "pt"})
    canonical_safetensors_header(folder / QUANTIZED_WEIGHTS_FILE)
    hf_config = getattr(model, "config", None)
    if hf_config is not None and hasattr(hf_config, "save_pretrained"):
        hf_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    write_json(
        folder / QUANTIZED_META_FILE,
        {
            "format_version": FORMAT_VERSION,
            "config": config.to_dict(),
            "layers": {n: _layer_meta(m) for n, m in quantized_layers(model).items()},
        },
    )


def canonical_safetensors_header(path: Path) -> None:
    """Rewrite a safetensors header with sorted keys at the same length (space padded).

    Why: safetensors serialises ``__metadata__`` from a hash map, so with two or more entries
    (``format`` plus the alias it adds for tied weights) the key order changes between
    processes and two saves of one model differ. Tensor offsets are relative to the end of the
    header, whose length is kept, so the tensor bytes are untouched.
    """
    with open(path, "r+b") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        if len(text) <= n:  # always true: same content, no whitespace
            fh.seek(8)
            fh.write(text + b" " * (n - len(text)))


def _empty_record(meta: dict) -> QuantizedWeight:
    from .quant import packing

    n, k = meta["shape"]
    bits, g = meta["bits"], meta["group_size"]
    nb = packing.n_blocks(k, g)
    return QuantizedWeight(
        packed=torch.zeros(n, nb, packing.packed_block_bytes(g, bits), dtype=torch.uint8),
        scales=torch.zeros(n, nb),
        zero_points=torch.zeros(n, packing.packed_zero_point_bytes(nb, bits), dtype=torch.uint8),
        col_scale=torch.zeros(k) if meta["col_scale"] else None,
        bits=bits,
        group_size=g,
        shape=(n, k),
    )


def load_quantized(path: str | Path, model: nn.Module | None = None) -> tuple[nn.Module, SinqConfig]:
    """Rebuild a model saved by `save_quantized`.

    ``model`` is the float skeleton to load into (any torch module with the same structure);
    when omitted, it is built from the saved HF ``config.json`` (no weights are downloaded).
    """
    from safetensors.torch import load_model

    path = Path(path)
    meta_file = path / QUANTIZED_META_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not a saved quantized model (no {QUANTIZED_META_FILE})")
    meta = read_json(meta_file)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_file}: unsupported format_version {meta.get('format_version')!r}")
    if model is None:
        from transformers import AutoConfig, AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    for name, layer in meta["layers"].items():
        if not re.fullmatch(r"[\w.]+", name):
            raise ValueError(f"{meta_file}: bad layer name {name!r}")
        _set_module(model, name, SinqLinear(_empty_record(layer),
                                            torch.zeros(layer["shape"][0]) if layer["bias"]
                                            else None))
    load_model(model, str(path / QUANTIZED_WEIGHTS_FILE), strict=True)
    model.eval()
    return model, SinqConfig.from_dict(meta["config"])
