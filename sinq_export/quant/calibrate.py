"""Calibration for SINQ: input statistics per linear, A-SINQ's activation-aware ``t``, and a
block-by-block driver that never needs more than one decoder block's weights at a time.

Statistics (`LayerStats`): ``H = E[x x^T]`` ``[K, K]`` and ``E|x|`` ``[K]`` of a linear's input,
accumulated over calibration tokens by a forward hook.

A-SINQ (`activation_aware_scale`): AWQ's observation (arXiv 2306.00978) is that scaling a weight
column up by ``s_k`` before quantization (and the activation down by ``1/s_k``) cuts the
relative error of the channels that carry large activations. Here that factor folds into SINQ's
column scale: ``t <- t / s`` with ``s = E|x|^alpha`` (geometric-mean normalised), ``alpha``
searched on a grid by the layer's output error ``tr((W - W_hat) H (W - W_hat)^T)``. ``alpha = 0``
(plain SINQ) is on the grid, so the search never does worse on the calibration data. The graph
already multiplies activations by ``t``, so the search costs nothing at run time.

Block by block (`calibrate_block`, driven by `nn.quantize_model`): capture the inputs of the
first decoder block for the calibration windows, then per block: hook its linears, run the
float block (statistics), quantize its linears, run the quantized block to get the next
block's inputs (so each block is calibrated on what the quantized model will actually feed
it). On a model from `models.load_causal_lm_streamed` each block is loaded from the checkpoint
just before it is calibrated and holds only records afterwards, so one float block and the
``[windows, length, hidden]`` activations are what persists between blocks.

Forward precision (`forward_dtype`): the block forwards are the calibration's one
compute-bound part (SmolLM2's head calibration: 30 blocks over 4096 tokens). Where the CPU
multiplies bfloat16 natively (AVX512-BF16, AMX) they run under bfloat16 autocast, 2.5x faster
per matmul than float32; the hidden states passed between blocks stay float32 and every
statistic accumulates in float32, so only the rounding of each block's own matmuls changes.
Measured on SmolLM2 (docs/quality.md): the same perplexity within the calibration's own spread.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from .methods import MethodConfig
from .rtn import MIN_SCALE

ALPHA_GRID = (0.0, 0.15, 0.3, 0.45, 0.6)
SEARCH_ROWS = 128  # rows (evenly strided) that score each alpha: the cost is N_rows * K^2
# Calibration windows start here: far past every evaluation window (the protocol scores the
# first n x 512 tokens; 64 windows would end at token 32768), so the two never overlap.
CALIBRATION_OFFSET = 65536
# Default window count (`default_window_count`): at least MIN_WINDOWS, and enough tokens for
# TOKENS_PER_INPUT x the widest calibrated linear's K, rounded up to a power of two windows.
MIN_WINDOWS, MAX_WINDOWS, TOKENS_PER_INPUT = 8, 64, 1.5


@dataclass
class LayerStats:
    """Running ``sum x x^T`` (or only its diagonal), ``sum |x|`` and count of one linear's
    input rows.

    ``full=False`` keeps only the diagonal, the input energies ``E[x^2]`` that the
    calibration-free scale refit weighs by: ``K`` numbers instead of ``K x K`` and no matmul
    per token (A-SINQ and GPTQ need the full matrix).
    """

    k: int
    full: bool = True
    xtx: torch.Tensor = field(init=False)
    sq_sum: torch.Tensor = field(init=False)
    abs_sum: torch.Tensor = field(init=False)
    count: int = 0

    def __post_init__(self) -> None:
        self.xtx = torch.zeros(self.k, self.k) if self.full else torch.zeros(0)
        self.sq_sum = torch.zeros(self.k)
        self.abs_sum = torch.zeros(self.k)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.k).float()
        if self.full:
            self.xtx.addmm_(x.T, x)
        else:
            self.sq_sum += x.square().sum(0)
        self.abs_sum += x.abs().sum(0)
        self.count += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if not self.full:
            raise ValueError("these statistics keep only E[x^2] (LayerStats(full=False))")
        return self.xtx / max(self.count, 1)

    def diag(self) -> torch.Tensor:
        sq = self.xtx.diagonal() if self.full else self.sq_sum
        return sq / max(self.count, 1)

    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.count, 1)


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """``tr((W - W_hat) H (W - W_hat)^T)``: the layer's mean squared output error."""
    e = w - w_hat
    return float(((e @ h) * e).sum())


def activation_aware_scale(w: torch.Tensor, t: torch.Tensor | None, stats: LayerStats,
                           config: MethodConfig, grid: Sequence[float] = ALPHA_GRID
                           ) -> torch.Tensor:
    """A-SINQ: ``t / s`` with ``s = E|x|^alpha`` for the alpha of least output error."""
    from .core import quantize_with_scale

    base = torch.ones(w.shape[1]) if t is None else t
    act = stats.abs_mean().clamp_min(1e-6)
    h = stats.hessian()
    w = w[:: max(1, w.shape[0] // SEARCH_ROWS)]  # group parameters are per row: exact subset
    plain = type(config)(**{**config.__dict__, "gptq": False}) if hasattr(config, "gptq") \
        else config
    best, best_err = base, float("inf")
    for alpha in grid:
        s = act.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        cand = (base / s).clamp_min(MIN_SCALE)
        err = output_error(w, quantize_with_scale(w, cand, plain, stats).dequantize(), h)
        if err < best_err:
            best, best_err = cand, err
    return best


# ------------------------------------------------------------------------------ windows


def default_window_count(max_k: int, length: int = 512) -> int:
    """Calibration windows for linears of up to ``max_k`` inputs.

    Why it grows with K: GPTQ inverts the ``K x K`` input Hessian, which fewer than K tokens
    leave rank deficient, so GPTQ then fits the calibration text. Measured on Qwen2.5-0.5B
    (down_proj K = 4864): 8 windows (4096 tokens) 39.55, 16 windows 38.99, calibration-free
    39.27; SmolLM2 (K <= 1536) is covered by the 8-window minimum.
    """
    need = math.ceil(TOKENS_PER_INPUT * max_k / length)
    return min(MAX_WINDOWS, max(MIN_WINDOWS, 1 << max(0, (need - 1).bit_length())))


def calibration_windows(tokenizer, n_windows: int = 16, length: int = 512,  # noqa: ANN001
                        text: str = "wikipedia", offset: int = CALIBRATION_OFFSET
                        ) -> tuple[torch.Tensor, dict[str, Any]]:
    """``[n_windows, length]`` calibration tokens and the manifest record that describes them."""
    from ..data import leading_token_ids, load_text

    stop = offset + n_windows * length
    ids = leading_token_ids(tokenizer, load_text(text), stop)
    if len(ids) < stop:
        raise ValueError(f"text {text!r} has {len(ids)} tokens; calibration needs {stop}")
    win = torch.tensor(ids[offset:stop], dtype=torch.long).reshape(n_windows, length)
    info = {"text": text, "token_range": [offset, stop], "n_windows": n_windows,
            "length": length, "tokens": n_windows * length,
            "disjoint_from": "evaluation windows (the first n x length tokens, n <= 64)"}
    return win, info


PROBE_SEED = 0


def probe_window(vocab_size: int, n_tokens: int, seed: int = PROBE_SEED
                 ) -> tuple[torch.Tensor, dict[str, Any]]:
    """``[1, n_tokens]`` uniformly random token ids, and the manifest record that says so.

    Why random ids are enough for the calibration-free scale refit: it only needs each
    linear's input energies ``E[x^2]``, and which channels are loud is a property of the model
    (its norms, its massive activations), not of the text. Measured on SmolLM2: energies from
    256 random ids and from 256 Wikipedia tokens give 4-bit 26.2-26.5 vs 25.8, 3-bit 42.6-43.1
    vs 41.2 (docs/quality.md). A fixed seed keeps exports reproducible.
    """
    ids = torch.randint(0, vocab_size, (1, n_tokens), generator=torch.Generator().manual_seed(seed))
    return ids, {"tokens": n_tokens, "seed": seed, "ids": "uniform random token ids (no text)",
                 "use": "input energies of the scale refit (SinqConfig.energy_refit)"}


# ------------------------------------------------------------------------------ blocks


class _Captured(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(model: nn.Module, windows: torch.Tensor
                         ) -> tuple[torch.Tensor, dict[str, Any]]:
    """(hidden states entering block 0, the keyword arguments every block is called with)."""
    from ..models import decoder_blocks

    first = decoder_blocks(model)[0]
    seen: dict[str, Any] = {}

    def hook(_mod, args, kwargs):  # noqa: ANN001, ANN202
        seen["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        seen["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Captured

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids=windows, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    return seen["hidden"], seen["kwargs"]


def native_bf16() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (AVX512-BF16 or AMX tiles)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def forward_dtype(name: str) -> torch.dtype:
    """The calibration forwards' dtype for a config's ``calibration_dtype``.

    ``"auto"`` is bfloat16 only with native instructions: emulated bfloat16 is slower than
    float32, and the precision is then not worth giving up.
    """
    if name == "auto":
        return torch.bfloat16 if native_bf16() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


@contextlib.contextmanager
def forward_precision(dtype: torch.dtype) -> Iterator[None]:
    """Run the enclosed forwards with their matmuls in ``dtype`` (autocast; float32: as is)."""
    if dtype == torch.float32:
        yield
        return
    with torch.autocast("cpu", dtype=dtype):
        yield


def _block_output(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any],
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    with forward_precision(dtype):
        out = block(hidden, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    return out.float()  # the residual stream between blocks stays float32


@torch.no_grad()
def collect_stats(module: nn.Module, names: Iterable[str], run: Callable[[], Any],
                  full: bool = True, inputs: dict[str, torch.Tensor] | None = None
                  ) -> tuple[dict[str, LayerStats], Any]:
    """Input statistics of ``module``'s linears ``names`` while ``run()`` executes
    (``full=False``: the input energies only, see `LayerStats`); ``inputs``, when given, also
    receives each linear's input tensor itself.

    Linears that read the very same tensor (q/k/v, gate/up) share one `LayerStats`, so its
    ``K x K`` product is accumulated once per input instead of once per linear.
    """
    stats: dict[str, LayerStats] = {}
    # (data_ptr, shape) -> (the input, its stats); holding the input keeps its memory from
    # being reused by a later tensor during ``run()``, so a key never aliases two inputs.
    by_input: dict[tuple[int, tuple[int, ...]], tuple[torch.Tensor, LayerStats]] = {}

    def hook(name: str, x: torch.Tensor) -> None:
        key = (x.data_ptr(), tuple(x.shape))
        if key not in by_input:
            by_input[key] = (x, LayerStats(x.shape[-1], full))
            by_input[key][1].add(x)
        stats[name] = by_input[key][1]
        if inputs is not None:
            inputs[name] = x

    handles = [module.get_submodule(n).register_forward_hook(
        lambda _m, inp, _o, n=n: hook(n, inp[0])) for n in names]
    try:
        result = run()
    finally:
        for h in handles:
            h.remove()
    return stats, result


@torch.no_grad()
def calibrate_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any],
                    quantize_unit: Callable[[nn.Module, dict[str, LayerStats] | None], None],
                    names: Sequence[str], with_stats: bool = True,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Calibrate and quantize one block in place; return the next block's input.

    ``quantize_unit(block, stats)`` replaces ``block``'s linears ``names`` by quantized ones
    using their input statistics (what `nn.quantize_model` and a streaming export provide).
    ``with_stats=False`` (only the head is calibrated): the block is quantized without
    statistics and only run to produce the next block's input. ``dtype``: the forwards'
    matmul precision (`forward_dtype`).
    """
    stats = None
    if with_stats:
        stats, _ = collect_stats(block, names,
                                 lambda: _block_output(block, hidden, kwargs, dtype))
    quantize_unit(block, stats)
    return _block_output(block, hidden, kwargs, dtype)


class InputMeter(Protocol):
    """Something measured on each linear's input during the energy probe (`input_energies`):
    the error int8 activations add (`export.accuracy.Int8Meter`)."""

    names: set[str]  # the linears it wants to see

    def block(self, prefix: str, block: nn.Module, inputs: dict[str, torch.Tensor],
              energies: dict[str, LayerStats], hidden: torch.Tensor,
              run: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """One decoder block ran on ``hidden``: ``inputs`` and ``energies`` of its linears
        (names relative to ``prefix``), while its float weights are loaded; ``run(h)`` runs
        the block again on another input."""

    def head(self, name: str, x: torch.Tensor) -> None:
        """The output projection's input (the final norm's output)."""

    def final(self, norm: nn.Module, hidden: torch.Tensor) -> None:
        """The last block's output ``hidden`` and the final norm, after every block ran."""


@torch.no_grad()
def input_energies(model: nn.Module, windows: torch.Tensor, names: Iterable[str],
                   dtype: torch.dtype = torch.float32, release: bool = False,
                   drop_table: bool = False, meter: InputMeter | None = None
                   ) -> dict[str, LayerStats]:
    """``E[x^2]`` of the input of each linear ``names`` over ``windows``, block by block
    through the *float* model (`LayerStats(full=False)`), the output projection's from the
    final norm of the last block's output.

    Why the float model's: the energies only say which channels are loud, one forward per
    block is enough, nothing is quantized in between, so the export can measure them first
    and still quantize tensor by tensor afterwards; and they did better at 3 bits than the
    quantized model's on SmolLM2 (42.6 vs 45.4, docs/quality.md). ``release``: drop each
    streamed block's tensors once measured (`models.release_block`: one float block at a
    time; it reloads when it runs again). ``drop_table``: the model is not run again, so its
    embedding table goes to the meta device once the blocks' first input is taken.
    ``meter``: also shown every linear it names, block by block (`InputMeter`).
    """
    from ..models import decoder_blocks, ensure_loaded, release_block

    names = list(names)
    prefix = {id(m): n for n, m in model.named_modules()}
    hidden, kwargs = capture_block_inputs(model, windows)
    if drop_table:
        model.get_input_embeddings().to("meta")
    energies: dict[str, LayerStats] = {}
    for block in decoder_blocks(model):
        ensure_loaded(block)
        start = prefix[id(block)] + "."
        mine = [n[len(start):] for n in names if n.startswith(start)]
        metered = [n[len(start):] for n in sorted(meter.names) if n.startswith(start)] \
            if meter is not None else []
        seen: dict[str, torch.Tensor] = {}
        block_input = hidden
        stats, hidden = collect_stats(
            block, list(dict.fromkeys(mine + metered)),
            lambda h=hidden, b=block: _block_output(b, h, kwargs, dtype), full=False, inputs=seen)
        energies.update({start + n: st for n, st in stats.items() if n in mine})
        if metered:
            meter.block(start, block, {n: seen[n] for n in metered},
                        {n: stats[n] for n in metered}, block_input,
                        lambda h, b=block: _block_output(b, h, kwargs, dtype))
        del seen
        if release:
            release_block(block)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    norm = getattr(getattr(model, "model", None), "norm", None)
    if meter is not None and norm is not None:
        meter.final(norm, hidden)
    if norm is None or head is None:
        return energies
    head_name = next((n for n, m in model.named_modules() if m is head), None)
    for name in names:
        if name == head_name:
            energies[name] = LayerStats(head.in_features, full=False)
            energies[name].add(norm(hidden))
    if meter is not None and head_name in meter.names:
        meter.head(head_name, norm(hidden))
    return energies
