"""Quiet by default: a successful CLI run writes only our own progress bars and lines to stderr;
``--verbose`` lets the dependencies' output through. The library itself changes nothing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from _models import tiny_llama_dir, write_tiny_llama_gguf

ROOT = Path(__file__).resolve().parents[1]
OUR_BARS = re.compile(r"^SINQ quantize: +\d+%")


def _cli(*args: str, **env_extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env_extra}
    for key in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS", "PYTHONWARNINGS"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "sinq_export.cli", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def _stderr_pieces(text: str) -> list[str]:
    """stderr split at the carriage returns / newlines progress bars use."""
    return [p.strip() for p in re.split(r"[\r\n]+", text) if p.strip()]


def test_default_run_writes_only_our_progress_and_verbose_shows_the_rest(tmp_path):
    src = tiny_llama_dir(tmp_path)
    quiet = _cli("quantize", str(src), "-o", str(tmp_path / "q1"), "--group-size", "32")
    assert quiet.returncode == 0, quiet.stderr
    pieces = _stderr_pieces(quiet.stderr)
    assert pieces and all(OUR_BARS.match(p) for p in pieces), pieces
    assert quiet.stdout.startswith("quantized 7 linears")

    loud = _cli("quantize", str(src), "-o", str(tmp_path / "q2"), "--group-size", "32", "--verbose")
    assert loud.returncode == 0, loud.stderr
    others = [p for p in _stderr_pieces(loud.stderr) if not OUR_BARS.match(p)]
    assert any("Loading weights" in p for p in others), others  # transformers' own bar


def test_gguf_conversion_shows_our_line_not_the_loaders_bar(tmp_path):
    gguf_path = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    proc = _cli("quantize", str(gguf_path), "-o", str(tmp_path / "q"), "--group-size", "32",
                SINQ_EXPORT_CACHE=str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr
    pieces = _stderr_pieces(proc.stderr)
    assert pieces[0].startswith("converting tiny.gguf (F32/Q4_0/Q4_1/Q8_0, 0 MB) once into "), pieces
    assert all(OUR_BARS.match(p) for p in pieces[1:]), pieces


def test_errors_stay_one_line_at_both_verbosities(tmp_path):
    for extra in ((), ("--verbose",)):
        proc = _cli("quantize", str(tmp_path / "missing"), "-o", str(tmp_path / "o"), *extra)
        assert proc.returncode == 2
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_in_process_main_restores_global_state(tmp_path):
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    from sinq_export.cli import main

    before = (list(warnings.filters), logging.getLogger("transformers").level,
              hf_logging.is_progress_bar_enabled(), os.environ.get("TRANSFORMERS_VERBOSITY"),
              list(logging.getLogger("sinq_export").handlers))
    assert main(["quantize", str(tmp_path / "missing"), "-o", str(tmp_path / "o")]) == 2
    after = (list(warnings.filters), logging.getLogger("transformers").level,
             hf_logging.is_progress_bar_enabled(), os.environ.get("TRANSFORMERS_VERBOSITY"),
             list(logging.getLogger("sinq_export").handlers))
    assert after == before


def test_importing_the_library_leaves_logging_alone():
    code = ("import logging, os, sinq_export.cli, sinq_export.gguf, sinq_export.verbosity; "
            "print(logging.getLogger('transformers').level, os.environ.get('TRANSFORMERS_VERBOSITY'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.split() == ["0", "None"], proc.stdout + proc.stderr
