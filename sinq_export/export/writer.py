"""Deterministic ONNX writing: ``model.onnx`` + one external-data file, then the full check.

Why our own writer instead of ``onnx.save(..., save_as_external_data=True)``: we want the
bytes fixed by the graph alone (initializers in graph order, fixed alignment, deterministic
protobuf serialisation, a pinned IR version and producer), and always external data so models
past protobuf's 2 GB limit work the same way as small ones.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from onnx import numpy_helper

# onnx 1.23 stamps IR 14, onnxruntime 1.31 accepts <= 13; 10 is what onnxruntime-genai and
# every onnxruntime >= 1.16 read. Opsets up to 21 are valid with IR 10.
IR_VERSION = 10
PRODUCER = "sinq-export"
ALIGNMENT = 64  # bytes; keeps every tensor cache-line aligned inside the data file
SIZE_THRESHOLD = 1024  # tensors at least this large go to the data file


def _raw_bytes(t: onnx.TensorProto) -> bytes:
    if t.HasField("raw_data"):
        return t.raw_data
    return numpy_helper.to_array(t).tobytes()


def _externalise(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    t.ClearField("raw_data")
    for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        t.ClearField(f)
    t.data_location = onnx.TensorProto.EXTERNAL
    del t.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value


def write_model(model: onnx.ModelProto, path: str | os.PathLike, producer_version: str) -> None:
    """Write ``model`` to ``path`` (+ ``path.name + '.data'``).

    The model is modified in place (tensors become external references), so callers pass a
    proto they do not need afterwards.
    """
    path = Path(path)
    data_name = path.name + ".data"
    model.ir_version = IR_VERSION
    model.producer_name = PRODUCER
    model.producer_version = producer_version
    offset = 0
    with open(path.with_name(data_name), "wb") as fh:
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                raise ValueError(f"initializer {t.name!r} still refers to external data; load it first")
            raw = _raw_bytes(t)
            if len(raw) < SIZE_THRESHOLD:
                continue
            pad = (-offset) % ALIGNMENT
            if pad:
                fh.write(b"\0" * pad)
                offset += pad
            fh.write(raw)
            _externalise(t, data_name, offset, len(raw))
            offset += len(raw)
    path.write_bytes(model.SerializeToString(deterministic=True))


def check_model(path: str | os.PathLike) -> None:
    """``onnx.checker`` full check (with shape inference) on the written files."""
    onnx.checker.check_model(str(path), full_check=True)
