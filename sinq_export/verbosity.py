"""How chatty a command-line run is: ours by default, everyone's with ``--verbose``.

At default verbosity stderr carries only our own progress bars, our ``sinq_export`` log lines
(e.g. "converting X.gguf once ...") and one-line errors; the dependencies' warnings, advisory
log lines and progress bars (transformers, huggingface_hub, torch.onnx, onnxscript, onnx_ir,
mobius, onnxruntime's C++ logger) are silenced. ``--verbose`` restores them all and shows our
debug lines.

Only the CLI calls `configure`: importing the library changes no global state, so a program
that uses the Python API keeps its own warning and logging set-up.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

# Python loggers of the dependencies that log warnings/info during a successful run.
THIRD_PARTY_LOGGERS = ("transformers", "huggingface_hub", "torch", "onnxscript", "onnx_ir", "mobius",
                       "accelerate", "onnxruntime", "urllib3", "filelock")
# Read by transformers / huggingface_hub when they are imported (later in the run).
_QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}
ORT_SEVERITY_QUIET, ORT_SEVERITY_VERBOSE = 3, 2  # onnxruntime: 2 warning, 3 error


def _our_logger(verbose: bool) -> None:
    """``sinq_export.*`` log records go to stderr as bare lines (INFO; DEBUG when verbose)."""
    logger = logging.getLogger("sinq_export")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not any(getattr(h, "_sinq_export", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._sinq_export = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.propagate = False


def _quiet_imported_libraries() -> None:
    """Libraries that keep their own verbosity switches (when installed and importable)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()
        disable_progress_bars()
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        pass


def _onnxruntime_severity(level: int) -> None:
    try:
        import onnxruntime

        onnxruntime.set_default_logger_severity(level)
    except ImportError:  # pragma: no cover - onnxruntime is a dependency
        pass


def configure(verbose: bool = False) -> None:
    """Set warning filters and the dependencies' log levels for one CLI run."""
    _our_logger(verbose)
    if verbose:
        warnings.simplefilter("default")
        _onnxruntime_severity(ORT_SEVERITY_VERBOSE)
        return
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    warnings.simplefilter("ignore")
    warnings.filterwarnings("default", module=r"sinq_export(\.|$)")  # ours stay visible
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    _quiet_imported_libraries()
    _onnxruntime_severity(ORT_SEVERITY_QUIET)
