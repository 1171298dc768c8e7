"""The traced route's tail: quantize -> rewrite the float graph -> write -> check.

`module` produces a float ONNX graph and the weight fingerprints of the eligible linears
taken *before* quantization; everything after is this function. The manifest comes from
`manifest.build_manifest`, the causal-LM route's builder too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
from torch import nn

from ..config import GraphConfig, SinqConfig
from ..contract import MANIFEST_FILE, MODULE_DATA_FILE, MODULE_ONNX_FILE
from ..io import atomic_output_dir, write_json
from ..linear import eligible_linears, quantized_layers
from ..quantize import quantize_model
from .dtype import convert_to_fp16
from .graph import fingerprint
from .manifest import MANIFEST_MARKER, build_manifest, versions
from .reference import save_reference
from .rewrite import LayerInput, quantize_graph
from .stages import Stages
from .writer import check_model, write_model

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def linear_fingerprints(model: nn.Module, config: SinqConfig) -> dict[str, str]:
    """Hashes of the float weights the rewrite matches graph initializers against."""
    return {name: fingerprint(lin.weight) for name, (lin, _) in eligible_linears(model, config).items()}


def quantize_rewrite_write(
    model: nn.Module,
    graph: onnx.ModelProto,
    fingerprints: dict[str, str],
    config: SinqConfig,
    graph_config: GraphConfig,
    stages: Stages,
    out_dir: Path,
    *,
    kind: str,
    source: str,
    overwrite: bool,
    reference: bool,
    progress: bool,
    tokenizer: PreTrainedTokenizerBase | None = None,
    extra_files: Callable[[Path], None] | None = None,
    protect: Sequence[Path] = (),
) -> dict:
    """Quantize ``model`` in place, rewrite ``graph``, write OUT_DIR atomically; return the manifest."""
    with stages.stage("quantize"):
        quantize_model(model, config, progress=progress)
    with stages.stage("rewrite"):
        layers = {name: LayerInput(m.record, fingerprints[name])
                  for name, m in quantized_layers(model).items()}
        rewrite = quantize_graph(graph, layers, graph_config)
        if graph_config.dtype == "fp16":
            convert_to_fp16(graph)
    with atomic_output_dir(out_dir, overwrite, marker=MANIFEST_MARKER, protect=protect) as tmp_out:
        with stages.stage("write"):
            write_model(graph, tmp_out / MODULE_ONNX_FILE, versions()["sinq_export"] or "")
            if extra_files is not None:
                extra_files(tmp_out)
            if reference:
                save_reference(model, tmp_out, config, tokenizer=tokenizer)
            manifest = build_manifest(
                kind=kind, config=config, graph_config=graph_config, source_model=source,
                source=None, out=tmp_out, onnx_file=MODULE_ONNX_FILE,
                data_files=[MODULE_DATA_FILE], layers=rewrite.layers,
                mul_nodes=rewrite.mul_nodes, linear_weight_bytes=rewrite.linear_weight_bytes,
                float_linear_weight_bytes=rewrite.float_linear_bytes)
            write_json(tmp_out / MANIFEST_FILE, manifest)
        with stages.stage("check"):
            check_model(tmp_out / MODULE_ONNX_FILE)
    return manifest
