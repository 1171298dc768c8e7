"""How the process's heap gives memory back to the OS (glibc; each call is a no-op elsewhere).

Imports nothing heavy: the console sets the mmap threshold before torch loads.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
# below the GPTQ and Sinkhorn chunks' copies, above the per-group temporaries (a lower one
# costs page faults: Gemma3-270m exported in 156 s at 4 MB, 226 s at 1 MB, same load)
MMAP_THRESHOLD = 4 << 20


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def return_big_blocks_at_once() -> None:
    """Make glibc serve every allocation of `MMAP_THRESHOLD` bytes or more with its own
    mapping, returned to the OS when freed.

    Why: by default glibc raises that threshold (up to 32 MB) each time such a block is freed,
    so later temporaries of a few MB come from the heaps - one per thread that allocates,
    the quantizer's workers included - and the heaps keep their high-water mark. On
    Gemma3-270m the export then held 1.1 GB during the block passes and peaked at 2.10 GB
    while GPTQ swept the head; with the threshold fixed at 4 MB, 1.93 GB.
    """
    try:
        _libc().mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):
        pass


def return_free_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim``).

    Why after every block of a pass: glibc keeps the heap that a block's tensors under its
    mmap threshold freed, and the next block allocates in other holes, so the process grows by
    a block's worth of dead heap per pass. On the Qwen2.5-1.5B shape the calibration held
    0.9-1.1 GB between blocks without the trim and 0.56 GB with it, and the export's peak
    went from 3.2-3.6 GB to 2.3 GB; a trim costs milliseconds.
    """
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass
