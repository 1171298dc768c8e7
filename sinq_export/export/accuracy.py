"""``accuracy_level="auto"``: each MatMulNBits node's accuracy level chosen by measurement.

onnxruntime's int8 activations (accuracy level 4) make 4-bit decode ~4x faster per call but
quantize each block of ``block_size`` inputs to int8 with one absmax scale (`quant.int8`): on
a model whose activations have loud channels (Gemma's ``sqrt(hidden)``-scaled embeddings and
large norm weights) the quiet channels of a block lose their bits. So every quantized linear's
int8 error is measured where its float input exists anyway, on the energy probe's random ids
(`quant.calibrate.input_energies`), through the weight the node will multiply by and with the
input scaled by the ``t`` the quantizer gives it (`Int8Meter`): the relative output error
``max|x_int8 W^T - x W^T| / max|x W^T|``, the validator's layer metric. Linears that read the
same tensor (q/k/v, gate/up) see the same int8 input, so they get one level: 4 when the worst
of them stays within `INT8_TOLERANCE`, else 0 (exact fp32 compute; on the CPU EP levels 1-3
compute in fp32 too). The head is measured without ``t`` (a calibrated head's t comes from the
calibration text, after the probe), reading its weight from the checkpoint a slab of rows at a
time, so no step holds a ``[vocab x hidden]`` float copy.

The chosen level, the measured error and the tolerance are recorded per layer in the manifest,
and `validate` holds each layer to the tolerance of the level its node runs at.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

from ..checkpoint import Checkpoint
from ..config import SinqConfig, is_head
from ..quant.calibrate import LayerStats
from ..quant.core import weight_only_col_scale
from ..quant.int8 import int8_activations, int8_error

INT8_LEVEL, EXACT_LEVEL = 4, 0
# Largest int8 error (`quant.int8.int8_error` on the probe) a linear may take at level 4.
# Measured on the probe (docs/quality.md, "Accuracy level per layer"): SmolLM2's and
# Qwen2.5-0.5B's linears sit at 1e-3-2e-2 and their all-int8 exports pass validate; Gemma3-270m
# has linears far past it, and its all-int8 export fails validate (top-1 0.932).
INT8_TOLERANCE = 3e-2
# Largest int8-stream divergence (`Int8Meter.final`) the decoder may keep at level 4 whole;
# past it the loudest linears go to level 0 until the rest fits (`choose_levels`).
DIVERGENCE_BUDGET = 4e-2
HEAD_ROWS = 8192  # rows of the output projection read at once for its measurement
PROBE_NOTE = ("max|x_int8 W^T - x W^T| / max|x W^T| on the energy probe's random ids, x scaled "
              "by the quantizer's weight-only t (none for the head)")


class Int8Meter:
    """Collects every quantized linear's int8 error during the energy probe (an
    `quant.calibrate.InputMeter`). The quantizer tells it what it quantizes (`prepare`)."""

    def __init__(self) -> None:
        self.config = SinqConfig()
        self.units: list[tuple[str, ...]] = []
        self.bits: dict[str, int] = {}
        self.names: set[str] = set()
        self.errors: dict[str, float] = {}
        self.head_inputs: dict[str, torch.Tensor] = {}
        self.noisy: torch.Tensor | None = None  # the probe's hidden state with int8 inputs
        self.divergence: float | None = None

    def prepare(self, config: SinqConfig, units: Iterable[Iterable[str]],
                bits: Mapping[str, int]) -> None:
        """``units``: the quantization units (a joint unit shares one t, computed on its
        row-concatenation as the quantizer does); ``bits``: each linear's width (its group
        size, hence its int8 block, comes from ``config``)."""
        self.config = config
        self.units = [tuple(u) for u in units]
        self.bits = dict(bits)
        self.names = {n for u in self.units for n in u}

    def block(self, prefix: str, block: torch.nn.Module, inputs: dict[str, torch.Tensor],
              energies: dict[str, LayerStats], hidden: torch.Tensor,
              run: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Each linear's int8 error on its float input; then the block runs once more on the
        int8 stream (every linear's input through int8, as at level 4), which carries on to
        the next block: at the end its distance from the float stream is `divergence`."""
        hooks = []
        for unit in self.units:
            rel = [n[len(prefix):] for n in unit if n.startswith(prefix)]
            if len(rel) != len(unit):
                continue
            weights = [block.get_submodule(n).weight.detach().float() for n in rel]
            method = self.config.method_config(unit[0], self.bits[unit[0]])
            stats = energies.get(rel[0])
            t = weight_only_col_scale(torch.cat(weights), method,
                                      None if stats is None else stats.diag())
            for name, r, w in zip(unit, rel, weights):
                self.errors[name] = int8_error(inputs[r], w if t is None else w / t,
                                               method.group_size, t)
                hooks.append(block.get_submodule(r).register_forward_pre_hook(
                    _int8_input(t, method.group_size)))
        try:
            self.noisy = run(hidden if self.noisy is None else self.noisy)
        finally:
            for h in hooks:
                h.remove()

    def final(self, norm: torch.nn.Module, hidden: torch.Tensor) -> None:
        """`divergence`: mean over the probe's tokens of ``|h_int8 - h| / |h|`` at the final
        norm's output (what the head reads)."""
        if self.noisy is None:
            return
        with torch.no_grad():
            ref, got = norm(hidden).float(), norm(self.noisy).float()
        self.divergence = float(((got - ref).norm(dim=-1)
                                 / ref.norm(dim=-1).clamp_min(1e-30)).mean())
        self.noisy = None

    def head(self, name: str, x: torch.Tensor) -> None:
        self.head_inputs[name] = x.detach().reshape(-1, x.shape[-1]).float().clone()

    def measure_heads(self, ckpt: Checkpoint, sources: Mapping[str, str]) -> None:
        """The output projection's error from its checkpoint weight (``sources``: linear ->
        tensor name), a slab of `HEAD_ROWS` rows at a time."""
        for name, x in self.head_inputs.items():
            block = self.config.group_size_for(name)
            self.errors[name] = _error_by_rows(ckpt, sources[name], x, block)
        self.head_inputs.clear()

    def missing(self) -> list[str]:
        return sorted(self.names - set(self.errors))


def _int8_input(t: torch.Tensor | None, block: int):  # noqa: ANN202
    """A forward pre-hook giving a linear what a level-4 node computes with: its input scaled
    by ``t``, through int8 blocks, scaled back (the node's weight carries ``1 / t``)."""
    def hook(_module, args):  # noqa: ANN001, ANN202
        x = args[0]
        xt = x.float() if t is None else x.float() * t
        q = int8_activations(xt, block)
        return ((q if t is None else q / t).to(x.dtype), *args[1:])
    return hook


@torch.no_grad()
def _error_by_rows(ckpt: Checkpoint, tensor: str, x: torch.Tensor, block: int) -> float:
    """`int8_error` of ``x`` through the checkpoint tensor ``tensor``, reading it in row slabs
    (the metric is a max over output columns, so slabs combine by max)."""
    from safetensors import safe_open

    xq = int8_activations(x, block)
    worst, scale = 0.0, 0.0
    with safe_open(str(ckpt.shard(tensor)), framework="pt") as fh:
        sliced = fh.get_slice(tensor)
        rows = sliced.get_shape()[0]
        for start in range(0, rows, HEAD_ROWS):
            w = sliced[start:start + HEAD_ROWS].float()
            ref = x @ w.T
            worst = max(worst, float((xq @ w.T - ref).abs().max()))
            scale = max(scale, float(ref.abs().max()))
    return worst / max(scale, 1e-30)


def shared_input_groups(names: Iterable[str]) -> list[list[str]]:
    """Linears that read one tensor, so one int8 quantization of it: q/k/v (Phi3's fused
    qkv_proj alone), gate/up; every other linear alone."""
    from ..nn import SHARED_INPUT_GROUPS

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

    Level 0 for a group whose worst int8 error is past ``tolerance`` (a NaN counts as past
    it). Then, when the int8 stream's ``divergence`` (`Int8Meter.final`, the decoder's
    linears all at level 4) is past ``budget``, the remaining decoder groups are kept at
    level 4 quietest first while their summed squared errors fit the budget's share
    ``(budget / divergence)^2`` of the total (independent errors add in squares along the
    stream), and the louder ones go to level 0. The head is not in the stream."""
    groups = shared_input_groups(errors)
    worst = [max(errors[n] for n in g) for g in groups]
    exact = {i for i, w in enumerate(worst) if not w <= tolerance}
    if divergence is not None and divergence > budget:
        stream = [i for i, g in enumerate(groups) if i not in exact and not any(map(is_head, g))]
        energy = {i: sum(errors[n] ** 2 for n in groups[i]) for i in stream}
        allowed = sum(energy.values()) * (budget / divergence) ** 2
        kept = 0.0
        for i in sorted(stream, key=lambda i: worst[i]):
            if kept + energy[i] <= allowed:
                kept += energy[i]
            else:
                exact.add(i)
    return {n: EXACT_LEVEL if i in exact else INT8_LEVEL for i, g in enumerate(groups) for n in g}


def accuracy_section(levels: Mapping[str, int], errors: Mapping[str, float],
                     divergence: float | None) -> dict:
    """The manifest's ``accuracy`` section: how the per-layer levels were chosen."""
    counts: dict[str, int] = {}
    for level in levels.values():
        counts[str(level)] = counts.get(str(level), 0) + 1
    worst = max(errors.items(), key=lambda kv: kv[1], default=(None, None))
    return {"mode": "auto", "int8_tolerance": INT8_TOLERANCE, "measured": PROBE_NOTE,
            "int8_stream_divergence": divergence, "divergence_budget": DIVERGENCE_BUDGET,
            "layers_per_level": dict(sorted(counts.items())),
            "worst_int8_error": {"layer": worst[0], "error": worst[1]}}
