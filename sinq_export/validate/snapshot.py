"""Notice an export folder that another run replaced (``--overwrite``) while we read it.

`validate` and `eval` read OUT_DIR in stages (manifest, graph, tensors one at a time, then
onnxruntime opens the data file by path), so a folder swapped in between mixes two exports:
offsets of one graph into the other's data file ("external data out of bounds"), or worse, a
verdict about files that are no longer there. The folder and every file below it are
stat-ed before and after (and again when anything fails): a different inode, size or
modification time means the folder changed under us, reported as `FolderChanged` (exit 2:
run again) instead of whatever error or verdict the mixed read produced.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from .providers import ValidationError

F = TypeVar("F", bound=Callable[..., Any])


class FolderChanged(ValidationError):
    """The export folder was replaced or modified while it was being read."""


def folder_state(folder: Path) -> tuple | None:
    """(device and inode of the folder, then relative path, inode, size, mtime of every entry
    below it, sub-folders such as ``onnx/`` included); None when there is no such folder (the
    reader itself says so)."""
    try:
        top = os.stat(folder)
        entries = list(_entries(folder, ""))
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (top.st_dev, top.st_ino, *sorted(entries))


def _entries(folder: Path, prefix: str) -> Iterator[tuple[str, int, int, int]]:
    with os.scandir(folder) as it:
        for entry in it:
            st = entry.stat(follow_symlinks=False)
            name = prefix + entry.name
            yield name, st.st_ino, st.st_size, st.st_mtime_ns
            if entry.is_dir(follow_symlinks=False):
                yield from _entries(Path(entry.path), name + "/")


def _changed(folder: Path, before: tuple | None) -> FolderChanged | None:
    if before is None or folder_state(folder) == before:
        return None
    return FolderChanged(f"{folder} changed while it was being read (replaced or modified by "
                         "another run, e.g. --overwrite); no verdict: run again once it is done")


def while_unchanged(read: F) -> F:
    """Decorate ``read(out_dir, ...)``: `FolderChanged` if OUT_DIR changed during the call,
    whether the call failed or returned."""

    @functools.wraps(read)
    def wrapper(out_dir: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        folder = Path(out_dir)
        before = folder_state(folder)
        try:
            result = read(out_dir, *args, **kwargs)
        except Exception as exc:
            changed = _changed(folder, before)
            if changed is not None:
                raise changed from exc
            raise
        changed = _changed(folder, before)
        if changed is not None:
            raise changed
        return result

    return wrapper  # type: ignore[return-value]
