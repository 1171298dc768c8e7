"""The energy probe: every linear's input energies ``E[x^2]`` measured on random token ids run
through the float model, for the calibration-free scale refit (`SinqConfig.energy_refit`)."""

from __future__ import annotations

import gc
from pathlib import Path

import torch
from torch import nn

from ..config import SinqConfig
from ..heap import return_free_heap
from ..linear import eligible_linears
from ..models import decoder_blocks, load_causal_lm_streamed
from ..quant.stats import LayerStats
from .forward import BlockObserver, forward_dtype, input_energies
from .windows import probe_window


def model_energies(model: nn.Module, config: SinqConfig, names: list[str],
                   windows: torch.Tensor | None = None, release: bool = False,
                   observer: BlockObserver | None = None) -> dict[str, LayerStats] | None:
    """Input energies of ``names`` for the energy refit (`calibration.forward.input_energies`) on
    ``windows`` or the random-id probe; None without ``energy_refit`` or for a module that is
    not a causal LM with decoder blocks (quantized weight-only then). ``observer``: shown every
    float block of the same pass (`calibration.forward.ProbeStream`)."""
    if not config.energy_refit:
        return None
    if windows is None:
        probe = probe_tokens(model, config)
        if probe is None:
            return None
        windows = probe[0]
    return input_energies(model, windows, names, forward_dtype(config.calibration_dtype),
                          release=release, observer=observer)


def probe_energies(source: str | Path, config: SinqConfig, observer: BlockObserver | None = None
                   ) -> tuple[dict[str, LayerStats], dict] | None:
    """(input energies, the manifest's ``probe`` record) of ``source``'s linears, measured on a
    streamed model (one float block at a time, each dropped once measured) so that a model
    bigger than memory is still quantized tensor by tensor afterwards; None without
    ``energy_refit``. ``observer``: shown every float block of the same pass."""
    if not config.energy_refit:
        return None
    model, _ = load_causal_lm_streamed(source, with_tokenizer=False)
    probe = probe_tokens(model, config)
    if probe is None:
        return None
    names = list(eligible_linears(model, config))
    energies = model_energies(model, config, names, probe[0], release=True, observer=observer)
    del model
    release_memory()  # the export that follows should not find the probe's tensors still held
    return energies, probe[1]


def release_memory() -> None:
    """Free what a finished pass left (its model's reference cycles) and return the free heap
    to the OS (`heap.return_free_heap`)."""
    gc.collect()
    return_free_heap()


def probe_tokens(model: nn.Module, config: SinqConfig) -> tuple[torch.Tensor, dict] | None:
    """(`calibration.windows.probe_window` ids, their manifest record) for a causal LM's energy
    probe, or None when ``model`` has no vocabulary or decoder blocks to run them through."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    try:
        decoder_blocks(model)
    except ValueError:
        return None
    return probe_window(vocab, config.probe_tokens) if isinstance(vocab, int) else None
