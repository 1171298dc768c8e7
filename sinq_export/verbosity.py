"""How chatty a command-line run is: ours by default, everyone's with ``--verbose``.

At default verbosity stderr carries only our own progress bars, our ``sinq_export`` log lines
(e.g. "converting X.gguf once ...") and one-line errors; the dependencies' warnings, advisory
log lines and progress bars (transformers, huggingface_hub, torch.onnx, onnxscript, onnx_ir,
mobius, onnxruntime's C++ logger) are silenced. ``--verbose`` restores them all and shows our
debug lines.

Only the CLI uses `cli_output`, around one command: importing the library changes no global
state, and everything is restored when the command returns, so a program that uses the Python
API (or calls ``cli.main`` in-process, as the tests do) keeps its own warning and logging set-up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator

# Python loggers of the dependencies that log warnings/info during a successful run.
THIRD_PARTY_LOGGERS = ("transformers", "huggingface_hub", "torch", "onnxscript", "onnx_ir", "mobius",
                       "onnx_shape_inference", "accelerate", "onnxruntime", "urllib3", "filelock")
# Read by transformers / huggingface_hub when they are imported (later in the run).
_QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}
ORT_SEVERITY_QUIET, ORT_SEVERITY_DEFAULT = 3, 2  # onnxruntime: 2 warning (its default), 3 error


def _our_handler(verbose: bool) -> logging.Handler:
    """``sinq_export.*`` log records go to stderr as bare lines (INFO; DEBUG when verbose)."""
    logger = logging.getLogger("sinq_export")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    return handler


def _set_progress_bars(transformers_on: bool, hub_on: bool) -> tuple[bool, bool]:
    """Set transformers' and huggingface_hub's own progress-bar switches; return what they were."""
    from huggingface_hub import utils as hub
    from transformers.utils import logging as hf_logging

    before = (hf_logging.is_progress_bar_enabled(), not hub.are_progress_bars_disabled())
    hf_logging.enable_progress_bar() if transformers_on else hf_logging.disable_progress_bar()
    hub.enable_progress_bars() if hub_on else hub.disable_progress_bars()
    return before


def _onnxruntime_severity(level: int) -> None:
    import onnxruntime

    onnxruntime.set_default_logger_severity(level)


@contextlib.contextmanager
def cli_output(verbose: bool = False) -> Iterator[None]:
    """Warning filters, the dependencies' log levels and progress bars for one CLI command."""
    ours = logging.getLogger("sinq_export")
    saved_env = {key: os.environ.get(key) for key in _QUIET_ENV}
    saved_levels = {name: logging.getLogger(name).level for name in THIRD_PARTY_LOGGERS}
    saved_ours = (ours.level, ours.propagate)
    with warnings.catch_warnings():
        handler = _our_handler(verbose)
        bars = None
        if verbose:
            warnings.simplefilter("default")
        else:
            for key, value in _QUIET_ENV.items():
                os.environ.setdefault(key, value)
            warnings.simplefilter("ignore")
            warnings.filterwarnings("default", module=r"sinq_export(\.|$)")  # ours stay visible
            for name in THIRD_PARTY_LOGGERS:
                logging.getLogger(name).setLevel(logging.ERROR)
            bars = _set_progress_bars(False, False)
            _onnxruntime_severity(ORT_SEVERITY_QUIET)
        try:
            yield
        finally:
            ours.removeHandler(handler)
            ours.setLevel(saved_ours[0])
            ours.propagate = saved_ours[1]
            for name, level in saved_levels.items():
                logging.getLogger(name).setLevel(level)
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            if bars is not None:
                _set_progress_bars(*bars)
                _onnxruntime_severity(ORT_SEVERITY_DEFAULT)
