"""Stdlib-only machine facts shared by the bench scripts (also run from other venvs)."""

from __future__ import annotations

import platform
from pathlib import Path


def peak_rss_kb() -> int:
    """VmHWM of this process. (ru_maxrss is not used: Linux carries the parent's high-water
    mark across fork + exec, so a worker started from a 1.5 GB orchestrator would report that.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return -1


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
