"""The export folder as the runtimes load it: ``genai_config.json`` and every file it names.

The validator's own sessions register the installed package's custom-op library and open
``model.onnx`` directly, so they would pass a folder that onnxruntime-genai cannot load (its
``custom_ops_library`` missing, damaged or outside the folder, its decoder file gone). These
checks open the folder the way genai does: every file genai_config.json names must be inside
the folder and exist, a custom-op library must load into this onnxruntime, and when
onnxruntime-genai is installed, ``og.Model(folder)`` itself must succeed. The loading happens
in a child process, so a library that crashes the loader fails the check, not the validator.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .graph import ExportInfo
from .providers import CUSTOM_DOMAIN, ValidationError

GENAI_CONFIG = "genai_config.json"


def check_loadable(info: ExportInfo) -> None:
    """`ValidationError` (one line naming the file) unless the runtimes can load the folder."""
    if info.kind != "causal-lm":
        return  # a module export has no genai_config.json: only onnxruntime loads it
    decoder = _decoder_section(info.out_dir)
    _inside(info.out_dir, decoder.get("filename"), "model.decoder.filename")
    name = (decoder.get("session_options") or {}).get("custom_ops_library")
    library = _inside(info.out_dir, name, "custom_ops_library") if name else None
    if library is None and CUSTOM_DOMAIN in info.custom_domains:
        raise ValidationError(f"{info.out_dir / GENAI_CONFIG}: the graph uses {CUSTOM_DOMAIN} "
                              "ops but names no custom_ops_library: onnxruntime-genai cannot "
                              "load it")
    _load_in_child(info.out_dir, library)


def _decoder_section(folder: Path) -> dict[str, Any]:
    path = folder / GENAI_CONFIG
    if not path.is_file():
        raise ValidationError(f"{folder}: {GENAI_CONFIG} is missing: onnxruntime-genai cannot "
                              "load the export")
    try:
        decoder = json.loads(path.read_text())["model"]["decoder"]
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValidationError(f"{path}: cannot parse ({exc})") from exc
    except (KeyError, TypeError) as exc:
        raise ValidationError(f"{path}: no model.decoder section") from exc
    if not isinstance(decoder, dict):
        raise ValidationError(f"{path}: model.decoder is not an object")
    return decoder


def _inside(folder: Path, name: object, field: str) -> Path:
    """The file genai_config.json names, which genai only reads from inside the folder."""
    if not isinstance(name, str) or not name:
        raise ValidationError(f"{folder / GENAI_CONFIG}: {field} is missing or not a file name")
    path = (folder / name).resolve()
    if Path(name).is_absolute() or not path.is_relative_to(folder.resolve()):
        raise ValidationError(f"{folder / GENAI_CONFIG}: {field} {name!r} is outside the export "
                              "folder (onnxruntime-genai only loads files inside it)")
    if not path.is_file():
        raise ValidationError(f"{folder / name}: missing ({field} of {GENAI_CONFIG})")
    return path


# Run in a child process: dlopen of a damaged library can kill the process (a truncated ELF
# maps pages past the end of the file: SIGBUS), and a library's own initialisers run on load.
# The child prints the stage it starts, so a crash is attributed to the right file.
_LOAD_SCRIPT = """
import sys
folder, library = sys.argv[1], sys.argv[2]
def fail(stage, exc):
    text = str(exc).strip()
    print(stage + ' ' + (text.splitlines()[0] if text else type(exc).__name__), flush=True)
    sys.exit(3)
if library:
    print('start library', flush=True)
    import onnxruntime as ort
    try:
        ort.SessionOptions().register_custom_ops_library(library)
    except Exception as exc:
        fail('library', exc)
try:
    import onnxruntime_genai as og
except ImportError:
    sys.exit(0)
print('start genai', flush=True)
try:
    og.Model(folder)
except Exception as exc:
    fail('genai', exc)
"""


def _load_in_child(folder: Path, library: Path | None) -> None:
    """Register ``library`` with onnxruntime and open ``og.Model(folder)`` (when genai is
    installed) in a child process; `ValidationError` naming the file that fails."""
    import signal
    import subprocess
    import sys

    cmd = [sys.executable, "-c", _LOAD_SCRIPT, str(folder), str(library or "")]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode == 0:
        return
    lines = done.stdout.splitlines()
    last = lines[-1] if lines else ""
    if done.returncode == 3:  # the script's own line: "<stage> <reason>"
        stage, _, reason = last.partition(" ")
    else:  # died in the stage it announced last
        stage = last.removeprefix("start ") if last.startswith("start ") else "genai"
        err = done.stderr.strip().splitlines()
        reason = (f"the loading process died of {signal.Signals(-done.returncode).name}"
                  if done.returncode < 0 else err[-1] if err else f"exit status {done.returncode}")
    if stage == "library" and library is not None:
        raise ValidationError(f"{library}: onnxruntime cannot load this custom-op library "
                              f"({reason})")
    raise ValidationError(f"{folder}: onnxruntime-genai cannot load the export ({reason})")
