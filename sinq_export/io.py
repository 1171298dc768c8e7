"""Atomic output folders: everything is written to a temp dir and renamed into place at the end.

Why: a crash, Ctrl-C or a full disk mid-write must never leave a folder that looks like a
finished export. The temp dir lives next to the target (same filesystem) so the final step is
a rename.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class OutputExistsError(FileExistsError):
    """The output folder exists and overwriting was not asked for."""


@contextlib.contextmanager
def atomic_output_dir(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temp dir; on success it replaces ``target``, on any error it is deleted."""
    target = Path(target).absolute()
    if target.exists() and not overwrite:
        raise OutputExistsError(f"output folder {target} already exists (pass --overwrite)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the result is a normal folder
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Deterministic JSON (sorted keys, fixed indent) so reruns are byte-identical."""
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())
