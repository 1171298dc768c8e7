"""Independent pieces of tensor work on a pool of single-threaded workers.

Why not torch's own intra-op threads for the quantizer: it is a long sequence of small and
medium tensor ops (per-column GPTQ steps, per-group range searches, Sinkhorn mat-vecs), and
torch's OpenMP threads meet at a barrier after every op. When another process holds one of
the cores, every barrier waits for a descheduled thread: one GPTQ chunk of a 1.5B model's
head (10,922 x 1536) took 41.9 s with torch's 2 threads beside a busy neighbour, 3.3 s with
one. Whole pieces of work (row chunks, tile chunks) on workers that each run torch with one
thread need no barrier: they keep every core busy on a quiet machine and slow down only by the
share of the machine they lose on a busy one.

The pieces must be independent (each reads its inputs, returns its own result); results come
back in order, so the output is the same bytes whatever the number of workers.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

_inside = threading.local()  # set on a worker thread: a nested map runs in place


def worker_count() -> int:
    """Workers for `ordered_map`: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch's CPU ops with ``n`` intra-op threads inside the block."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _run(fn: Callable[[T], R], item: T) -> R:
    _inside.active = True
    try:
        return fn(item)
    finally:
        _inside.active = False


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None
                ) -> Iterator[R]:
    """``fn(item)`` for every item, in order, computed on ``workers`` threads that each run
    torch single-threaded (`worker_count` by default).

    At most ``2 x workers`` items are in flight or waiting to be taken, so memory holds a few
    pieces' results, not all of them. Called from inside a worker it runs in place (no nested
    pools). A piece's exception is raised where its result is taken.
    """
    workers = worker_count() if workers is None else workers
    if workers <= 1 or getattr(_inside, "active", False):
        yield from map(fn, items)
        return
    with torch_threads(1), ThreadPoolExecutor(workers) as pool:
        pending: deque[Future[R]] = deque()
        for item in items:
            pending.append(pool.submit(_run, fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
