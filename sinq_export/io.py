"""Output folders that never lose a user's data, and the errors the CLI maps to exit codes.

Why this module exists: a crash, Ctrl-C, SIGTERM or a full disk mid-write must never leave a
folder that looks like a finished result, and ``--overwrite`` must never delete anything
but an earlier result of ours. Everything is written into a temp folder next to the target
(same filesystem, so the final step is a rename). The temp folder is ``flock``-ed while its
run is alive, so a later run can tell a folder left by a killed run (lock free: deleted)
from one a concurrent run is still writing (locked: left alone).

Error classes (the exit codes are decided in `sinq_export.cli`):

* `OutputExistsError` / `UnsafeOutputError`: the output path is refused (bad usage, exit 2);
* `OutputError`: the OS refused a write on the output side (exit 3); its message names the
  path and the errno, e.g. ``... [ENOSPC] No space left on device``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .interrupts import raise_if_interrupted

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX: no stale-folder detection, no swap lock
    fcntl = None

# errnos that can only mean "the output side cannot take the bytes", whatever path they name
OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})
_PARTIAL_TAGS = ("tmp", "old", "scratch")
# Partial folders this process holds (their flock is ours): nothing else writes into them, and
# a nested output (e.g. ``reference/`` inside an export's temp folder) must not lock them again.
_HELD: set[Path] = set()


class OutputExistsError(FileExistsError):
    """The output folder exists and overwriting was not asked for."""


class UnsafeOutputError(ValueError):
    """``--overwrite`` was asked for a path that is not recognisably an earlier result of ours."""


class OutputError(OSError):
    """The OS refused to write the output (permission, read-only FS, disk full, parent a file)."""

    def __init__(self, path: str | os.PathLike | None, err: int | None, reason: str) -> None:
        super().__init__(err, reason, None if path is None else str(path))
        self.path = None if path is None else str(path)

    def __str__(self) -> str:
        code = errno.errorcode.get(self.errno, str(self.errno)) if self.errno else "?"
        where = self.path if self.path is not None else "the output folder"
        return f"cannot write {where}: [{code}] {self.strerror}"


def output_error(exc: BaseException, fallback_path: str | os.PathLike | None) -> OutputError | None:
    """The `OutputError` an exception stands for, or None when it is no OS error at all.

    Libraries that write files (safetensors, onnx) wrap the OS error in their own exception
    type; the errno is then recovered from the chained cause or from the message text.
    """
    if isinstance(exc, OutputError):
        return exc
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno:
            return OutputError(e.filename or fallback_path, e.errno, e.strerror or str(e))
    text = str(exc)
    if isinstance(exc, OSError) and _NO_ROOM.search(text):
        return OutputError(fallback_path, errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({text})")
    if isinstance(exc, OSError) and _SHORT_WRITE.search(text):
        code = _short_write_errno(fallback_path)
        return OutputError(fallback_path, code, f"{os.strerror(code)} (short write: {text})")
    for code in OUTPUT_ERRNOS:
        if os.strerror(code) in text or f"os error {code})" in text or f"code: {code}," in text:
            return OutputError(fallback_path, code, os.strerror(code))
    return None


# numpy's ``tofile`` reports a refused write this way, without the errno; its "not enough
# free space" is raised only when fallocate(2) failed with ENOSPC.
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")
_NO_ROOM = re.compile(r"Not enough free space to write \d+ bytes")


def _short_write_errno(path: str | os.PathLike | None) -> int:
    """Best reconstruction of the errno a short write lost: a file-size limit, a full disk."""
    try:
        import resource

        if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
            return errno.EFBIG
    except (ImportError, OSError, ValueError):
        pass
    probe = Path(path) if path is not None else Path.cwd()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        if shutil.disk_usage(probe).free < (1 << 20):
            return errno.ENOSPC
    except OSError:
        pass
    return errno.EIO


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


@dataclass(frozen=True)
class Marker:
    """How a folder proves it is our output: a JSON file holding an object with these keys.

    Its writer names the file and keys (`sinq_export.export.manifest` for ``model``,
    `sinq_export.nn` for ``quantize``), so the contract stays with the format it guards.
    """

    file: str
    keys: tuple[str, ...]

    def matches(self, folder: Path) -> bool:
        try:
            data = json.loads((folder / self.file).read_text())
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and all(k in data for k in self.keys)


def check_output(
    target: str | os.PathLike,
    *,
    overwrite: bool,
    marker: Marker | None,
    protect: Iterable[str | os.PathLike] = (),
) -> Path:
    """Refuse an output path before any work is done; return it absolute.

    Refused: a path that exists without ``overwrite``; with ``overwrite``, anything but an
    empty folder or a folder ``marker`` recognises; always, an input folder in ``protect``
    or any parent of one (symlinks resolved, so ``-o link-to-model`` is caught too).
    """
    target = Path(target).expanduser().absolute()
    real = target.resolve()
    for p in protect:
        src = Path(p).expanduser().resolve()
        if real == src or real in src.parents:
            what = "the input folder" if real == src else f"a parent of the input folder {src}"
            raise UnsafeOutputError(f"output folder {target} is {what}; choose another -o")
    # A target that vanished or was replaced while it was inspected is being swapped by another
    # run (moved aside, then replaced): what was seen is no refusal, so look again; a refusal
    # counts only when the same folder was there before and after the inspection.
    for _ in range(_SWAP_RETRIES):
        before = _identity(target)
        if before is None:
            check_parents(target)
            return target
        problem = _refusal(target, overwrite, marker)
        if problem is None:
            return target
        if _identity(target) == before:
            raise problem
    raise problem


_SWAP_RETRIES = 20  # inspections of a target that other runs keep swapping (`check_output`)


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of ``path`` itself, None when it does not exist."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _refusal(target: Path, overwrite: bool, marker: Marker | None) -> Exception | None:
    """Why an existing ``target`` may not be replaced, or None."""
    if not overwrite:
        return OutputExistsError(f"output folder {target} already exists (pass --overwrite)")
    if target.is_symlink() or not target.is_dir():
        return UnsafeOutputError(f"{target} exists and is not a folder; refusing to overwrite it")
    if not _is_empty(target) and not (marker is not None and marker.matches(target)):
        hint = f"no {marker.file} of ours" if marker else "not written by this command"
        return UnsafeOutputError(
            f"refusing to overwrite {target}: not an earlier sinq-export output ({hint}); "
            "remove it yourself or choose another -o"
        )
    return None


def check_parents(target: Path) -> None:
    """A parent that is a file can never hold the output: say so now, not after the work."""
    for parent in target.parents:
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise OutputError(parent, errno.ENOTDIR, "a parent of the output is a file")
            return


def _is_empty(folder: Path) -> bool:
    try:
        with os.scandir(folder) as it:
            return next(it, None) is None
    except FileNotFoundError:  # swapped away meanwhile: `check_output` looks again
        return False


@contextlib.contextmanager
def atomic_output_dir(
    target: str | os.PathLike,
    overwrite: bool = False,
    *,
    marker: Marker | None = None,
    protect: Iterable[str | os.PathLike] = (),
) -> Iterator[Path]:
    """Yield a fresh temp dir; on success it replaces ``target``, on any error it is deleted.

    The checks of `check_output` run on entry and again, under a lock on the parent folder,
    right before the swap (another run may have written ``target`` meanwhile). The swap moves
    an old target aside under a unique name, renames the new folder in, then deletes the old
    one, so a reader sees the old or the new result, never a mix. OS errors on the way become
    `OutputError` naming the path.
    """
    protect = tuple(protect)
    target = check_output(target, overwrite=overwrite, marker=marker, protect=protect)
    parent = target.parent
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(_new_partial(parent, target.name, "tmp"))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the result is a normal folder
        with _as_output_error(tmp, shown_as=target):
            yield tmp
        raise_if_interrupted()  # a signal whose exception a finalizer swallowed
        with _as_output_error(parent, anywhere=True), _locked(parent):
            check_output(target, overwrite=overwrite, marker=marker, protect=protect)
            _swap_in(tmp, target)


def _swap_in(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an old target goes aside first and is deleted after."""
    if not os.path.lexists(target):
        os.replace(new, target)
        return
    with _partial_dir(target.parent, target.name, "old") as aside:
        os.replace(target, aside)  # rename(2) may replace an empty folder
        try:
            os.replace(new, target)
        except BaseException:
            os.replace(aside, target)
            raise


@contextlib.contextmanager
def scratch_dir(near: str | os.PathLike) -> Iterator[Path]:
    """A temp folder next to ``near`` for intermediate files, deleted on exit (any exit).

    Named and locked like the output's temp folder, so one left by a killed run is found and
    removed by the next run writing ``near``.
    """
    near = Path(near).expanduser().absolute()
    with _new_partial(near.parent, near.name, "scratch") as tmp:
        yield tmp


@contextlib.contextmanager
def _new_partial(parent: Path, name: str, tag: str) -> Iterator[Path]:
    """Create ``parent`` if needed, delete partial folders of dead runs, yield a new one.
    On an error or a signal the parents created here are removed again (when still empty).

    The stale scan and the new folder's creation + lock happen under the parent's lock, so
    a scan never takes a folder that was created but not yet locked.
    """
    created = _missing_folders(parent)
    finished = False
    try:
        with contextlib.ExitStack() as stack:
            with _as_output_error(parent, anywhere=True):
                parent.mkdir(parents=True, exist_ok=True)
                with _locked(parent):
                    remove_stale_partials(parent, name)
                    path = stack.enter_context(_partial_dir(parent, name, tag))
            yield path
        finished = True
    finally:
        if not finished:
            _remove_empty(created)


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not os.path.lexists(folder) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Remove the parents a failed run created for its output, deepest first; rmdir(2) only
    removes an empty folder, so whatever someone else put there meanwhile stays."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            return


def remove_stale_partials(parent: Path, name: str) -> list[Path]:
    """Delete ``.NAME.{tmp,old,scratch}-*`` folders whose run is gone (their lock is free)."""
    removed = []
    if fcntl is None:
        return removed
    for tag in _PARTIAL_TAGS:
        for path in parent.glob(f".{name}.{tag}-*"):
            if path.is_dir() and not path.is_symlink() and _try_lock(path):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


@contextlib.contextmanager
def _partial_dir(parent: Path, name: str, tag: str) -> Iterator[Path]:
    """mkdtemp ``.NAME.TAG-XXXX`` in ``parent``, flock-ed while alive, removed on exit."""
    try:
        path = Path(tempfile.mkdtemp(prefix=f".{name}.{tag}-", dir=parent))
    except OSError as exc:  # it names the random temp name; the user needs the folder
        raise OutputError(parent, exc.errno, exc.strerror or str(exc)) from exc
    fd = os.open(path, os.O_RDONLY)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        _HELD.add(path)
        yield path
    finally:
        _HELD.discard(path)
        try:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)


def _try_lock(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing releases the lock; rmtree follows at once


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Exclusive flock on a folder: serialises the check-and-swap of runs writing into it.

    Not taken on a partial folder of our own (`_HELD`): its flock is already ours, and a second
    flock through another descriptor would wait for ourselves.
    """
    if fcntl is None or folder in _HELD:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _as_output_error(
    path: Path, anywhere: bool = False, shown_as: Path | None = None
) -> Iterator[None]:
    """Re-raise OS errors (also those wrapped by writer libraries) as `OutputError`.

    ``anywhere``: the block touches only output paths, so every OS error is the output's.
    ``shown_as``: name paths under ``path`` (a temp folder) as under the final output.
    """
    try:
        yield
    except (OutputError, OutputExistsError, UnsafeOutputError):
        raise
    except Exception as exc:
        err = output_error(exc, path)
        if err is None or not (anywhere or _on_output_side(err, path, exc)):
            raise
        raise _renamed(err, path, shown_as) from exc


def _renamed(err: OutputError, path: Path, shown_as: Path | None) -> OutputError:
    if shown_as is None:
        return err
    named = Path(err.path).absolute() if err.path else path
    if named != path and path not in named.parents:
        return err
    return OutputError(shown_as / named.relative_to(path), err.errno, err.strerror)


def _on_output_side(err: OutputError, path: Path, exc: BaseException) -> bool:
    """An OS error belongs to the output when it names a path under ``path`` (or names none
    and can only be an output error, e.g. ENOSPC), so unreadable *inputs* keep their error."""
    if err.errno in OUTPUT_ERRNOS:
        return True
    named = next((e.filename for e in _chain(exc) if isinstance(e, OSError) and e.filename), None)
    if named is None:
        return False
    named_path = Path(os.fsdecode(named)).absolute()
    return named_path == path or path in named_path.parents


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Deterministic JSON (sorted keys, fixed indent) so reruns are byte-identical."""
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())
