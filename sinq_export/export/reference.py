"""``OUT_DIR/reference``: the PyTorch `SinqLinear` model the validator compares against."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..config import SinqConfig
from ..saved import save_quantized

REFERENCE_DIR = "reference"


def save_reference(model: nn.Module, out_dir: Path, config: SinqConfig, tokenizer=None) -> Path:  # noqa: ANN001
    return save_quantized(model, out_dir / REFERENCE_DIR, config, tokenizer=tokenizer)
