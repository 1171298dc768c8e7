"""How a command ends: the exit-code policy (docs/exit-codes.md) and signals as exceptions.

Every error becomes one exit code and one line: bad input 2, an output that cannot be written 3,
a bug 4 (with its traceback). SIGINT and SIGTERM raise `Interrupted`, so that every ``finally``
and context manager runs (temp folders are removed) before the process exits with 130 / 143.
"""

from __future__ import annotations

import contextlib
import errno
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .calibration.forward import NonFiniteActivations
from .config import ConfigError
from .folders import ModelLoadError
from .interrupts import RECEIVED, on_signal, raise_if_interrupted
from .io import OUTPUT_ERRNOS, OutputError, OutputExistsError, UnsafeOutputError, output_error
from .quant.core import QuantizationError
from .runtime_ops import RuntimeOpsUnavailable

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_OUTPUT, EXIT_INTERNAL = 0, 1, 2, 3, 4
EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM  # 130, 143, as shells do

T = TypeVar("T")

EXIT_CODES_HELP = """\
exit codes (model, quantize, validate, eval):
  0    success
  1    the numbers disagree (validate: parity past tolerance) and nothing else
  2    bad usage or bad input: flags, a missing/damaged/unsupported model or export folder,
       an output folder that exists (without --overwrite) or is not ours to replace
  3    the output cannot be written: permission denied, read-only file system, disk full or
       file too large, a parent path that is a file (the line names the path and the errno)
  4    internal error (a bug: the traceback is printed; please report it)
  130  interrupted by SIGINT (Ctrl-C)
  143  interrupted by SIGTERM (kill, timeout, a CI cancel)
       on 130/143 the partial output and temp folders are removed; an earlier output stays
"""


class UsageError(ValueError):
    """Bad input that no other check names: a flag value, a path that cannot be a file."""


def usage_errors() -> tuple[type[BaseException], ...]:
    """The errors that mean bad input (exit 2): each message names the path or flag and the
    problem."""
    # lazy for start-up time: the export imports onnx, the validator its dozen modules
    from .export.graph import ExportError
    from .validate.providers import ValidationError

    return (UsageError, ConfigError, QuantizationError, OutputExistsError, UnsafeOutputError,
            ModelLoadError, FileNotFoundError, RuntimeOpsUnavailable, NonFiniteActivations,
            ExportError, ValidationError)


@contextlib.contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """SIGINT/SIGTERM -> `Interrupted`; SIGXFSZ ignored so a ``ulimit -f`` is an EFBIG error.

    Installed only in the main thread (Python delivers signals there); restored on exit.
    """
    wanted = {signal.SIGINT: on_signal, signal.SIGTERM: on_signal}
    if hasattr(signal, "SIGXFSZ"):
        wanted[signal.SIGXFSZ] = signal.SIG_IGN
    old = {}
    try:
        for s, handler in wanted.items():
            old[s] = signal.signal(s, handler)
    except ValueError:  # not the main thread: leave the process's handlers alone
        pass
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        RECEIVED.clear()  # the record is this command's


def run_interruptible(run: Callable[[], T]) -> T:
    """``run()``, with an error that surfaces after a signal re-raised as the `Interrupted`.

    The handler's exception can be turned into another on its way up: raised inside a C
    extension's call (numpy's ``tofile`` under onnx_ir's writer), it comes out as that
    extension's own error (a TypeError).
    """
    RECEIVED.clear()
    try:
        return run()
    except Exception:
        raise_if_interrupted()
        raise


def interrupted_exit(exc: KeyboardInterrupt) -> tuple[int, str]:
    """Exit code and signal name of an interruption (a plain KeyboardInterrupt is a SIGINT)."""
    signum = getattr(exc, "signum", signal.SIGINT)
    return (EXIT_SIGTERM if signum == signal.SIGTERM else EXIT_SIGINT), signal.Signals(signum).name


@dataclass(frozen=True)
class Failure:
    """What an error ends a command with."""

    code: int
    message: str
    internal: bool = False  # a bug: the traceback is printed too


def failure(exc: Exception, outputs: Sequence[Path]) -> Failure:
    """The exit code and line for ``exc``; ``outputs``: the paths the command writes (an OS
    error under one of them is an output error, any other one an unreadable input)."""
    if isinstance(exc, OutputError):
        return Failure(EXIT_OUTPUT, str(exc))
    if isinstance(exc, usage_errors()):
        return Failure(EXIT_USAGE, str(exc))
    err = _output_side_error(exc, outputs)
    if err is not None:
        return Failure(EXIT_OUTPUT, str(err))
    if isinstance(exc, OSError):
        code = errno.errorcode.get(exc.errno or 0, "?")
        return Failure(EXIT_USAGE, f"cannot read {exc.filename or 'the input'}: [{code}] "
                                   f"{exc.strerror or exc}")
    return Failure(EXIT_INTERNAL, f"internal error ({type(exc).__name__}: {exc}); please report it",
                   internal=True)


def run_command(prog: str, run: Callable[[], int], outputs: Callable[[], Sequence[Path]]) -> int:
    """Run one command (``prog``: its name in messages) inside `signals_as_exceptions`; every
    outcome is an exit code, an error or interruption also one line on stderr. ``outputs``:
    the paths the command writes (see `failure`)."""
    try:
        return run_interruptible(run)
    except KeyboardInterrupt as exc:
        code, name = interrupted_exit(exc)
        print(f"{prog}: interrupted by {name}; partial output removed", file=sys.stderr)
        return code
    except Exception as exc:
        end = failure(exc, outputs())
        if end.internal:
            traceback.print_exc()
        # one line, whatever the message (library texts span lines)
        print(f"{prog}: error: {' '.join(end.message.split())}", file=sys.stderr)
        return end.code


def validation_exit(status: str, providers: Sequence[str]) -> Failure:
    """How `validate` ends for its report's ``status``: 0 every provider that ran passed, 1 a
    parity failure, 2 (with a line) none of the requested ``providers`` was available."""
    if status == "skipped":
        return Failure(EXIT_USAGE, f"none of the requested providers is available "
                                   f"({', '.join(providers)}); nothing was validated")
    return Failure(EXIT_OK if status == "passed" else EXIT_FAILED, "")


def _output_side_error(exc: BaseException, outputs: Sequence[Path]) -> OutputError | None:
    """The `OutputError` for an OS error on the output side of this command, else None."""
    err = output_error(exc, outputs[0] if outputs else None)
    if err is None:
        return None
    if err.errno in OUTPUT_ERRNOS:
        return err
    named = Path(err.path).absolute() if err.path else None
    if named is not None and any(named == p or p in named.parents or named in p.parents
                                 for p in outputs):
        return err
    return None
