"""What a quantization needs decided before any weight is quantized: the calibration windows
or the probe's ids, and for a size budget (``avg_bits`` / ``max_size_mb``) each linear's
width and group size (`quant.allocate` on `calibration.sensitivity`'s costs)."""

from __future__ import annotations

import re
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .calibration.forward import BlockObserver, forward_dtype
from .calibration.probe import probe_tokens, release_memory
from .calibration.sensitivity import allocatable_shapes, quantization_costs
from .calibration.windows import (
    available_bytes,
    calibration_bytes,
    calibration_windows,
    default_window_count,
)
from .config import ConfigError, SinqConfig
from .linear import eligible_linears, quantized_layers
from .models import load_causal_lm, load_causal_lm_streamed
from .quant.allocate import (
    allocation_options,
    budget_bytes,
    layer_bytes,
    plan_overrides,
)
from .quant.record import QuantizedWeight
from .quantize import quantize_model

if TYPE_CHECKING:  # typing only: transformers is slow to import
    from transformers import PreTrainedTokenizerBase


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


def plan_quantization(model: nn.Module, tokenizer: PreTrainedTokenizerBase | None,
                      config: SinqConfig,
                      sensitivity_windows: int = 4) -> QuantizationPlan:
    """Calibration windows and, for ``avg_bits`` / ``max_size_mb``, the per-layer widths.

    The allocation measures each layer's sensitivity on the first ``sensitivity_windows``
    calibration windows (`quant.allocate`), which needs the float model in memory.
    """
    budgeted = config.budgeted
    if not (config.needs_calibration or budgeted):
        return _probe_plan(model, config, {})

    n_windows = config.calibration_windows
    if n_windows is None:
        calibrated = [lin.in_features for name, (lin, _) in eligible_linears(model, config).items()
                      if config.is_calibrated(name)]
        n_windows = default_window_count(max(calibrated, default=0), config.calibration_length,
                                         head_only=config.calibrate_head and not config.calibrate)
    _check_calibration_fits(model, n_windows, config.calibration_length)
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


def fixed_by_overrides(shapes: Mapping[str, Sequence[int]], config: SinqConfig) -> dict[str, int]:
    """Bytes of the layers the user's own ``overrides`` pin (the allocation leaves them be
    and gives the rest what is left of the budget)."""
    return {n: layer_bytes(s, config.bits_for(n), config.group_size_for(n))
            for n, s in shapes.items() if any(re.search(p, n) for p, _ in config.overrides)}


def _check_calibration_fits(model: nn.Module, n_windows: int, length: int) -> None:
    """Refuse, before any forward, a calibration whose hidden states exceed the free memory."""
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    free = available_bytes()
    if not isinstance(hidden, int) or free is None:
        return
    need = calibration_bytes(n_windows, length, hidden)
    if need > free:
        raise ConfigError(f"calibration: {n_windows} windows x {length} tokens need "
                          f"{need / 1e9:.1f} GB of hidden states (hidden size {hidden}) and "
                          f"{free / 1e9:.1f} GB is available; lower --calibration-windows")


def _probe_plan(model: nn.Module, config: SinqConfig, manifest: dict) -> QuantizationPlan:
    """The plan of a run without calibration windows: the energy probe's ids, if any."""
    probe = probe_tokens(model, config) if config.energy_refit else None
    if probe is None:
        return QuantizationPlan(config, None, manifest)
    ids, info = probe
    return QuantizationPlan(config, ids, {**manifest, "probe": info})


def quantize_planned(source: str | Path, config: SinqConfig, progress: bool = True,
                     spill: MutableMapping[str, QuantizedWeight] | None = None,
                     observer: BlockObserver | None = None
                     ) -> tuple[SinqConfig, Mapping[str, QuantizedWeight], dict]:
    """(config, records, manifest sections) of a quantization that holds the model's records
    before the export writes them: ``calibrate`` / ``calibrate_head``, ``avg_bits`` /
    ``max_size_mb`` (the energy refit alone streams instead: `probe_energies`).

    The allocation needs the float model in memory once (it measures per-layer sensitivity
    on it). Everything else runs the model block by block (`models.load_causal_lm_streamed`:
    one float block at a time) to collect each linear's input statistics and quantizes there,
    so the records are handed to the export, which streams everything else (tables, norms,
    float tensors) from the checkpoint. ``spill``: where the records go block by block (a
    `saved.SpilledRecords` keeps them on disk) and what is returned; else a dict.
    ``observer``: shown every float block of the probe's pass (`quantize.quantize_model`).
    """
    if config.budgeted:
        model, tokenizer = load_causal_lm(source)
    else:
        model, tokenizer = load_causal_lm_streamed(source, with_tokenizer=config.needs_calibration)
    plan = plan_quantization(model, tokenizer, config)
    quantize_model(model, plan.config, progress=progress, calibration=plan.calibration,
                   drop_table=True, sink=spill, observer=observer)
    records = spill if spill is not None else {
        name: m.record for name, m in quantized_layers(model).items()}
    del model
    release_memory()
    return plan.config, records, plan.manifest
