"""`workers.ordered_map`: results in order whatever the workers, bounded look-ahead, nested
maps in place, a piece's error where its result is taken, torch's threads restored."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sinq_export import workers
from sinq_export.quant import core, gptq, make_config, sinkhorn
from sinq_export.quant.stats import LayerStats


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 40), n_workers=st.integers(1, 4))
def test_results_come_back_in_order(n, n_workers):
    def slow_square(i: int) -> int:
        time.sleep(0.001 * ((7 * i) % 3))  # finish out of order
        return i * i

    assert list(workers.ordered_map(slow_square, range(n), n_workers)) == [i * i for i in range(n)]


def test_look_ahead_is_bounded():
    """A slow consumer holds at most 2 x workers pieces taken from the input."""
    taken = []

    def items():
        for i in range(50):
            taken.append(i)
            yield i

    got = []
    for i, r in enumerate(workers.ordered_map(lambda x: x + 1, items(), 2)):
        assert len(taken) <= i + 1 + 2 * 2
        got.append(r)
    assert got == list(range(1, 51))


def test_torch_runs_single_threaded_on_workers_and_is_restored():
    before = torch.get_num_threads()
    seen = list(workers.ordered_map(lambda _: torch.get_num_threads(), range(6), 2))
    assert seen == [1] * 6
    assert torch.get_num_threads() == before


def test_a_nested_map_runs_in_place():
    def inner(i: int) -> tuple[int, str, set[str]]:
        names = {threading.current_thread().name
                 for _ in workers.ordered_map(lambda x: x, range(3), 2)}
        return i, threading.current_thread().name, names

    for _, outer_name, inner_names in workers.ordered_map(inner, range(4), 2):
        assert inner_names == {outer_name}  # no pool of its own


def test_a_pieces_error_is_raised_and_threads_restored():
    before = torch.get_num_threads()

    def boom(i: int) -> int:
        if i == 3:
            raise ValueError("piece 3")
        return i

    out = []
    with pytest.raises(ValueError, match="piece 3"):
        for r in workers.ordered_map(boom, range(8), 2):
            out.append(r)
    assert out == [0, 1, 2]
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("n_workers", [2, 3])
def test_the_quantizer_gives_the_same_bytes_on_one_worker_or_several(n_workers, monkeypatch):
    """Row chunks (rounding, GPTQ) and tile chunks (Sinkhorn) on workers: the results do not
    depend on how many there are."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(700, 96, generator=gen) * torch.exp(torch.randn(96, generator=gen))
    t = torch.exp(0.3 * torch.randn(96, generator=gen))
    stats = LayerStats(96)
    stats.add(torch.randn(300, 96, generator=gen))
    cfg = make_config("sinq", bits=4, group_size=32, scale_refit=2, scale_search=True)
    monkeypatch.setattr(core, "ROW_CHUNK_BYTES", 96 * 4 * 64)  # 11 row chunks

    def run() -> list[torch.Tensor]:
        rounded = core.record(core.rounded_chunks(w, t, stats.diag(), cfg), (700, 96), t, 4, 32)
        swept = core.record(gptq.gptq_chunks(w, t, stats.hessian(), cfg,
                                             chunk_bytes=96 * 4 * 64), (700, 96), t, 4, 32)
        tiles = sinkhorn.sinkhorn_scales(w.reshape(700, 3, 32).permute(1, 0, 2), 16,
                                         chunk_bytes=700 * 32 * 4)  # a tile per chunk
        return [rounded.packed, rounded.scales, swept.packed, swept.scales, tiles.row,
                tiles.col, tiles.imbalance]

    monkeypatch.setattr(workers, "worker_count", lambda: 1)
    one = run()
    monkeypatch.setattr(workers, "worker_count", lambda: n_workers)
    for a, b in zip(one, run()):
        assert torch.equal(a, b)
