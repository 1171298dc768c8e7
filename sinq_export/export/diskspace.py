"""Refuse an export up front when the target file system cannot hold it.

A 7B export writes gigabytes after minutes of quantization; finding a full disk at the end
wastes the run. The size is estimated from the checkpoint's tensor shapes (the config only
tells the shapes of the linears the architecture has; the checkpoint has all of them, biases
and norms included) and the quantization settings, using the packed layout of `quant.packing`.
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Callable
from pathlib import Path

from ..checkpoint import Checkpoint
from ..config import SinqConfig
from ..quant import packing

# Headroom for the graph protobuf, manifest, genai_config and tokenizer files.
_FIXED_OVERHEAD = 16 << 20
_MARGIN = 1.02


def quantized_tensor_bytes(shape: tuple[int, ...], bits: int, group_size: int, float_bytes: int) -> int:
    """Bytes of one [N, K] linear stored as packed codes + scales + packed zero points + t."""
    n, k = shape
    blocks = packing.n_blocks(k, group_size)
    codes = n * blocks * packing.packed_block_bytes(group_size, bits)
    zeros = n * packing.packed_zero_point_bytes(blocks, bits)
    return codes + zeros + n * blocks * float_bytes + k * float_bytes


def linear_bits(config: SinqConfig) -> Callable[[str, tuple[int, ...]], int | None]:
    """The default tensor -> bits rule: 2-D ``*.weight`` of a module `SinqConfig` quantizes.

    Embedding tables are 2-D too but are not linears; a graph route that quantizes them
    passes its own rule.
    """

    def bits(name: str, shape: tuple[int, ...]) -> int | None:
        if len(shape) != 2 or not name.endswith(".weight") or "embed" in name:
            return None
        return config.bits_for(name[: -len(".weight")])

    return bits


def estimate_output_bytes(
    ckpt: Checkpoint,
    bits_for: Callable[[str, tuple[int, ...]], int | None],
    group_size: int,
    *,
    runtime: str = "stock",
    float_bytes: int = 4,
) -> int:
    """Upper estimate of OUT_DIR's size: quantized linears packed, every other tensor float.

    ``runtime="stock"`` stores 3/5/6/7-bit codes in 4/8-bit containers, as the graph does.
    """
    total = _FIXED_OVERHEAD
    for name in ckpt.names():
        shape = ckpt.shape(name)
        bits = bits_for(name, shape)
        if bits is None:
            numel = 1
            for dim in shape:
                numel *= dim
            total += numel * float_bytes
            continue
        stored = bits if runtime == "custom" else packing.container_bits(bits)
        total += quantized_tensor_bytes(shape, stored, group_size, float_bytes)
    return int(total * _MARGIN)


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_free_space(target: str | Path, needed: int) -> None:
    """Raise ``OSError(ENOSPC)`` naming ``target`` when its file system has < ``needed`` free.

    The export's temp folder sits next to ``target`` (same file system), and with
    ``--overwrite`` the old folder stays until the final rename, so all of ``needed`` must be
    free at once. An OSError on the output side is reported by the CLI as one line (exit 3).
    """
    target = Path(target)
    free = shutil.disk_usage(_existing_ancestor(target)).free
    if free < needed:
        raise OSError(
            errno.ENOSPC,
            f"not enough free disk space for the export: needs ~{needed / 2**30:.2f} GiB, "
            f"the file system has {free / 2**30:.2f} GiB free",
            str(target),
        )
