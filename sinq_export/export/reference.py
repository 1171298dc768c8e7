"""``OUT_DIR/reference``: the PyTorch `SinqLinear` model the validator compares against."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from ..config import SinqConfig
from ..contract import REFERENCE_DIR
from ..nn import save_quantized

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def save_reference(model: nn.Module, out_dir: Path, config: SinqConfig,
                   tokenizer: PreTrainedTokenizerBase | None = None) -> Path:
    return save_quantized(model, out_dir / REFERENCE_DIR, config, tokenizer=tokenizer)
