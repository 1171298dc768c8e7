"""The saved format of a quantized PyTorch model: safetensors + JSON (never pickle), written
atomically, rebuilt without the source."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from .config import SinqConfig
from .io import Marker, atomic_output_dir, read_json, write_json
from .linear import SinqLinear, quantized_layers, set_module
from .quant import packing
from .quant.record import QuantizedWeight

if TYPE_CHECKING:  # typing only: transformers is slow to import
    from transformers import PreTrainedTokenizerBase

QUANTIZED_WEIGHTS_FILE = "quantized.safetensors"
QUANTIZED_META_FILE = "sinq_quantized.json"


FORMAT_VERSION = 1


# What makes a folder recognisably `save_quantized` output (only such a folder is overwritten).
QUANTIZED_MARKER = Marker(QUANTIZED_META_FILE, ("format_version", "config", "layers"))


def _layer_meta(m: SinqLinear) -> dict:
    return {
        "shape": [m.out_features, m.in_features],
        "bits": m.bits,
        "group_size": m.group_size,
        "col_scale": m.col_scale is not None,
        "bias": m.bias is not None,
    }


def save_quantized(
    model: nn.Module,
    out_dir: str | Path,
    config: SinqConfig,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    overwrite: bool = False,
    protect: Iterable[str | Path] = (),
) -> Path:
    """Save a quantized model as safetensors + JSON (never pickle), atomically.

    ``overwrite`` replaces only an earlier `save_quantized` folder (`QUANTIZED_MARKER`) and
    never a folder in ``protect`` (the source model) or a parent of one.
    """
    with atomic_output_dir(out_dir, overwrite, marker=QUANTIZED_MARKER, protect=protect) as tmp:
        write_quantized(model, tmp, config, tokenizer=tokenizer)
    return Path(out_dir)


def write_quantized(model: nn.Module, folder: Path, config: SinqConfig, *,
                    tokenizer: PreTrainedTokenizerBase | None = None) -> None:
    """Write the `save_quantized` files into ``folder`` (a temp folder of `atomic_output_dir`).

    Layout: ``quantized.safetensors`` (float params and packed buffers), ``sinq_quantized.json``
    (format version, config, per-layer layout), plus the HF ``config.json`` and tokenizer when
    the model has them, so `load_quantized` can rebuild the module tree without the source.
    """

    save_model(model, str(folder / QUANTIZED_WEIGHTS_FILE), metadata={"format": "pt"})
    canonical_safetensors_header(folder / QUANTIZED_WEIGHTS_FILE)
    hf_config = getattr(model, "config", None)
    if hf_config is not None and hasattr(hf_config, "save_pretrained"):
        hf_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    write_json(
        folder / QUANTIZED_META_FILE,
        {
            "format_version": FORMAT_VERSION,
            "config": config.to_dict(),
            "layers": {n: _layer_meta(m) for n, m in quantized_layers(model).items()},
        },
    )


def canonical_safetensors_header(path: Path) -> None:
    """Rewrite a safetensors header with sorted keys at the same length (space padded).

    Why: safetensors serialises ``__metadata__`` from a hash map, so with two or more entries
    (``format`` plus the alias it adds for tied weights) the key order changes between
    processes and two saves of one model differ. Tensor offsets are relative to the end of the
    header, whose length is kept, so the tensor bytes are untouched.
    """
    with open(path, "r+b") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        if len(text) <= n:  # always true: same content, no whitespace
            fh.seek(8)
            fh.write(text + b" " * (n - len(text)))


def _empty_record(meta: dict) -> QuantizedWeight:

    n, k = meta["shape"]
    bits, g = meta["bits"], meta["group_size"]
    nb = packing.n_blocks(k, g)
    return QuantizedWeight(
        packed=torch.zeros(n, nb, packing.packed_block_bytes(g, bits), dtype=torch.uint8),
        scales=torch.zeros(n, nb),
        zero_points=torch.zeros(n, packing.packed_zero_point_bytes(nb, bits), dtype=torch.uint8),
        col_scale=torch.zeros(k) if meta["col_scale"] else None,
        bits=bits,
        group_size=g,
        shape=(n, k),
    )


def load_quantized(path: str | Path, model: nn.Module | None = None) -> tuple[nn.Module, SinqConfig]:
    """Rebuild a model saved by `save_quantized`.

    ``model`` is the float skeleton to load into (any torch module with the same structure);
    when omitted, it is built from the saved HF ``config.json`` (no weights are downloaded).
    """
    path = Path(path)
    meta_file = path / QUANTIZED_META_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not a saved quantized model (no {QUANTIZED_META_FILE})")
    meta = read_json(meta_file)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_file}: unsupported format_version {meta.get('format_version')!r}")
    if model is None:
        from transformers import AutoConfig, AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    for name, layer in meta["layers"].items():
        if not re.fullmatch(r"[\w.]+", name):
            raise ValueError(f"{meta_file}: bad layer name {name!r}")
        set_module(model, name, SinqLinear(_empty_record(layer),
                                            torch.zeros(layer["shape"][0]) if layer["bias"]
                                            else None))
    load_model(model, str(path / QUANTIZED_WEIGHTS_FILE), strict=True)
    model.eval()
    return model, SinqConfig.from_dict(meta["config"])


_RECORD_TENSORS = ("packed", "scales", "zero_points", "col_scale")


class SpilledRecords(MutableMapping[str, QuantizedWeight]):
    """Records kept in a folder, one safetensors file each, read back when asked for.

    Why: a calibration quantizes block by block long before the export writes any record, and
    a 7B model's records are ~3.8 GB; held on disk, what the process holds stays one block's.
    Each access reads the file again, so a consumer takes a record once and lets it go.
    """

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._files: dict[str, Path] = {}

    def __setitem__(self, name: str, record: QuantizedWeight) -> None:
        path = self._files.get(name) or self._folder / f"{len(self._files)}.safetensors"
        tensors = {k: getattr(record, k).contiguous() for k in _RECORD_TENSORS
                   if getattr(record, k) is not None}
        save_file(tensors, str(path), metadata={
            "bits": str(record.bits), "group_size": str(record.group_size),
            "shape": json.dumps(list(record.shape))})
        self._files[name] = path

    def __getitem__(self, name: str) -> QuantizedWeight:
        path = self._files[name]
        tensors = load_file(str(path))
        with open(path, "rb") as fh:  # the metadata: bits, group size, shape
            meta = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))["__metadata__"]
        return QuantizedWeight(
            packed=tensors["packed"], scales=tensors["scales"],
            zero_points=tensors["zero_points"], col_scale=tensors.get("col_scale"),
            bits=int(meta["bits"]), group_size=int(meta["group_size"]),
            shape=tuple(json.loads(meta["shape"])))

    def __contains__(self, name: object) -> bool:
        return name in self._files

    def __delitem__(self, name: str) -> None:
        self._files.pop(name).unlink(missing_ok=True)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)
