"""A Hugging Face model folder read one tensor at a time (BRIEF interface 1).

Interim version written by the graph branch so the builder can stream; the stream branch owns
this module and its version replaces this one on merge (same API).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .models import ModelLoadError

_INDEX = "model.safetensors.index.json"


class Checkpoint:
    """Tensor name -> shard map of a safetensors checkpoint; `load` reads one tensor."""

    def __init__(self, folder: Path, config: dict, shards: dict[str, Path],
                 headers: dict[str, dict]) -> None:
        self.folder = folder
        self.config = config
        self._shards = shards
        self._headers = headers

    @classmethod
    def open(cls, folder: str | os.PathLike) -> Checkpoint:
        from safetensors import safe_open

        from .models import _read_config

        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise ModelLoadError(f"{folder}: model folder does not exist")
        config = _read_config(folder)
        index = folder / _INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ModelLoadError(f"{index}: bad shard index ({exc})") from exc
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"{folder}: no *.safetensors weight files")
        shards: dict[str, Path] = {}
        headers: dict[str, dict] = {}
        for name in files:
            path = folder / name
            if not path.is_file():
                raise ModelLoadError(f"{path}: shard named by {_INDEX} is missing")
            try:
                with open(path, "rb") as fh:
                    n = int.from_bytes(fh.read(8), "little")
                    header = json.loads(fh.read(n))
                with safe_open(str(path), framework="pt") as fh:
                    fh.keys()
            except Exception as exc:  # SafetensorError has no common base
                raise ModelLoadError(f"{path}: corrupt safetensors file ({exc})") from exc
            for key, meta in header.items():
                if key != "__metadata__":
                    shards[key] = path
                    headers[key] = meta
        return cls(folder, config, shards, headers)

    def names(self) -> list[str]:
        return sorted(self._shards)

    def __contains__(self, name: object) -> bool:
        return name in self._shards

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._meta(name)["shape"])

    def dtype(self, name: str) -> str:
        return self._meta(name)["dtype"]

    def nbytes(self, name: str) -> int:
        start, stop = self._meta(name)["data_offsets"]
        return stop - start

    def _meta(self, name: str) -> dict:
        if name not in self._headers:
            raise ModelLoadError(f"{self.folder}: checkpoint has no tensor {name!r}")
        return self._headers[name]

    def load(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from safetensors import safe_open

        path = self._shards.get(name)
        if path is None:
            raise ModelLoadError(f"{self.folder}: checkpoint has no tensor {name!r}")
        try:
            with safe_open(str(path), framework="pt") as fh:
                t = fh.get_tensor(name)
        except Exception as exc:
            raise ModelLoadError(f"{path}: cannot read tensor {name!r} ({exc})") from exc
        t = t.to(dtype)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ModelLoadError(f"{path}: tensor {name!r} has NaN/Inf values")
        return t
