"""The exported ONNX model, read without ever loading (or serialising) all of it.

A 1.5B-parameter export's ``model.onnx.data`` is gigabytes, and protobuf cannot serialise a
message over 2 GB. So the validator loads ``model.onnx`` *without* external data (the graph
alone: kilobytes), checks every external-data reference against the data file up front (a
truncated or missing file is bad input, named here, not an onnxruntime crash later), reads
single tensors by name at their recorded offset, and builds its probe model (extra outputs,
an accuracy-level override) as a small in-memory graph that reaches the original data file
through a session option naming the export folder as the place of its external data.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx


class ValidationError(ValueError):
    """Bad input to the validator (unknown provider, not an export folder, a damaged file,
    tokenizer mismatch). Defined here, below both the exporter and the validator, because
    reading an export's tensors is where a damaged folder first shows."""


def load_graph(path: Path):
    """``model.onnx`` without its external data; a damaged file is a `ValidationError`."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError, OSError: a truncated or foreign file
        raise ValidationError(f"{path}: cannot parse the ONNX model ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else 'damaged file'})") from exc


def _external_info(tensor) -> dict[str, str] | None:
    from onnx import TensorProto

    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    return {e.key: e.value for e in tensor.external_data}


def _graph_tensors(model) -> Iterator:
    """Initializers of the main graph (what the exporter writes; no subgraphs)."""
    yield from model.graph.initializer


_CHUNK = 1 << 24  # bytes read at a time when hashing external data


def _inline_bytes(proto: onnx.TensorProto) -> bytes:
    from onnx import numpy_helper

    return proto.raw_data if proto.HasField("raw_data") else numpy_helper.to_array(proto).tobytes()


class OnnxTensors(Mapping):
    """Initializer name -> NumPy array, read one at a time from the external data file(s).

    ``Constant`` node values count too (they live inside the graph). Constructing it checks
    that every external reference lies inside its file, so a damaged folder fails before any
    session is created.
    """

    def __init__(self, model, folder: Path):
        self.folder = folder
        self._protos = {t.name: t for t in _graph_tensors(model)}
        self._constants = {}
        for node in model.graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for a in node.attribute:
                    if a.name == "value":
                        self._constants[node.output[0]] = a.t
        self.data_files = self._check_external()

    def _check_external(self) -> list[Path]:
        sizes: dict[str, int] = {}
        for name, proto in self._protos.items():
            info = _external_info(proto)
            if info is None:
                continue
            location = info.get("location", "")
            path = self.folder / location
            if not location or Path(location).is_absolute() or ".." in Path(location).parts:
                raise ValidationError(f"{self.folder}: tensor {name!r} has an unsafe external "
                                      f"data location {location!r}")
            if location not in sizes:
                if not path.is_file():
                    raise ValidationError(f"{path}: external data file is missing "
                                          f"(needed by tensor {name!r})")
                sizes[location] = path.stat().st_size
            end = int(info.get("offset", 0)) + int(info.get("length", 0))
            if end > sizes[location]:
                raise ValidationError(
                    f"{path}: external data is truncated: tensor {name!r} needs bytes up to "
                    f"{end}, the file has {sizes[location]}")
        return [self.folder / loc for loc in sizes]

    def __getitem__(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        if name in self._constants:
            return numpy_helper.to_array(self._constants[name])
        proto = self._protos[name]
        info = _external_info(proto)
        if info is None:
            return numpy_helper.to_array(proto)
        return self._read_external(proto, info)

    def _read_external(self, proto, info: dict[str, str]) -> np.ndarray:
        from onnx import helper

        dtype = helper.tensor_dtype_to_np_dtype(proto.data_type)
        shape = tuple(int(d) for d in proto.dims)
        count = int(np.prod(shape, dtype=np.int64))
        offset, length = int(info.get("offset", 0)), int(info.get("length", 0))
        if length and length != count * np.dtype(dtype).itemsize:
            raise ValidationError(f"{self.folder}: tensor {proto.name!r}: external length {length} "
                                  f"does not match its shape {list(shape)}")
        path = self.folder / info["location"]
        with open(path, "rb") as fh:
            array = np.fromfile(fh, dtype=dtype, count=count, offset=offset)
        if array.size != count:
            raise ValidationError(f"{path}: external data is truncated at tensor {proto.name!r}")
        return array.reshape(shape)

    def sha256(self, name: str) -> str:
        """sha256 of initializer ``name``'s bytes as stored (external data read in chunks, so a
        tensor of any size costs constant memory)."""
        import hashlib

        proto = self._protos[name]
        info = _external_info(proto)
        digest = hashlib.sha256()
        if info is None:
            digest.update(_inline_bytes(proto))
            return digest.hexdigest()
        offset, length = int(info.get("offset", 0)), int(info.get("length", 0))
        with open(self.folder / info["location"], "rb") as fh:
            fh.seek(offset)
            while length > 0:
                chunk = fh.read(min(length, _CHUNK))
                if not chunk:
                    raise ValidationError(f"{self.folder / info['location']}: external data is "
                                          f"truncated at tensor {name!r}")
                digest.update(chunk)
                length -= len(chunk)
        return digest.hexdigest()

    def digests(self) -> dict[str, str]:
        """Initializer name -> `sha256`, every initializer of the graph (sorted by name)."""
        return {name: self.sha256(name) for name in sorted(self._protos)}

    def changed(self, recorded: Mapping[str, str]) -> dict[str, str]:
        """Initializer name -> what is wrong with it, against ``recorded`` digests: bytes that
        differ, a recorded tensor the graph lacks, a tensor the record does not list."""
        out = {name: "is not in the graph" for name in recorded if name not in self._protos}
        for name in sorted(self._protos):
            if name not in recorded:
                out[name] = "is not in the export's record"
            elif self.sha256(name) != recorded[name]:
                out[name] = "differs from the bytes the export wrote (sha256)"
        return out

    def __contains__(self, name: object) -> bool:
        return name in self._protos or name in self._constants

    def __iter__(self) -> Iterator[str]:
        yield from self._protos
        yield from self._constants

    def __len__(self) -> int:
        return len(self._protos) + len(self._constants)


# onnxruntime resolves the external data of a model given as bytes against this folder, so a
# probe graph (the original graph plus outputs, its initializers still external) is passed as
# bytes: no temp copy, no link (onnxruntime refuses symlinks that leave the model's folder).
EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"


def graph_bytes(model) -> bytes:
    """Serialise a graph whose big initializers stay external (always far below 2 GB)."""
    size = model.ByteSize()
    if size >= 2**31 - 1:
        raise ValidationError(f"the ONNX graph itself is {size} bytes (inline initializers?); "
                              "protobuf cannot serialise it")
    return model.SerializeToString()
