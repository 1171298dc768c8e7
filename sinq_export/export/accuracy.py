"""``accuracy_level="auto"``: each MatMulNBits node's accuracy level chosen by measurement.

onnxruntime's int8 activations (accuracy level 4) make 4-bit decode several times faster per
call, but quantize each block of ``block_size`` inputs to int8 with one absmax scale
(`quant.int8`): on a model whose activations have loud channels (Gemma's
``sqrt(hidden)``-scaled embeddings and large norm weights) the quiet channels of a block lose
their bits, and the noise of every layer adds up along the residual stream.

`Int8Observer` watches the export's float pass over the energy probe's random ids
(`calibration.forward.ProbeStream`: the energy probe, or the calibration loop that carries the
probe beside its windows; `measure_int8` where no such pass runs), one streamed block at a time,
and measures two things:

- every quantized linear's **int8 error** on its float input ``x``, through the column scale
  ``t`` its node's input carries (the quantized record's, or the weight-only Sinkhorn t the
  quantizer would give it): ``max|int8(x t) (W/t)^T - x W^T| / max|x W^T|``, the validator's
  layer metric; the head's weight is read from the checkpoint a slab of rows at a time, and
  the head also measures how often int8 activations keep its argmax, with its loudest input
  channels kept out of the int8 input (multiplied in float beside the node) where that is
  what keeps it (`EXACT_CHANNEL_COUNTS`);
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

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..calibration.forward import LinearIO, forward_dtype, forward_precision, input_energies
from ..calibration.probe import probe_tokens, release_memory
from ..checkpoint import Checkpoint
from ..config import SinqConfig, is_head
from ..models import load_causal_lm_streamed
from ..quant.core import sinq_col_scale, tie_col_scale
from ..quant.int8 import int8_activations, int8_error, loudest_channels
from ..quant.methods import SINQConfig
from ..quant.record import QuantizedWeight
from ..quant.units import SHARED_INPUT_GROUPS, joint_groups

INT8_LEVEL, EXACT_LEVEL = 4, 0
# Largest int8 error a linear may take at level 4 (a tenth of the level-4 end-to-end limits
# the validator holds: one layer alone must not use them up).
INT8_TOLERANCE = 3e-2
# Largest int8-stream divergence the decoder may keep at level 4; past it the decoder runs at
# level 0 (`choose_levels`). Measured on the probe:
# SmolLM2 and Qwen2.5-0.5B pass validate at level 4 everywhere, Gemma3-270m does not
# (docs/quality.md, "Accuracy level per layer").
DIVERGENCE_BUDGET = 4e-2
# Smallest share of the probe's tokens whose argmax the output projection must keep with int8
# activations to run at level 4. Int8 noise in the head flips near-tied logits directly, and
# the decoder's own int8 noise needs room under the validator's level-4 top-1 bound (0.95) too:
# SmolLM2's head keeping 0.918 / 0.977 / 0.992 of the probe's argmaxes (0 / 8 / 16 exact
# channels) validates at top-1 0.943 / 0.951 / 0.974, the last as its head at level 0 does
# (0.977; docs/quality.md).
HEAD_TOP1 = 0.985
# Loudest input channels of the output projection kept out of its int8 input (multiplied in
# float beside the node, `quant.int8`), tried in this order until the argmax agreement reaches
# HEAD_TOP1; each channel costs the head ``vocab`` float32 weights.
EXACT_CHANNEL_COUNTS = (0, 8, 16, 32, 64)
HEAD_ROWS = 8192  # rows of the output projection read from the checkpoint at once
METRIC = ("max|int8(x t) (W/t)^T - x W^T| / max|x W^T| on the energy probe's random ids; t: the "
          "record's column scale, else the weight-only Sinkhorn t")


@dataclass
class Int8Measurement:
    """`measure_int8`'s result: each linear's int8 error and the stream's divergence."""

    errors: dict[str, float]
    divergence: float | None
    head_top1: dict[str, float] = field(default_factory=dict)  # output projection -> agreement
    # output projection -> the input channels its node would take out of the int8 input
    head_exact: dict[str, tuple[int, ...]] = field(default_factory=dict)


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


@dataclass(frozen=True)
class HeadInt8:
    """The output projection under int8 activations with ``exact_channels`` (input channels
    multiplied in float beside the node): `int8_error` and the share of probe rows whose
    argmax it keeps."""

    error: float
    top1: float
    exact_channels: tuple[int, ...] = ()


def _head_error(ckpt: Checkpoint, tensor: str, x: torch.Tensor, t: torch.Tensor | None,
                block: int, counts: Sequence[int] = EXACT_CHANNEL_COUNTS,
                top1: float = HEAD_TOP1) -> HeadInt8:
    """`HeadInt8` of ``x`` through the checkpoint tensor ``tensor`` with the fewest loudest
    channels of ``counts`` kept exact whose argmax agreement reaches ``top1`` (else the last
    count's). The first count is measured alone: a head that keeps its argmax that way is
    read once."""
    xt = x if t is None else x * t
    first = _head_int8(ckpt, tensor, xt, t, block, counts[:1])
    if first[0].top1 >= top1 or len(counts) == 1:
        return first[0]
    rest = _head_int8(ckpt, tensor, xt, t, block, counts[1:])
    return next((r for r in rest if r.top1 >= top1), rest[-1])


@torch.no_grad()
def _head_int8(ckpt: Checkpoint, tensor: str, xt: torch.Tensor, t: torch.Tensor | None,
               block: int, counts: Sequence[int]) -> list[HeadInt8]:
    """`HeadInt8` of the node input ``xt`` (carrying ``t``) through ``tensor`` over ``t``, for
    each count of loudest channels kept exact, read `HEAD_ROWS` rows at a time (the error is a max
    over output columns and an argmax a running max, so slabs combine): no ``[vocab x hidden]``
    float copy and no ``[tokens x vocab]`` logits are held."""
    from safetensors import safe_open

    exact = [loudest_channels(xt, c) for c in counts]
    xq = [int8_activations(xt, block, e) for e in exact]
    worst = [0.0] * len(xq)
    scale = 0.0
    best = [torch.full((xt.shape[0],), -torch.inf) for _ in range(len(xq) + 1)]  # float, int8s
    arg = [torch.zeros(xt.shape[0], dtype=torch.long) for _ in best]
    with safe_open(str(ckpt.shard(tensor)), framework="pt") as fh:
        sliced = fh.get_slice(tensor)
        for start in range(0, sliced.get_shape()[0], HEAD_ROWS):
            w = sliced[start:start + HEAD_ROWS].float()
            if t is not None:
                w = w / t
            ref = xt @ w.T
            scale = max(scale, float(ref.abs().max()))
            for i, xi in enumerate([None, *xq]):
                logits = ref if xi is None else xi @ w.T
                if xi is not None:
                    worst[i - 1] = max(worst[i - 1], float((logits - ref).abs().max()))
                value, index = logits.max(1)
                higher = value > best[i]
                best[i] = torch.where(higher, value, best[i])
                arg[i] = torch.where(higher, index + start, arg[i])
    return [HeadInt8(w / max(scale, 1e-30), float((arg[0] == a).float().mean()),
                     tuple(int(c) for c in e)) for w, a, e in zip(worst, arg[1:], exact)]


class Int8Observer:
    """The int8 measurement (module docstring) on the float probe stream
    (`calibration.forward.ProbeStream`): shown each block while it is loaded and still float,
    it measures the int8 error of the block's quantized linears and runs the block once more on
    the int8 stream; shown the final hidden state, it keeps the float stream's final norm (the
    output projection's input) and the divergence.

    A block shown with the records its linears were just given is measured through their t
    and block size; otherwise through ``col_scales`` (the t of linears quantized before: records
    given up front) and, for every other linear, the weight-only t of its unit.
    """

    def __init__(self, config: SinqConfig,
                 col_scales: Mapping[str, torch.Tensor | None] | None = None) -> None:
        self.config = config
        self.col_scales = dict(col_scales or {})
        self.dtype = forward_dtype(config.calibration_dtype)
        self.errors: dict[str, float] = {}
        self.divergence: float | None = None
        self.head_input: torch.Tensor | None = None  # [tokens, hidden]: the float final norm
        self._noisy: torch.Tensor | None = None

    @property
    def done(self) -> bool:
        """Whether a float pass has shown it every block."""
        return self.head_input is not None

    def start(self, hidden: torch.Tensor) -> None:
        self._noisy = hidden

    @torch.no_grad()
    def block(self, block: nn.Module, prefix: str, io: Mapping[str, LinearIO],
              kwargs: Mapping[str, Any], records: Mapping[str, QuantizedWeight] | None) -> None:
        start = prefix + "."
        hooks = []
        try:
            for unit, t, size in self._units(block, start, io, records):
                for n in unit:
                    m = block.get_submodule(n[len(start):])
                    x, out = io[n[len(start):]]
                    ref = out.float() if m.bias is None else out.float() - m.bias.float()
                    w = m.weight.float()
                    self.errors[n] = int8_error(x, w if t is None else w / t, size, t, ref)
                    hooks.append(m.register_forward_pre_hook(_int8_input(t, size)))
            self._noisy = _run(block, self._noisy, kwargs, self.dtype)
        finally:
            for h in hooks:
                h.remove()

    def _units(self, block: nn.Module, start: str, io: Mapping[str, LinearIO],
               records: Mapping[str, QuantizedWeight] | None
               ) -> list[tuple[list[str], torch.Tensor | None, int]]:
        """(linears sharing one t, that t, their node block size) of the block's quantized
        linears: from the records it was just given, else as the config will quantize them."""
        if records is not None:
            return [([n], r.col_scale, r.group_size) for n, r in records.items()]
        names = [start + n for n in io if self.config.bits_for(start + n) is not None]
        settings = {n: (self.config.bits_for(n), self.config.group_size_for(n)) for n in names}
        joint = joint_groups(names, settings, self.config.shared_col_scale)
        out = []
        for unit in joint + [[n] for n in names if not any(n in g for g in joint)]:
            t = self.col_scales[unit[0]] if unit[0] in self.col_scales else _weight_only_t(
                [block.get_submodule(n[len(start):]).weight for n in unit],
                self.config.method_config(unit[0], settings[unit[0]][0]))
            out.append((unit, t, settings[unit[0]][1]))
        return out

    @torch.no_grad()
    def finish(self, model: nn.Module, hidden: torch.Tensor) -> None:
        norm = model.model.norm
        ref, got = norm(hidden).float(), norm(self._noisy).float()
        self.divergence = float(((got - ref).norm(dim=-1)
                                 / ref.norm(dim=-1).clamp_min(1e-30)).mean())
        self.head_input = ref.reshape(-1, ref.shape[-1])
        self._noisy = None

    def measurement(self, ckpt: Checkpoint, block_sizes: Mapping[str, int],
                    sources: Mapping[str, str], col_scales: Mapping[str, torch.Tensor | None],
                    splittable: Collection[str] = ()) -> Int8Measurement:
        """The errors of the linears ``block_sizes`` (name -> its node's block size): the
        blocks' as measured, the output projection's now, from its checkpoint tensor
        ``sources[name]`` in ``ckpt`` (`_head_error`) through ``col_scales[name]`` (its record's
        t) if any, with exact channels if its node can have them (in ``splittable``)."""
        errors, head_top1, head_exact = {}, {}, {}
        for name, size in block_sizes.items():
            if name in self.errors:
                errors[name] = self.errors[name]
            elif is_head(name):
                head = _head_error(ckpt, sources[name], self.head_input, col_scales.get(name),
                                   size, EXACT_CHANNEL_COUNTS if name in splittable else (0,))
                errors[name], head_top1[name] = head.error, head.top1
                head_exact[name] = head.exact_channels
            else:
                raise ValueError(f"accuracy_level 'auto': {name} is neither in a decoder block "
                                 "nor the output projection")
        return Int8Measurement(errors, self.divergence, head_top1, head_exact)


@torch.no_grad()
def measure_int8(folder: Path, observer: Int8Observer) -> None:
    """Show ``observer`` the random-id probe (`probe_tokens`) through the float model, streamed
    one block at a time (each released once measured): for an export with no other float pass
    to ride on (no energy refit, no calibration)."""
    model, _ = load_causal_lm_streamed(folder, with_tokenizer=False)
    probe = probe_tokens(model, observer.config)
    if probe is None:
        raise ValueError(f"{folder}: accuracy_level 'auto' needs a causal LM with decoder blocks")
    input_energies(model, probe[0], [], observer.dtype, release=True, observer=observer)
    del model
    release_memory()


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
                  tolerance: float = INT8_TOLERANCE, budget: float = DIVERGENCE_BUDGET,
                  head_top1: Mapping[str, float] | None = None, top1: float = HEAD_TOP1
                  ) -> dict[str, int]:
    """Each linear's level, by shared-input group (one int8 input, one level).

    Level 0 for a group whose worst int8 error is past ``tolerance`` (NaN counts as past).
    When the stream's ``divergence`` (every decoder linear at level 4) is past ``budget``,
    every decoder linear goes to level 0. Why not only the loudest groups: on Gemma3-270m
    (divergence 5.2e-2) the 30 linears whose squared errors took the stream past the budget
    went to level 0 and validate still failed (top-1 0.924): the probe's local errors do not
    say where the stream's noise comes from (docs/quality.md). The head is not in the
    stream: its own error decides, and its ``head_top1`` (the share of probe tokens whose argmax
    int8 activations keep): level 0 below ``top1``."""
    groups = shared_input_groups(errors)
    worst = [max(errors[n] for n in g) for g in groups]
    exact = {i for i, w in enumerate(worst) if not w <= tolerance}
    exact |= {i for i, g in enumerate(groups)
              if any(not (head_top1 or {}).get(n, 1.0) >= top1 for n in g)}
    if divergence is not None and not divergence <= budget:
        exact |= {i for i, g in enumerate(groups) if not any(map(is_head, g))}
    return {n: EXACT_LEVEL if i in exact else INT8_LEVEL for i, g in enumerate(groups) for n in g}


def exact_channels(levels: Mapping[str, int], measured: Int8Measurement
                   ) -> dict[str, tuple[int, ...]]:
    """The output projections that run at level 4 with input channels kept exact, and those
    channels."""
    return {n: c for n, c in measured.head_exact.items() if c and levels.get(n) == INT8_LEVEL}


def accuracy_section(levels: Mapping[str, int], measured: Int8Measurement) -> dict:
    """The manifest's ``accuracy`` section: how the per-layer levels were chosen."""
    counts: dict[str, int] = {}
    for level in levels.values():
        counts[str(level)] = counts.get(str(level), 0) + 1
    worst = max(measured.errors.items(), key=lambda kv: kv[1], default=(None, None))
    return {"mode": "auto", "int8_tolerance": INT8_TOLERANCE, "measured": METRIC,
            "int8_stream_divergence": measured.divergence, "divergence_budget": DIVERGENCE_BUDGET,
            "layers_per_level": dict(sorted(counts.items())),
            "head_int8_top1": measured.head_top1, "head_top1_min": HEAD_TOP1,
            "head_exact_channels": exact_channels(levels, measured),
            "worst_int8_error": {"layer": worst[0], "error": worst[1]}}
