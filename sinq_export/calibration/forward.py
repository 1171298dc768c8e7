"""Running the float model for statistics, one decoder block at a time.

Block by block (`calibrate_block`, driven by `quantize.quantize_model`): capture the inputs of
the first decoder block for the calibration windows, then per block: hook its linears, run
the float block (statistics), quantize its linears, run the quantized block to get the next
block's inputs (so each block is calibrated on what the quantized model will actually feed
it). On a model from `models.load_causal_lm_streamed` each block is loaded from the checkpoint
just before it is calibrated and holds only records afterwards, so one float block and the
``[windows, length, hidden]`` activations are what persists between blocks.

Forward precision (`forward_dtype`): the block forwards are the calibration's one
compute-bound part. Where the CPU multiplies bfloat16 natively (AVX512-BF16, AMX) they run
under bfloat16 autocast, 2.5x faster per matmul than float32; the hidden states passed
between blocks stay float32 and every statistic accumulates in float32, so only the rounding
of each block's own matmuls changes (the same perplexity within the calibration's own
spread, docs/quality.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from ..heap import return_free_heap
from ..models import decoder_blocks, ensure_loaded, head_and_final_norm, release_block
from ..quant.record import QuantizedWeight
from ..quant.stats import LayerStats


class _Captured(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(model: nn.Module, windows: torch.Tensor
                         ) -> tuple[torch.Tensor, dict[str, Any]]:
    """(hidden states entering block 0, the keyword arguments every block is called with)."""
    first = decoder_blocks(model)[0]
    seen: dict[str, Any] = {}

    def hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
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


# Windows run through a block together: at most this many bytes of its widest activation
# ([tokens, intermediate] for an MLP), so a block's temporaries are bounded by a chunk, not by
# the calibration set (a 7B block over 4096 tokens would hold ~1 GB of MLP activations).
CHUNK_BYTES = 64 << 20


def windows_per_chunk(block: nn.Module, n_windows: int, length: int) -> int:
    """How many of ``n_windows`` windows of ``length`` tokens one forward of ``block`` takes
    (`CHUNK_BYTES` of its widest activation)."""
    widest = max((max(m.in_features, m.out_features) for m in block.modules()
                  if hasattr(m, "in_features") and hasattr(m, "out_features")), default=1)
    return max(1, min(n_windows, CHUNK_BYTES // (length * widest * 4)))


def _rows(value: Any, rows: slice, batch: int) -> Any:
    """``value`` (a block keyword argument) cut to the windows ``rows`` where it has one entry
    per window; tensors that broadcast over the windows (batch 1) are passed as they are."""
    if isinstance(value, torch.Tensor):
        return value[rows] if value.dim() and value.shape[0] == batch and batch > 1 else value
    if isinstance(value, tuple):
        return tuple(_rows(v, rows, batch) for v in value)
    return value


class NonFiniteActivations(ValueError):
    """A forward produced NaN/Inf activations (the message names the block)."""


def check_finite(out: torch.Tensor, where: str) -> None:
    """Refuse NaN/Inf activations at once: the statistics and every later block would be
    poisoned, and the export would be written from them."""
    if not bool(torch.isfinite(out).all()):
        bad = int((~torch.isfinite(out)).sum())
        raise NonFiniteActivations(f"{where}: {bad} NaN/Inf activation(s) in its calibration "
                                   "forward (overflow in the model's float range?)")


def _block_output(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any],
                  dtype: torch.dtype = torch.float32, where: str = "decoder block"
                  ) -> torch.Tensor:
    """The block's output for every window, computed a chunk of windows at a time."""
    batch = hidden.shape[0]
    step = windows_per_chunk(block, batch, hidden.shape[1]) if hidden.dim() == 3 else batch
    outs = []
    for start in range(0, batch, step):
        rows = slice(start, start + step)
        part = {k: _rows(v, rows, batch) for k, v in kwargs.items()}
        with forward_precision(dtype):
            out = block(hidden[rows], **part)
        out = (out[0] if isinstance(out, tuple) else out).float()  # float32 between blocks
        check_finite(out, where)
        outs.append(out)
    return outs[0] if len(outs) == 1 else torch.cat(outs)


@torch.no_grad()
def collect_stats(module: nn.Module, names: Iterable[str], run: Callable[[], Any],
                  full: bool = True) -> tuple[dict[str, LayerStats], Any]:
    """Input statistics of ``module``'s linears ``names`` while ``run()`` executes
    (``full=False``: the input energies only, see `LayerStats`).

    Linears that read the very same tensor (q/k/v, gate/up) share one `LayerStats`, so its
    ``K x K`` product is accumulated once per input instead of once per linear.
    """
    stats: dict[str, LayerStats] = {}
    # (data_ptr, shape) -> (the input, the linear whose stats it feeds) within one forward of
    # ``module``; holding the input keeps its memory from being reused by a later tensor of
    # that forward, so a key never aliases two inputs. A forward run in chunks calls
    # ``module`` once per chunk: the map is cleared then, so only one chunk's inputs are held.
    by_input: dict[tuple[int, tuple[int, ...]], tuple[torch.Tensor, str]] = {}

    def hook(name: str, x: torch.Tensor) -> None:
        key = (x.data_ptr(), tuple(x.shape))
        if key in by_input:
            stats[name] = stats[by_input[key][1]]
            return
        by_input[key] = (x, name)
        if name not in stats:
            stats[name] = LayerStats(x.shape[-1], full)
        stats[name].add(x)

    handles = [module.get_submodule(n).register_forward_hook(
        lambda _m, inp, _o, n=n: hook(n, inp[0])) for n in names]
    handles.append(module.register_forward_pre_hook(lambda *_: by_input.clear()))
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
                    dtype: torch.dtype = torch.float32, where: str = "decoder block"
                    ) -> torch.Tensor:
    """Calibrate and quantize one block in place; return the next block's input.

    ``quantize_unit(block, stats)`` replaces ``block``'s linears ``names`` by quantized ones
    using their input statistics (what `nn.quantize_model` and a streaming export provide).
    ``with_stats=False`` (only the head is calibrated): the block is quantized without
    statistics and only run to produce the next block's input. ``dtype``: the forwards'
    matmul precision (`forward_dtype`); ``where``: the block's name, for errors.
    """
    stats = None
    if with_stats:
        stats, _ = collect_stats(block, names,
                                 lambda: _block_output(block, hidden, kwargs, dtype, where))
    quantize_unit(block, stats)
    return _block_output(block, hidden, kwargs, dtype, f"{where} (quantized)")


# A linear's (input, output) in one forward, as its forward hook sees them.
LinearIO = tuple[torch.Tensor, torch.Tensor]


class BlockObserver(Protocol):
    """What `ProbeStream` shows a per-block measurement (e.g. `export.accuracy.Int8Observer`)
    while the float blocks are loaded: the stream's first hidden state, each block's linears'
    probe inputs and outputs, then the final float hidden state."""

    def start(self, hidden: torch.Tensor) -> None: ...

    def block(self, block: nn.Module, prefix: str, io: Mapping[str, LinearIO],
              kwargs: Mapping[str, Any], records: Mapping[str, QuantizedWeight] | None
              ) -> None: ...

    def finish(self, model: nn.Module, hidden: torch.Tensor) -> None: ...


class ProbeStream:
    """The random-id probe run through the *float* model one block at a time, beside whatever
    else runs the blocks (a calibration loop, or nothing: `input_energies`).

    Each block must still be float when it `advance`s: the stream measures the input energies
    of the block's linears and, for an ``observer``, keeps their inputs and outputs until
    `observe` hands them over (with the records the block was given, if quantized since), so
    that one pass over the checkpoint serves the energy refit and the accuracy measurement.

    Why the float model's energies: they only say which channels are loud, one forward per
    block is enough, and nothing quantized has to run first; they did better at 3 bits than the
    quantized model's on SmolLM2 (42.6 vs 45.4, docs/quality.md).
    """

    def __init__(self, model: nn.Module, windows: torch.Tensor, dtype: torch.dtype = torch.float32,
                 observer: BlockObserver | None = None) -> None:
        self.hidden, self.kwargs = capture_block_inputs(model, windows)
        self.dtype = dtype
        self.observer = observer
        self._io: dict[str, LinearIO] = {}
        if observer is not None:
            observer.start(self.hidden)

    def advance(self, block: nn.Module, prefix: str, names: Iterable[str]) -> dict[str, LayerStats]:
        """Run the float ``block`` (named ``prefix``) on the stream; return ``E[x^2]`` of the
        input of each of its linears ``names`` (relative to the block, `LayerStats(full=False)`)."""
        names = list(names)
        def keep(name: str, args: tuple, out: torch.Tensor) -> None:
            self._io[name] = (args[0], out)

        hooks = [] if self.observer is None else [
            m.register_forward_hook(lambda _m, args, out, n=n: keep(n, args, out))
            for n, m in block.named_modules() if isinstance(m, nn.Linear)]
        try:
            stats, self.hidden = collect_stats(
                block, names,
                lambda h=self.hidden: _block_output(block, h, self.kwargs, self.dtype, prefix),
                full=False)
        finally:
            for h in hooks:
                h.remove()
        return stats

    def observe(self, block: nn.Module, prefix: str,
                records: Mapping[str, QuantizedWeight] | None = None) -> None:
        """Hand the last `advance`'s linear inputs and outputs to the observer, with the records
        the block's linears were given since, if any (``block`` still float)."""
        io, self._io = self._io, {}
        if self.observer is not None:
            self.observer.block(block, prefix, io, self.kwargs, records)

    def head_energies(self, model: nn.Module, names: Iterable[str]) -> dict[str, LayerStats]:
        """The output projection's input energies (the final norm of the stream), if in ``names``."""
        head, norm = head_and_final_norm(model)
        out = {}
        for name in names:
            if norm is not None and head is not None and model.get_submodule(name) is head:
                out[name] = LayerStats(head.in_features, full=False)
                out[name].add(norm(self.hidden))
        return out

    def finish(self, model: nn.Module) -> None:
        """Tell the observer the stream is through the last block."""
        if self.observer is not None:
            self.observer.finish(model, self.hidden)


@torch.no_grad()
def input_energies(model: nn.Module, windows: torch.Tensor, names: Iterable[str],
                   dtype: torch.dtype = torch.float32, release: bool = False,
                   observer: BlockObserver | None = None) -> dict[str, LayerStats]:
    """``E[x^2]`` of the input of each linear ``names`` over ``windows``, block by block
    through the float model (`ProbeStream`), the output projection's from the final norm of
    the last block's output. ``release``: drop each streamed block's tensors once measured
    (`models.release_block`: one float block at a time; it reloads when it runs again).
    ``observer``: also shown every block (`ProbeStream.observe`, without records).
    """
    names = list(names)
    prefix = {id(m): n for n, m in model.named_modules()}
    stream = ProbeStream(model, windows, dtype, observer)
    energies: dict[str, LayerStats] = {}
    for block in decoder_blocks(model):
        ensure_loaded(block)
        start = prefix[id(block)] + "."
        mine = [n[len(start):] for n in names if n.startswith(start)]
        stats = stream.advance(block, start[:-1], mine)
        energies.update({start + n: st for n, st in stats.items()})
        stream.observe(block, start[:-1])
        if release:
            release_block(block)
        return_free_heap()
    energies.update(stream.head_energies(model, names))
    stream.finish(model)
    return energies
