"""The `sinq-export` console entry point.

It imports nothing heavy itself (`import sinq_export` is lazy), so a Ctrl-C in the seconds
that torch, transformers and onnxruntime take to import, before `cli.main` installs its
signal handling, is one line and exit 130 instead of a KeyboardInterrupt traceback.
"""

from __future__ import annotations

import os
import sys

from .heap import return_big_blocks_at_once

EXIT_SIGINT = 130  # outcome.EXIT_SIGINT, without importing it


def main() -> int:
    # torch's OpenMP threads spin at the barrier after every op; when another process holds a
    # core, each op then waits out a descheduled thread. Measured on 2 cores beside a busy
    # neighbour: 2000 small elementwise ops took 32.9 s spinning, 1.4 s sleeping ("PASSIVE"),
    # GEMMs 1.09 vs 0.83 s; on the quiet machine the small ops cost 0.41 vs 0.86 s and the
    # GEMMs the same. It must be set before torch loads its OpenMP runtime; the user's own
    # setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # torch's own switch for transparent huge pages: its buffers of 2 MB and more are aligned
    # and advised as huge pages, so a calibration forward's activations fault in 2 MB at a
    # time, not 4 KB. A 1.5B export: 259 -> 200 s wall, system time 112 -> 60 s, the same
    # peak RSS (docs/presets.md). Read when torch first allocates; the user's setting wins.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    return_big_blocks_at_once()
    try:
        from .cli import main as run_cli

        return run_cli()
    except KeyboardInterrupt:  # cli.main handles its own; this is one before it started
        print("sinq-export: interrupted by SIGINT while starting; nothing was written",
              file=sys.stderr)
        return EXIT_SIGINT


if __name__ == "__main__":
    sys.exit(main())
