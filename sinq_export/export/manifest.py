"""``sinq_export.json`` (the contract in docs/export-format.md) and the export result object.

The manifest holds only what is fixed by the inputs (configs, layer layout, versions, sizes,
the source folder): no timestamps or timings, so two runs of the same command give
byte-identical folders. Timings live in `ExportResult.timings` and reach the user through the
CLI summary / ``--json``. ``source.path`` is the one absolute path: `validate` rebuilds its
reference from it (``config_sha256`` tells it whether that folder still holds the same model).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from ..config import GraphConfig, SinqConfig
from ..contract import FORMAT_VERSION, MANIFEST_FILE, MANIFEST_KEYS
from ..gguf import source_quantization
from ..io import Marker
from ..onnx_tensors import OnnxTensors, load_graph
from .graph import custom_domains

# What makes a folder recognisably our export (only such a folder is replaced by --overwrite).
MANIFEST_MARKER = Marker(MANIFEST_FILE, MANIFEST_KEYS)


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist, key in (("sinq-export", "sinq_export"), ("torch", "torch"), ("onnx", "onnx"),
                      ("onnxruntime", "onnxruntime"), ("transformers", "transformers"),
                      ("onnxruntime-genai", "onnxruntime_genai"), ("mobius-onnx", "mobius_onnx"),
                      ("onnx-ir", "onnx_ir")):
        try:
            out[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[key] = None
    return out


def onnx_section(model: onnx.ModelProto, file: str, data_files: Sequence[str]) -> dict[str, Any]:
    """The graph's files and interface, as written."""
    return {
        "file": file,
        "data_file": data_files[0] if data_files else None,
        "data_files": list(data_files),
        "ir_version": model.ir_version,
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
        "inputs": [i.name for i in model.graph.input],
        "outputs": [o.name for o in model.graph.output],
        "custom_domains": custom_domains(model),
    }


def source_section(folder: Path | None) -> dict[str, Any]:
    """Where the float weights came from: what `validate` rebuilds its reference from, and for
    a folder converted from a GGUF which quantization types that file held (re-quantizing
    already-quantized weights compounds their error: docs/gguf.md)."""
    if folder is None:
        return {"path": None, "config_sha256": None, "quantization": None}
    digest = hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()
    return {"path": str(folder.absolute()), "config_sha256": digest,
            "quantization": source_quantization(folder)}


def build_manifest(
    *,
    kind: str,
    config: SinqConfig,
    graph_config: GraphConfig,
    source_model: str | None,
    source: Path | None,
    out: Path,
    onnx_file: str,
    data_files: Sequence[str],
    layers: dict[str, dict],
    mul_nodes: int,
    linear_weight_bytes: int,
    float_linear_weight_bytes: int,
    warnings: Sequence[str] = (),
    extra: Mapping[str, object] | None = None,
) -> dict[str, Any]:
    """``sinq_export.json`` of an export written to ``out``, for both routes (``kind``
    ``causal-lm`` and ``module``). The sections every export has are made here, the ``onnx``
    section, sizes and tensor digests from the files as written (``onnx_file`` and
    ``data_files``, relative to ``out``). ``linear_weight_bytes``: the quantized linears'
    initializers; ``float_linear_weight_bytes``: the same linears as float32. ``extra`` adds
    a route's own sections (``probe``, ``accuracy``, ``folded_t_file``, ...) and may replace a
    shared one, but not the digests or ``warnings``: those describe the folder as written."""
    path = out / onnx_file
    graph = load_graph(path)  # without its data: the digests read one tensor at a time
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "config": config.to_dict(),
        "graph": graph_config.to_dict(),
        "source_model": source_model,
        "source": source_section(source),
        "versions": versions(),
        "onnx": onnx_section(graph, onnx_file, data_files),
        "layers": layers,
        "mul_nodes": mul_nodes,
        "sizes": {
            "linear_weight_bytes": linear_weight_bytes,
            "float_linear_weight_bytes": float_linear_weight_bytes,
            "onnx_bytes": sum((out / f).stat().st_size for f in (onnx_file, *data_files)),
        },
    }
    # sha256 of every initializer as written: `validate` checks each against it, so a byte
    # changed after the export fails there, named, in any tensor (those of a layer whose t is
    # folded away included)
    digests = OnnxTensors(graph, path.parent).digests()
    return {**manifest, **(extra or {}), "tensor_sha256": digests, "warnings": list(warnings)}


@dataclass
class ExportResult:
    """What an export produced. ``model`` is the quantized torch reference (`SinqLinear`s)."""

    out_dir: Path
    manifest: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    model: Any = None
    tokenizer: Any = None
    float_onnx_bytes: int | None = None
    peak_rss: dict[str, float] = field(default_factory=dict)  # stage -> MiB
    warnings: list[str] = field(default_factory=list)  # fine to ship, but the user should know

    def summary(self) -> dict[str, Any]:
        """Everything the CLI prints (JSON-friendly); timings included, unlike the manifest."""
        m = self.manifest
        bits: dict[str, int] = {}
        for layer in m["layers"].values():
            bits[str(layer["bits"])] = bits.get(str(layer["bits"]), 0) + 1
        return {
            "output": str(self.out_dir),
            "kind": m["kind"],
            "source_model": m["source_model"],
            "layers_quantized": len(m["layers"]),
            "layers_by_bits": dict(sorted(bits.items())),
            "ops": sorted({la["op"] for la in m["layers"].values()}),
            "mul_nodes": m["mul_nodes"],
            "linear_weight_bytes_before": m["sizes"]["float_linear_weight_bytes"],
            "linear_weight_bytes_after": m["sizes"]["linear_weight_bytes"],
            "onnx_bytes_before": self.float_onnx_bytes,
            "onnx_bytes_after": m["sizes"]["onnx_bytes"],
            "timings_s": {k: round(v, 2) for k, v in self.timings.items()},
            "peak_rss_mb": dict(self.peak_rss),
            "config": m["config"],
            "graph": m["graph"],
            "layers_per_accuracy_level": (m.get("accuracy") or {}).get("layers_per_level"),
            "warnings": list(self.warnings),
        }
