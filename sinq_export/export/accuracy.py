"""``accuracy_level="auto"``: each MatMulNBits node's accuracy level chosen by measurement.

onnxruntime's int8 activations (accuracy level 4) make 4-bit decode several times faster per
call, but quantize each block of ``block_size`` inputs to int8 with one absmax scale
(`quant.int8`): on a model whose activations have loud channels (Gemma's
``sqrt(hidden)``-scaled embeddings and large norm weights) the quiet channels of a block lose
their bits, and the noise of every layer adds up along the residual stream.

`measure_int8` runs the float model once more on the energy probe's random ids, one streamed
block at a time, and measures two things:

- every quantized linear's **int8 error** on its float input ``x``, through the column scale
  ``t`` its node's input carries (the quantized record's, or the weight-only Sinkhorn t the
  quantizer would give it): ``max|int8(x t) (W/t)^T - x W^T| / max|x W^T|``, the validator's
  layer metric; the head's weight is read from the checkpoint a slab of rows at a time;
- the **int8-stream divergence**: each block runs a second time on a stream in which every
  linear's input goes through int8, carried from block to block; at the final norm its
  distance from the float stream, ``mean |h_int8 - h| / |h|``, is what the decoder's int8
  noise adds up to (the local errors alone do not tell a model that passes at level 4 from
  one that fails: docs/quality.md).

`choose_levels` turns them into levels per shared-input group (one int8 quantization of one
tensor, one level), the manifest records them per layer, and `validate` holds each layer to
the tolerance of its node's level.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..calibration.forward import capture_block_inputs, forward_dtype, forward_precision
from ..calibration.probe import probe_tokens, release_memory
from ..checkpoint import Checkpoint
from ..config import SinqConfig, is_head
from ..heap import return_free_heap
from ..models import decoder_blocks, ensure_loaded, load_causal_lm_streamed, release_block
from ..quant.core import sinq_col_scale, tie_col_scale
from ..quant.int8 import int8_activations, int8_error
from ..quant.methods import SINQConfig
from ..quant.units import SHARED_INPUT_GROUPS

INT8_LEVEL, EXACT_LEVEL = 4, 0
# Largest int8 error a linear may take at level 4 (a tenth of the level-4 end-to-end limits
# the validator holds: one layer alone must not use them up).
INT8_TOLERANCE = 3e-2
# Largest int8-stream divergence the decoder may keep at level 4; past it the decoder runs at
# level 0 (`choose_levels`). Measured on the probe:
# SmolLM2 and Qwen2.5-0.5B pass validate at level 4 everywhere, Gemma3-270m does not
# (docs/quality.md, "Accuracy level per layer").
DIVERGENCE_BUDGET = 4e-2
HEAD_ROWS = 8192  # rows of the output projection read from the checkpoint at once
METRIC = ("max|int8(x t) (W/t)^T - x W^T| / max|x W^T| on the energy probe's random ids; t: the "
          "record's column scale, else the weight-only Sinkhorn t")


@dataclass
class Int8Measurement:
    """`measure_int8`'s result: each linear's int8 error and the stream's divergence."""

    errors: dict[str, float]
    divergence: float | None


def _run(block: nn.Module, hidden: torch.Tensor, kwargs: Mapping[str, Any],
         dtype: torch.dtype) -> torch.Tensor:
    with forward_precision(dtype):
        out = block(hidden, **kwargs)
    return (out[0] if isinstance(out, tuple) else out).float()


def _weight_only_t(weights: list[torch.Tensor], method: object) -> torch.Tensor | None:
    """The ``t`` the quantizer gives a unit from its weights alone (SINQ's
    Sinkhorn t, gated and tied as configured; None for RTN or a gated-off matrix)."""
    if not isinstance(method, SINQConfig):
        return None
    t = sinq_col_scale(torch.cat([w.float() for w in weights]), method)
    return t if t is None or method.col_scale_tie is None else tie_col_scale(t, *method.col_scale_tie)


def _int8_input(t: torch.Tensor | None, block: int) -> Callable:
    """A forward pre-hook giving a linear what a level-4 node computes with: its input times
    ``t`` through int8 blocks, divided back (the node's weight carries ``1 / t``)."""
    def hook(_module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        xt = x.float() if t is None else x.float() * t
        q = int8_activations(xt, block)
        return ((q if t is None else q / t).to(x.dtype), *args[1:])
    return hook


def _inputs_of(linears: Mapping[str, nn.Module], run: Callable[[], torch.Tensor]
               ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(each linear's input, the result) of ``run()``."""
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda _m, args, _out, n=n: inputs.__setitem__(n, args[0]))
             for n, m in linears.items()]
    try:
        out = run()
    finally:
        for h in hooks:
            h.remove()
    return inputs, out


@torch.no_grad()
def _head_error(ckpt: Checkpoint, tensor: str, x: torch.Tensor, t: torch.Tensor | None,
                block: int) -> float:
    """`int8_error` of ``x`` through the checkpoint tensor ``tensor``, read `HEAD_ROWS` rows at
    a time (the metric is a max over output columns, so slabs combine by max): no
    ``[vocab x hidden]`` float copy and no ``[tokens x vocab]`` logits are held."""
    from safetensors import safe_open

    xt = x if t is None else x * t
    xq = int8_activations(xt, block)
    worst = scale = 0.0
    with safe_open(str(ckpt.shard(tensor)), framework="pt") as fh:
        sliced = fh.get_slice(tensor)
        for start in range(0, sliced.get_shape()[0], HEAD_ROWS):
            w = sliced[start:start + HEAD_ROWS].float()
            if t is not None:
                w = w / t
            ref = xt @ w.T
            worst = max(worst, float((xq @ w.T - ref).abs().max()))
            scale = max(scale, float(ref.abs().max()))
    return worst / max(scale, 1e-30)


@torch.no_grad()
def measure_int8(folder: Path, config: SinqConfig, block_sizes: Mapping[str, int],
                 units: Mapping[str, tuple[str, ...]], sources: Mapping[str, str],
                 col_scales: Mapping[str, torch.Tensor | None]) -> Int8Measurement:
    """Int8 error of every linear in ``block_sizes`` (name -> its node's block size) and the
    int8-stream divergence, on the random-id probe (`probe_tokens`) through the float model,
    streamed one block at a time (each released once measured).

    ``units``: each linear's quantization unit (a joint unit shares one t); ``sources``: each
    linear's checkpoint tensor (the head's is read from there); ``col_scales``: the t of
    linears already quantized (their records'), the others get the weight-only t.
    """
    model, _ = load_causal_lm_streamed(folder, with_tokenizer=False)
    probe = probe_tokens(model, config)
    if probe is None:
        raise ValueError(f"{folder}: accuracy_level 'auto' needs a causal LM with decoder blocks")
    dtype = forward_dtype(config.calibration_dtype)
    hidden, kwargs = capture_block_inputs(model, probe[0])
    prefix = {id(m): n for n, m in model.named_modules()}
    errors: dict[str, float] = {}
    noisy = hidden
    for block in decoder_blocks(model):
        ensure_loaded(block)
        start = prefix[id(block)] + "."
        linears = {n: block.get_submodule(n[len(start):]) for n in block_sizes
                   if n.startswith(start)}
        inputs, out = _inputs_of(linears, lambda b=block, h=hidden: _run(b, h, kwargs, dtype))
        hooks = []
        for unit in dict.fromkeys(units[n] for n in linears):
            t = col_scales[unit[0]] if unit[0] in col_scales else _weight_only_t(
                [linears[n].weight for n in unit],
                config.method_config(unit[0], config.bits_for(unit[0])))
            for n in unit:
                w = linears[n].weight.float()
                errors[n] = int8_error(inputs[n], w if t is None else w / t, block_sizes[n], t)
                hooks.append(linears[n].register_forward_pre_hook(_int8_input(t, block_sizes[n])))
        del inputs
        try:
            noisy = _run(block, noisy, kwargs, dtype)
        finally:
            for h in hooks:
                h.remove()
        hidden = out
        release_block(block)
        return_free_heap()
    norm = model.model.norm
    ref, got = norm(hidden).float(), norm(noisy).float()
    divergence = float(((got - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)).mean())
    del model, noisy, hidden
    release_memory()
    ckpt = Checkpoint.open(folder)
    x = ref.reshape(-1, ref.shape[-1])
    for name in (n for n in block_sizes if n not in errors):
        if not is_head(name):
            raise ValueError(f"accuracy_level 'auto': {name} is neither in a decoder block "
                             "nor the output projection")
        errors[name] = _head_error(ckpt, sources[name], x, col_scales.get(name), block_sizes[name])
    return Int8Measurement(errors, divergence)


def shared_input_groups(names: Iterable[str]) -> list[list[str]]:
    """Linears that read one tensor, so one int8 quantization of it: q/k/v, gate/up; every
    other linear alone."""
    leaf_group = {leaf: i for i, group in enumerate(SHARED_INPUT_GROUPS["all"]) for leaf in group}
    groups: dict[tuple[str, int], list[str]] = {}
    singles = []
    for name in names:
        parent, _, leaf = name.rpartition(".")
        if leaf in leaf_group:
            groups.setdefault((parent.rpartition(".")[0], leaf_group[leaf]), []).append(name)
        else:
            singles.append([name])
    return list(groups.values()) + singles


def choose_levels(errors: Mapping[str, float], divergence: float | None = None,
                  tolerance: float = INT8_TOLERANCE, budget: float = DIVERGENCE_BUDGET
                  ) -> dict[str, int]:
    """Each linear's level, by shared-input group (one int8 input, one level).

    Level 0 for a group whose worst int8 error is past ``tolerance`` (NaN counts as past).
    When the stream's ``divergence`` (every decoder linear at level 4) is past ``budget``,
    every decoder linear goes to level 0. Why not only the loudest groups: on Gemma3-270m
    (divergence 5.2e-2) the 30 linears whose squared errors took the stream past the budget
    went to level 0 and validate still failed (top-1 0.924): the probe's local errors do not
    say where the stream's noise comes from (docs/quality.md). The head is not in the
    stream: its own error decides."""
    groups = shared_input_groups(errors)
    worst = [max(errors[n] for n in g) for g in groups]
    exact = {i for i, w in enumerate(worst) if not w <= tolerance}
    if divergence is not None and not divergence <= budget:
        exact |= {i for i, g in enumerate(groups) if not any(map(is_head, g))}
    return {n: EXACT_LEVEL if i in exact else INT8_LEVEL for i, g in enumerate(groups) for n in g}


def accuracy_section(levels: Mapping[str, int], measured: Int8Measurement) -> dict:
    """The manifest's ``accuracy`` section: how the per-layer levels were chosen."""
    counts: dict[str, int] = {}
    for level in levels.values():
        counts[str(level)] = counts.get(str(level), 0) + 1
    worst = max(measured.errors.items(), key=lambda kv: kv[1], default=(None, None))
    return {"mode": "auto", "int8_tolerance": INT8_TOLERANCE, "measured": METRIC,
            "int8_stream_divergence": measured.divergence, "divergence_budget": DIVERGENCE_BUDGET,
            "layers_per_level": dict(sorted(counts.items())),
            "worst_int8_error": {"layer": worst[0], "error": worst[1]}}
