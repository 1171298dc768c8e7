"""What the user sees while a big export runs: stage timer + peak memory, a bar over tensors.

Per-stage peak RSS: the kernel keeps one high-water mark per process (``VmHWM``). Resetting it
(``/proc/self/clear_refs``) would also lower what a parent sees through ``wait4``/``time -v``,
so we never reset it. A stage that raised the mark owns the new mark; a stage that stayed
below it gets the maximum of ``VmRSS`` sampled by a background thread while it ran.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import threading
import time
from collections.abc import Iterator, Sequence

from tqdm.auto import tqdm

from ..interrupts import raise_if_interrupted

_SAMPLE_S = 0.05


def _status_kib(field: str) -> int | None:
    """One ``kB`` field of /proc/self/status (None off Linux)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """This process' peak resident set so far (``VmHWM``; ``ru_maxrss`` off Linux)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


class _RssSampler:
    """Max ``VmRSS`` seen while the stage runs (for stages that stay under the old mark)."""

    def __init__(self) -> None:
        self.max_kib = _status_kib("VmRSS") or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(_SAMPLE_S):
            self.max_kib = max(self.max_kib, _status_kib("VmRSS") or 0)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.max_kib = max(self.max_kib, _status_kib("VmRSS") or 0)
        return self.max_kib * 1024


class Stages:
    """Times each named stage and records its peak RSS; one progress bar over the stages."""

    def __init__(self, names: Sequence[str], progress: bool = True, desc: str = "export") -> None:
        self.timings: dict[str, float] = {}
        self.peak_rss: dict[str, int] = {}
        self._progress = progress
        self._bar = tqdm(total=len(names), desc=desc, unit="stage", disable=not progress,
                         leave=False)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        raise_if_interrupted()  # not minutes more of work after a swallowed signal
        self._bar.set_postfix_str(name)
        mark_before = peak_rss_bytes()
        sampler = _RssSampler()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
            sampled = sampler.stop()
            mark_after = peak_rss_bytes()
            peak = mark_after if mark_after > mark_before else sampled
            self.peak_rss[name] = max(self.peak_rss.get(name, 0), peak)
            self._bar.update(1)

    def tensors(self, total_bytes: int, count: int, desc: str = "tensors") -> TensorBar:
        """A bar over the tensors a stage streams, in bytes (so tqdm shows bytes/s)."""
        return TensorBar(total_bytes, count, desc=desc, enabled=self._progress)

    def report(self) -> dict[str, dict[str, float]]:
        """``{"timings_s": {stage: s}, "peak_rss_mb": {stage: MiB}}`` for the summary."""
        return {
            "timings_s": {k: round(v, 2) for k, v in self.timings.items()},
            "peak_rss_mb": {k: round(v / 2**20, 1) for k, v in self.peak_rss.items()},
        }

    def close(self) -> None:
        self._bar.close()


class TensorBar:
    """Progress over streamed tensors: bytes done, bytes/s, tensors done, current name."""

    def __init__(self, total_bytes: int, count: int, desc: str = "tensors", enabled: bool = True):
        self.count = count
        self.done = 0
        self._bar = tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True,
                         unit_divisor=1024, disable=not enabled, leave=False)

    def advance(self, name: str, nbytes: int) -> None:
        """Count tensor ``name`` (``nbytes`` as stored in the checkpoint) as processed."""
        self.done += 1
        self._bar.set_postfix_str(f"{self.done}/{self.count} {name}", refresh=False)
        self._bar.update(nbytes)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> TensorBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
