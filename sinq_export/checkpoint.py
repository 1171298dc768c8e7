"""A Hugging Face model folder read one tensor at a time (the streaming export's only source).

Why not ``from_pretrained`` or mobius' loader: both materialise every tensor of every shard,
so peak memory is the whole model. Here `Checkpoint.open` validates everything that is cheap
to validate up front (config.json, the shard index, each shard's header: dtypes, shapes,
data offsets against the file size) and `Checkpoint.load` reads one tensor from its shard
through ``safetensors.safe_open`` and checks that it is finite.

Memory note: safetensors 0.8 maps a shard and hands out tensors that *view* the mapping, so
every page read stays in the process' RSS for as long as the handle is open. A handle kept
open for a whole export would grow RSS to the shard size; `load` therefore opens the shard,
takes one tensor and closes it again (parsing a header costs microseconds), and only the
returned tensor's pages stay resident, for as long as the caller holds it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .folders import ModelLoadError, read_config

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

TORCH_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2}

# Finite checks run in slices of this many elements so the bool mask stays small.
_FINITE_CHUNK = 1 << 24


def _parse_config(folder: Path) -> dict:
    """Parse ``config.json`` and refuse a ``model_type`` that contradicts ``architectures``."""
    config = read_config(folder)
    _check_model_type(folder / "config.json", config)
    return config


def architecture_model_types(arch: str) -> frozenset[str]:
    """The ``model_type`` values transformers' auto classes build class ``arch`` for (empty:
    class unknown). Read from the auto mappings, not the class: importing a modeling module
    to ask its config takes seconds."""
    from transformers.models.auto import modeling_auto

    types = set()
    for key, mapping in vars(modeling_auto).items():
        if key.startswith("MODEL") and key.endswith("MAPPING_NAMES") and isinstance(mapping, dict):
            for model_type, names in mapping.items():
                if arch == names or (isinstance(names, tuple | list) and arch in names):
                    types.add(model_type)
    return frozenset(types)


def _check_model_type(path: Path, config: dict) -> None:
    """transformers builds the model from ``model_type``, so a mismatch silently builds the
    wrong network (e.g. a Llama checkpoint exported as a random GPT-2)."""
    archs = config.get("architectures")
    model_type = config.get("model_type")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        return  # which architectures are supported is decided by the graph builder
    if not isinstance(model_type, str):
        raise ModelLoadError(f"{path}: config.json has no 'model_type' string")
    expected = architecture_model_types(archs[0])
    if expected and model_type not in expected:
        raise ModelLoadError(
            f"{path}: model_type {model_type!r} disagrees with architectures "
            f"[{archs[0]!r}] (which expects model_type {' or '.join(map(repr, sorted(expected)))})"
        )


def _shard_files(folder: Path) -> dict[str, list[str] | None]:
    """Shard file name -> tensor names the index assigns to it (None: no index, one file)."""
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{index_path}: cannot parse the shard index ({exc})") from exc
        shards: dict[str, list[str] | None] = {}
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or Path(shard).name != shard:
                raise ModelLoadError(f"{index_path}: tensor {name!r} maps to bad shard {shard!r}")
            shards.setdefault(shard, []).append(name)
        for shard, names in shards.items():
            if not (folder / shard).is_file():
                raise ModelLoadError(
                    f"{folder / shard}: shard named in {INDEX_FILE} is missing "
                    f"(holds {len(names)} tensor(s), e.g. {sorted(names)[0]!r})"
                )
        return shards
    if (folder / SINGLE_FILE).is_file():
        return {SINGLE_FILE: None}
    raise ModelLoadError(f"{folder}: neither {SINGLE_FILE} nor {INDEX_FILE} found")


def _read_header(path: Path) -> dict[str, dict]:
    """The shard's tensor table, name -> {"dtype", "shape", "data_offsets"}.

    safe_open already refuses a truncated file; the explicit size check here turns that into
    a message naming the tensor whose bytes are missing.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ModelLoadError(f"{path}: truncated safetensors file ({size} bytes)")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise ModelLoadError(
                    f"{path}: truncated safetensors file (header of {n} bytes, file {size})"
                )
            header = json.loads(fh.read(n))
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read safetensors file ({exc})") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"{path}: corrupt safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: corrupt safetensors header (not an object)")
    header.pop("__metadata__", None)
    data_bytes = size - 8 - n
    for name, info in header.items():
        try:
            dtype, shape, (start, stop) = info["dtype"], info["shape"], info["data_offsets"]
        except (TypeError, KeyError, ValueError) as exc:
            raise ModelLoadError(f"{path}: tensor {name!r} has a corrupt header entry") from exc
        if dtype not in TORCH_DTYPES:
            raise ModelLoadError(
                f"{path}: tensor {name!r} has unsupported dtype {dtype} "
                f"(supported: {', '.join(TORCH_DTYPES)})"
            )
        numel = 1
        for dim in shape:
            numel *= int(dim)
        if stop - start != numel * DTYPE_BYTES[dtype]:
            raise ModelLoadError(
                f"{path}: tensor {name!r} header size disagrees with its shape {list(shape)}"
            )
        if stop > data_bytes:
            raise ModelLoadError(
                f"{path}: truncated safetensors file: tensor {name!r} needs bytes up to "
                f"{8 + n + stop}, file has {size}"
            )
    return header


def _check_with_safetensors(path: Path) -> None:
    """Let safetensors itself parse the header too (it checks more than we do, e.g. overlaps)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            fh.keys()
    except Exception as exc:  # SafetensorError has no public base class
        raise ModelLoadError(f"{path}: corrupt safetensors file ({exc})") from exc


def all_finite(tensor: torch.Tensor) -> bool:
    """``isfinite(t).all()`` in slices, so checking a 1 GB embedding allocates no 1 GB mask.

    Each slice is first summed in float32: a NaN or Inf anywhere makes the sum non-finite, so a
    finite sum proves the slice finite in one read with no mask (5-10x faster); only a
    non-finite sum (a bad value, or finite values whose sum overflows) is checked element-wise.
    """
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), _FINITE_CHUNK):
        part = flat[start : start + _FINITE_CHUNK]
        if bool(torch.isfinite(part.sum(dtype=torch.float32))):
            continue
        if not bool(torch.isfinite(part).all()):
            return False
    return True


class Checkpoint:
    """A HF model folder (``model.safetensors`` or a sharded index), read one tensor at a time.

    Construct with `Checkpoint.open`; every structural problem surfaces there as a
    `ModelLoadError` naming the file (and tensor), before any export work starts.
    """

    def __init__(self, folder: Path, config: dict, tensors: dict[str, tuple[Path, dict]]):
        self.folder = folder
        self.config = config
        self._tensors = tensors  # name -> (shard path, header entry)

    @classmethod
    def open(cls, folder: str | os.PathLike) -> Checkpoint:
        folder = Path(folder).expanduser()
        if not folder.exists():
            raise ModelLoadError(f"{folder}: model folder does not exist")
        if not folder.is_dir():
            raise ModelLoadError(f"{folder}: not a folder (expected a Hugging Face model folder)")
        config = _parse_config(folder)
        tensors: dict[str, tuple[Path, dict]] = {}
        for shard, indexed in _shard_files(folder).items():
            path = folder / shard
            header = _read_header(path)
            _check_with_safetensors(path)
            if indexed is not None:
                missing = sorted(set(indexed) - set(header))
                if missing:
                    raise ModelLoadError(
                        f"{path}: tensor {missing[0]!r} named in {INDEX_FILE} is not in this shard"
                    )
            for name, info in header.items():
                if name in tensors:
                    raise ModelLoadError(
                        f"{path}: tensor {name!r} is also stored in {tensors[name][0].name}"
                    )
                tensors[name] = (path, info)
        return cls(folder, config, tensors)

    def names(self) -> list[str]:
        return sorted(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def _entry(self, name: str) -> tuple[Path, dict]:
        try:
            return self._tensors[name]
        except KeyError:
            raise ModelLoadError(f"{self.folder}: checkpoint has no tensor {name!r}") from None

    def require(self, name: str, shape: tuple[int, ...] | None = None) -> None:
        """One line naming ``name`` when the checkpoint lacks a tensor the config promises or
        (``shape``) stores it in another shape: checked on the header, before any read."""
        if name not in self._tensors:
            raise ModelLoadError(f"{self.folder}: checkpoint lacks tensor {name!r}, "
                                 "which the config promises")
        if shape is not None and self.shape(name) != tuple(shape):
            raise ModelLoadError(f"{self.folder}: tensor {name!r} has shape "
                                 f"{self.shape(name)}, the config implies {tuple(shape)}")

    def shard(self, name: str) -> Path:
        """The shard file that stores ``name``."""
        return self._entry(name)[0]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._entry(name)[1]["shape"])

    def dtype(self, name: str) -> str:
        return self._entry(name)[1]["dtype"]

    def nbytes(self, name: str) -> int:
        start, stop = self._entry(name)[1]["data_offsets"]
        return int(stop - start)

    def total_nbytes(self) -> int:
        """Bytes of tensor data in all shards (what a full read moves)."""
        return sum(self.nbytes(name) for name in self._tensors)

    def rows(self, name: str, index: torch.Tensor, dtype: torch.dtype = torch.float32
             ) -> torch.Tensor:
        """Rows ``index`` (sorted, unique) of the 2-D tensor ``name``, checked finite: what an
        embedding lookup needs, without reading the rest of a ``[vocab x hidden]`` table."""
        from safetensors import safe_open

        path, _ = self._entry(name)
        ids = index.tolist()
        # consecutive ids are read as one slice
        runs = [[ids[0], ids[0] + 1]] if ids else []
        for i in ids[1:]:
            if i == runs[-1][1]:
                runs[-1][1] += 1
            else:
                runs.append([i, i + 1])
        try:
            with safe_open(str(path), framework="pt") as fh:
                sliced = fh.get_slice(name)
                parts = [sliced[a:b].to(dtype) for a, b in runs]
        except Exception as exc:  # SafetensorError / OSError: the file changed since open()
            raise ModelLoadError(f"{path}: cannot read tensor {name!r} ({exc})") from exc
        out = torch.cat(parts) if parts else torch.empty(0, *self.shape(name)[1:], dtype=dtype)
        if not all_finite(out):
            raise ModelLoadError(f"{path}: tensor {name!r} contains NaN or Inf values")
        return out

    def load(self, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """Read tensor ``name`` alone (``dtype=None`` keeps the stored dtype), checked finite.

        The shard is opened for this one read (see the module docstring for why). A stored
        dtype that cannot hold a value once converted (e.g. F32 -> float16 overflow) is
        refused too, so a caller never quantizes an inf.
        """
        from safetensors import safe_open

        path, info = self._entry(name)
        try:
            with safe_open(str(path), framework="pt") as fh:
                tensor = fh.get_tensor(name)
        except Exception as exc:  # SafetensorError / OSError: the file changed since open()
            raise ModelLoadError(f"{path}: cannot read tensor {name!r} ({exc})") from exc
        if tuple(tensor.shape) != self.shape(name):
            raise ModelLoadError(f"{path}: tensor {name!r} changed shape since the checkpoint opened")
        if not all_finite(tensor):
            raise ModelLoadError(f"{path}: tensor {name!r} contains NaN or Inf values")
        if dtype is None or tensor.dtype == dtype:
            return tensor
        converted = tensor.to(dtype)
        # float32 holds every bfloat16 / float16 / integer value: only a narrower target can overflow
        narrower = not dtype.is_floating_point or (
            tensor.dtype.is_floating_point and torch.finfo(dtype).max < torch.finfo(tensor.dtype).max)
        del tensor
        if narrower and not all_finite(converted):
            raise ModelLoadError(
                f"{path}: tensor {name!r} ({info['dtype']}) overflows {dtype} when converted"
            )
        return converted
