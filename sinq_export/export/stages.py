"""Stage timer + one progress bar over the export stages (quantization has its own bar)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence

from tqdm.auto import tqdm


class Stages:
    def __init__(self, names: Sequence[str], progress: bool = True, desc: str = "export") -> None:
        self.timings: dict[str, float] = {}
        self._bar = tqdm(total=len(names), desc=desc, unit="stage", disable=not progress,
                         leave=False)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._bar.set_postfix_str(name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
            self._bar.update(1)

    def close(self) -> None:
        self._bar.close()
