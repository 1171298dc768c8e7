"""``OUT_DIR/reference``: the PyTorch `SinqLinear` model the validator compares against."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..config import SinqConfig
from ..nn import quantized_layers, save_quantized

REFERENCE_DIR = "reference"


def own_storage(model: nn.Module) -> None:
    """Give every SinqLinear buffer its own storage (values unchanged).

    Jointly quantized layers (``shared_col_scale``) hold row slices of one packed tensor and
    share one ``t`` object; safetensors refuses to save tensors that share storage.
    """
    for layer in quantized_layers(model).values():
        for name, buf in list(layer.named_buffers(recurse=False)):
            if buf is not None:
                setattr(layer, name, buf.clone())


def canonical_safetensors_header(path: Path) -> None:
    """Rewrite a safetensors header with sorted keys, same length (padded with spaces).

    safetensors serialises ``__metadata__`` from a Rust HashMap, so with two or more entries
    (``format`` + the tied-weight alias it adds) the key order changes from process to process
    and two saves of the same model differ by a few bytes. Tensor offsets are relative to the
    end of the header, whose length we keep, so the data is untouched.
    """
    with open(path, "r+b") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        if len(text) > n:  # cannot happen (same content, no whitespace); keep the file as is
            return
        fh.seek(8)
        fh.write(text + b" " * (n - len(text)))


def save_reference(model: nn.Module, out_dir: Path, config: SinqConfig, tokenizer=None) -> Path:  # noqa: ANN001
    own_storage(model)
    path = save_quantized(model, out_dir / REFERENCE_DIR, config, tokenizer=tokenizer)
    for file in sorted(path.glob("*.safetensors")):
        canonical_safetensors_header(file)
    return path
