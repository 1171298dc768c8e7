"""The `sinq-export` console entry point.

It imports nothing heavy itself (`import sinq_export` is lazy), so a Ctrl-C in the seconds
that torch, transformers and onnxruntime take to import, before `cli.main` installs its
signal handling, is one line and exit 130 instead of a KeyboardInterrupt traceback.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

EXIT_SIGINT = 130  # outcome.EXIT_SIGINT, without importing it
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
# below the GPTQ and Sinkhorn chunks' copies, above the per-group temporaries (a lower one
# costs page faults: Gemma3-270m exported in 156 s at 4 MB, 226 s at 1 MB, same load)
MMAP_THRESHOLD = 4 << 20


def return_big_blocks_at_once() -> None:
    """Make glibc serve every allocation of `MMAP_THRESHOLD` bytes or more with its own
    mapping, returned to the OS when freed (a no-op off glibc).

    Why: by default glibc raises that threshold (up to 32 MB) each time such a block is freed,
    so later temporaries of a few MB come from the heaps - one per thread that allocates,
    the quantizer's workers included - and the heaps keep their high-water mark. On
    Gemma3-270m the export then held 1.1 GB during the block passes and peaked at 2.10 GB
    while GPTQ swept the head; with the threshold fixed at 4 MB, 1.93 GB.
    """
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(M_MMAP_THRESHOLD,
                                                                          MMAP_THRESHOLD)
    except (OSError, AttributeError):
        pass


def main() -> int:
    # torch's OpenMP threads spin at the barrier after every op; when another process holds a
    # core, each op then waits out a descheduled thread. Measured on 2 cores beside a busy
    # neighbour: 2000 small elementwise ops took 32.9 s spinning, 1.4 s sleeping ("PASSIVE"),
    # GEMMs 1.09 vs 0.83 s; on the quiet machine the small ops cost 0.41 vs 0.86 s and the
    # GEMMs the same. It must be set before torch loads its OpenMP runtime; the user's own
    # setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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
