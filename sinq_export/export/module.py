"""Generic route: any ``torch.nn.Module`` with ``nn.Linear`` layers (an MLP, a vision model).

``torch.onnx.export`` (TorchScript exporter) traces the *float* module; the module is
quantized with `quantize_model` and the traced graph's linears are rewritten into quantized
nodes (`rewrite`; the causal-LM route builds its graph instead). Linears traced as ``MatMul``
(3-D inputs) or ``Gemm`` (2-D inputs) are both recognised. The manifest comes from
`manifest.build_manifest`, as the causal-LM route's does.
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx
import torch

from ..config import ACCURACY_AUTO, ConfigError, GraphConfig, SinqConfig
from ..io import check_output
from .manifest import MANIFEST_MARKER, ExportResult
from .pipeline import linear_fingerprints, quantize_rewrite_write
from .stages import Stages

DEFAULT_OPSET = 18


def export_module(
    module: torch.nn.Module,
    example_inputs: Any,
    out_dir: str | os.PathLike,
    config: SinqConfig | None = None,
    graph_config: GraphConfig | None = None,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
    progress: bool = False,
    inplace: bool = False,
    reference: bool = True,
) -> ExportResult:
    """Quantize ``module``'s linears with SINQ and export it to ``out_dir/model.onnx``.

    ``graph_config`` decides the graph (runtime, accuracy level, dtype, col-scale placement).
    ``example_inputs``: a tensor or tuple of tensors for tracing. The caller's module stays
    float unless ``inplace=True``; the quantized copy is returned as ``result.model``.
    """
    config = config or SinqConfig()
    graph_config = graph_config or GraphConfig()
    if graph_config.accuracy_level == ACCURACY_AUTO:
        raise ConfigError("accuracy_level 'auto' measures a causal LM's decoder blocks on the "
                          "energy probe; a module export takes a level 0-4")
    out_dir = Path(out_dir)
    check_output(out_dir, overwrite=overwrite, marker=MANIFEST_MARKER)
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    model = module if inplace else copy.deepcopy(module)
    model.eval()
    stages = Stages(["float_export", "quantize", "rewrite", "write", "check"], progress=progress)
    try:
        fingerprints = linear_fingerprints(model, config)
        with stages.stage("float_export"), tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "float.onnx"
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter
                torch.onnx.export(
                    model, args, str(path), dynamo=False, opset_version=opset,
                    input_names=list(input_names) if input_names else None,
                    output_names=list(output_names) if output_names else None,
                    dynamic_axes=dict(dynamic_axes) if dynamic_axes else None,
                    do_constant_folding=True,
                )
            graph = onnx.load(str(path))
            float_bytes = path.stat().st_size
        manifest = quantize_rewrite_write(
            model, graph, fingerprints, config, graph_config, stages, out_dir, kind="module",
            source=type(module).__name__, overwrite=overwrite, reference=reference,
            progress=progress,
        )
    finally:
        stages.close()
    return ExportResult(out_dir=out_dir, manifest=manifest, timings=stages.timings, model=model,
                        float_onnx_bytes=float_bytes)
