"""`quantize_model(model, config)`: every eligible linear of a PyTorch model replaced by a
`SinqLinear`, weight-only, on the energy probe's statistics, or calibrated block by block."""

from __future__ import annotations

import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration.forward import (
    BlockObserver,
    ProbeStream,
    calibrate_block,
    capture_block_inputs,
    forward_dtype,
)
from .calibration.probe import model_energies, probe_tokens
from .config import SinqConfig
from .heap import return_free_heap
from .linear import SinqLinear, eligible_linears, quantized_layers, set_module
from .models import decoder_blocks, ensure_loaded, head_and_final_norm
from .quant.handlers import relative_error
from .quant.record import QuantizedWeight
from .quant.stats import LayerStats
from .quant.units import joint_groups, quantize_unit


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


def _units(linears: Mapping[str, tuple[nn.Linear, int]], config: SinqConfig) -> list[list[str]]:
    """Quantization units in module order: joint groups (shared t) and single linears."""
    settings = {name: (bits, config.group_size_for(name)) for name, (_, bits) in linears.items()}
    groups = joint_groups(linears, settings, config.shared_col_scale)
    grouped = {n for g in groups for n in g}
    units = groups + [[n] for n in linears if n not in grouped]
    position = {name: i for i, name in enumerate(linears)}
    units.sort(key=lambda names: position[names[0]])
    return units


def _unit_records(prefix: str, names: list[str], linears: Mapping[str, tuple[nn.Linear, int]],
                  config: SinqConfig, report: QuantizationReport, measure_error: bool,
                  stats: Mapping[str, LayerStats] | None = None) -> dict[str, QuantizedWeight]:
    """The records of one unit (names relative to the model; ``stats`` keyed relative to
    ``prefix``), reported; the float linears stay in place."""
    t0 = time.perf_counter()
    bits = linears[names[0]][1]
    method = config.method_config(names[0], bits)
    weights = [linears[n][0].weight for n in names]
    calibration = None if stats is None else stats.get(names[0][len(prefix):])
    records = quantize_unit(weights, names, method, calibration)
    dt = (time.perf_counter() - t0) / len(names)
    for name, record, weight in zip(names, records, weights):
        err = relative_error(weight, record) if measure_error else None
        label = method.label(record)
        if stats is not None:
            label += "+calibrated" if config.is_calibrated(name) else "+energy"
        report.layers.append(LayerReport(name, record.shape, bits, label, dt, err))
    return dict(zip(names, records))


def _install(root: nn.Module, prefix: str, records: Mapping[str, QuantizedWeight],
             linears: Mapping[str, tuple[nn.Linear, int]]) -> None:
    """Replace each float linear of ``records`` under ``root`` (the module at ``prefix``) by
    its `SinqLinear`."""
    for name, record in records.items():
        set_module(root, name[len(prefix):], SinqLinear(record, linears[name][0].bias))


def _quantize_unit(root: nn.Module, prefix: str, names: list[str],
                   linears: Mapping[str, tuple[nn.Linear, int]], config: SinqConfig,
                   report: QuantizationReport, measure_error: bool,
                   stats: Mapping[str, LayerStats] | None = None) -> None:
    """Quantize one unit (names relative to the model; ``root`` is the module at ``prefix``)."""
    records = _unit_records(prefix, names, linears, config, report, measure_error, stats)
    _install(root, prefix, records, linears)


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    config: SinqConfig | None = None,
    *,
    progress: bool = True,
    measure_error: bool = False,
    calibration: torch.Tensor | None = None,
    drop_table: bool = False,
    sink: MutableMapping[str, QuantizedWeight] | None = None,
    observer: BlockObserver | None = None,
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
    calibration token windows (`calibration.windows.calibration_windows`); the model is then
    quantized block by block on statistics of each block's inputs
    (`calibration.forward.calibrate_block`; with ``calibrate_head`` alone the blocks are quantized
    calibration-free and only run to give the head its input). A model from
    `models.load_causal_lm_streamed` loads each block when it first runs and drops its float
    weights once quantized. ``drop_table``: the model is not run again (only its records are
    wanted), so an embedding table that is not also the head goes to the meta device once the
    calibration windows are embedded (a 151,936 x 1536 table is 0.9 GB of float32).
    ``sink`` (calibrated runs): the model is not run again and only its records are wanted, so
    each block's records move into ``sink`` (e.g. `saved.SpilledRecords`, on disk) once the
    block has run, and the block keeps no tensors: memory then holds one block's records,
    not the model's. ``observer``: shown every float block of the probe's pass
    (`calibration.forward.ProbeStream`; a calibrated run shows it each block's records), e.g.
    the accuracy measurement riding on that pass.
    """
    config = config or SinqConfig()
    start = time.perf_counter()
    linears = eligible_linears(model, config)
    units = _units(linears, config)
    report = QuantizationReport(config=config)
    if config.needs_calibration:
        if calibration is None:
            raise ValueError("config.calibrate / calibrate_head is set but no calibration "
                             "windows were given")
        _quantize_calibrated(model, linears, units, config, report, measure_error,
                             calibration, progress, drop_table, sink, observer)
    else:
        energies = model_energies(model, config, list(linears), calibration, observer=observer)
        for names in tqdm(units, desc="SINQ quantize", unit="unit", disable=not progress):
            _quantize_unit(model, "", names, linears, config, report, measure_error, energies)
    if sink is not None:
        _move_records(model, "", sink)
    report.seconds = time.perf_counter() - start
    return report


def _quantize_calibrated(model: nn.Module, linears: dict[str, tuple[nn.Linear, int]],
                         units: list[list[str]], config: SinqConfig, report: QuantizationReport,
                         measure_error: bool, windows: torch.Tensor, progress: bool,
                         drop_table: bool = False,
                         sink: MutableMapping[str, QuantizedWeight] | None = None,
                         observer: BlockObserver | None = None) -> None:
    """Block by block: statistics of each block's inputs, quantize its units, propagate.

    With ``calibrate`` every linear gets full statistics (``H``, for A-SINQ and GPTQ). With
    ``calibrate_head`` alone the blocks only run to give the head its input, and the other
    linears' energy refit takes the random-id probe's energies, measured on the float block
    just before it is quantized (`ProbeStream`, the probe's own hidden state carried beside
    the calibration windows'). Why not the calibration text's: random ids did better on both
    models measured, and the energies of all the windows would cost a second forward per block
    (docs/quality.md). ``observer``: shown every float block on the probe stream, with the
    records it was just given (one read of the checkpoint serves the calibration, the energies
    and e.g. the accuracy measurement)."""
    blocks = decoder_blocks(model)
    dtype = forward_dtype(config.calibration_dtype)
    block_prefix = {id(m): n for n, m in model.named_modules()}
    energies_wanted = not config.calibrate and config.energy_refit > 0
    probe = probe_tokens(model, config) if energies_wanted or observer is not None else None
    stream = None if probe is None else ProbeStream(model, probe[0], dtype, observer)
    hidden, kwargs = capture_block_inputs(model, windows)
    if drop_table:
        _drop_untied_table(model)
    done: set[str] = set()
    for block in tqdm(blocks, desc="SINQ calibrate", unit="block", disable=not progress):
        ensure_loaded(block)
        prefix = block_prefix[id(block)] + "."
        mine = [u for u in units if u[0].startswith(prefix)]
        rel = [n[len(prefix):] for u in mine for n in u]

        def quantize_block(blk: nn.Module, stats: dict[str, LayerStats] | None,
                           mine: list[list[str]] = mine, prefix: str = prefix,
                           rel: list[str] = rel) -> None:
            # the probe's energies only where they are used (a full calibration has its own)
            probed = {} if stream is None else stream.advance(
                blk, prefix[:-1], rel if energies_wanted else [])
            if stats is None:
                stats = probed
            made: dict[str, QuantizedWeight] = {}
            for names in mine:
                made.update(_unit_records(prefix, names, linears, config, report,
                                          measure_error, stats))
            if stream is not None:
                stream.observe(blk, prefix[:-1], made)
            _install(blk, prefix, made, linears)
            for name in made:  # the float weights go before the quantized forward runs
                done.add(name)
                linears.pop(name)

        hidden = calibrate_block(block, hidden, kwargs, quantize_block, rel,
                                 with_stats=config.calibrate, dtype=dtype, where=prefix[:-1])
        for m in block.modules():  # and holds no float copy of a quantized block either
            if isinstance(m, SinqLinear):
                m.drop_cache()
        if sink is not None:
            _move_records(block, prefix, sink)
        return_free_heap()
    rest = [u for u in units if u[0] not in done]
    energies = {} if stream is None or not energies_wanted else stream.head_energies(
        model, [n for u in rest for n in u if not config.is_calibrated(n)])
    if stream is not None:
        stream.finish(model)
    head, norm = head_and_final_norm(model)
    for names in rest:
        for name in names:  # a streamed model reads its head only now
            ensure_loaded(linears[name][0])
        stats = None
        if norm is not None and linears[names[0]][0] is head and config.is_calibrated(names[0]):
            # The output projection reads the final norm of the last block's output.
            stats = {names[0]: LayerStats(head.in_features)}
            stats[names[0]].add(norm(hidden))
        elif names[0] in energies:
            stats = energies
        _quantize_unit(model, "", names, linears, config, report, measure_error, stats)


def _move_records(module: nn.Module, prefix: str, sink: MutableMapping[str, QuantizedWeight]
                  ) -> None:
    """Hand every quantized layer's record under ``module`` to ``sink`` and drop its tensors
    (a layer on the meta device was handed over before)."""
    for name, layer in quantized_layers(module).items():
        if not layer.packed.is_meta:
            sink[prefix + name] = layer.record
            layer.to("meta")


def _drop_untied_table(model: nn.Module) -> None:
    """Move the input embedding table to the meta device unless the head shares its weight."""
    table = model.get_input_embeddings()
    head, _ = head_and_final_norm(model)
    if table is not None and (head is None or head.weight is not table.weight):
        table.to("meta")
