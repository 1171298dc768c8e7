"""Causal-LM route: HF folder -> optimum float graph -> SINQ rewrite -> OUT_DIR.

Why this route (see also docs/export-format.md):

* **Graph source: optimum-onnx 0.1.0** (``text-generation-with-past``). It runs with the
  transformers we pin (4.57; optimum-onnx 0.1.0 requires < 4.58), produces the KV-cache
  interface every consumer here understands (``ORTModelForCausalLM``, onnxruntime-genai with
  ``past_present_share_buffer=false``) and exports SmolLM2 in ~30 s. onnxruntime-genai's model
  builder emits faster fused graphs (GroupQueryAttention, SkipSimplifiedLayerNorm) but needs
  transformers >= 5, which optimum-onnx and our pinned stack refuse; a dynamo export with a
  custom op is possible but slower to export and less mature for decoders.
* **Rewrite, not re-trace.** The float graph is exported once; every ``MatMul`` whose
  constant weight hashes to a quantized torch Linear is swapped for MatMulNBits built from
  that layer's `QuantizedWeight` (see `rewrite`). The packed tensors in the graph are the very
  tensors `SinqLinear` computes with, and the float export can be reused across bit widths
  (``float_export_dir``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path

import onnx

from ..config import SinqConfig
from ..io import check_output, read_json, scratch_dir, write_json
from ..models import hub_offline
from .genai import genai_config
from .graph import ExportError
from .manifest import MANIFEST_MARKER, ONNX_FILE, ExportResult, versions
from .pipeline import linear_fingerprints, quantize_rewrite_write
from .stages import Stages

TASK = "text-generation-with-past"
FLOAT_STAMP = "sinq_float_export.json"
_ONNX_SUFFIXES = (".onnx", ".onnx_data", ".data")


def export_float_causal_lm(model_dir: str | os.PathLike, float_dir: str | os.PathLike) -> Path:
    """optimum's float export of ``model_dir`` into ``float_dir`` (reused when already there).

    The stamp file records the source folder name and the versions that made it; a stale or
    foreign folder is exported again. A mismatching graph is also caught later: every
    quantized weight must be found in it by content hash.
    """
    from optimum.exporters.onnx import main_export

    model_dir, float_dir = Path(model_dir), Path(float_dir)
    stamp = {"source": model_dir.name, "task": TASK, "versions": versions()}
    stamp_file = float_dir / FLOAT_STAMP
    if stamp_file.is_file():
        if (float_dir / ONNX_FILE).is_file() and read_json(stamp_file) == json.loads(json.dumps(stamp)):
            return float_dir
        shutil.rmtree(float_dir)  # ours (stamped) but stale: safe to replace
    elif float_dir.exists() and any(float_dir.iterdir()):
        raise ExportError(
            f"{float_dir} exists and is not a float export made by sinq-export (no {FLOAT_STAMP}); "
            "pass a new or empty folder"
        )
    with hub_offline(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer / deprecation chatter from torch.onnx and transformers
        main_export(str(model_dir), str(float_dir), task=TASK, device="cpu", do_validation=False,
                    local_files_only=True, library_name="transformers")
    write_json(stamp_file, stamp)
    return float_dir


def _copy_hf_files(float_dir: Path, dest: Path) -> None:
    """config, generation config, tokenizer, chat template: everything but the ONNX files."""
    for path in sorted(float_dir.iterdir()):
        if path.is_file() and not path.name.endswith(_ONNX_SUFFIXES) and path.name != FLOAT_STAMP:
            shutil.copyfile(path, dest / path.name)


def _file_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.endswith(_ONNX_SUFFIXES))


def export_causal_lm(
    model_dir: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    config: SinqConfig | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    reference: bool = True,
    float_export_dir: str | os.PathLike | None = None,
) -> ExportResult:
    """Quantize a HF causal LM with SINQ and write OUT_DIR (docs/export-format.md).

    ``model_dir=None`` uses the bundled SmolLM2-135M-Instruct. ``float_export_dir`` keeps (or
    reuses) optimum's float export there, saving ~30 s on re-exports of the same model.
    ``reference=False`` skips ``OUT_DIR/reference`` (the PyTorch model the validator needs).
    """
    from ..models import default_model_dir, load_causal_lm

    config = config or SinqConfig()
    out_dir = Path(out_dir)
    folder = default_model_dir() if model_dir is None else Path(model_dir).expanduser()
    check_output(out_dir, overwrite=overwrite, marker=MANIFEST_MARKER, protect=[folder])
    names = ["load", "float_export", "quantize", "rewrite", "write", "check"]
    stages = Stages(names, progress=progress)
    try:
        with stages.stage("load"):
            model, tokenizer = load_causal_lm(folder)
            fingerprints = linear_fingerprints(model, config)
        with contextlib.ExitStack() as stack:
            with stages.stage("float_export"):
                if float_export_dir is None:
                    tmp = stack.enter_context(scratch_dir(out_dir))
                    float_dir = export_float_causal_lm(folder, tmp / "float")
                else:
                    float_dir = export_float_causal_lm(folder, float_export_dir)
            graph = onnx.load(str(float_dir / ONNX_FILE))
            float_bytes = _file_bytes(float_dir)

            def hf_files(tmp_out: Path) -> None:
                _copy_hf_files(float_dir, tmp_out)
                write_json(tmp_out / "genai_config.json",
                           genai_config(model.config, getattr(model, "generation_config", None)))

            manifest = quantize_rewrite_write(
                model, graph, fingerprints, config, stages, out_dir, kind="causal-lm",
                source=folder.name, overwrite=overwrite, reference=reference, progress=progress,
                tokenizer=tokenizer, extra_files=hf_files, protect=[folder],
            )
    finally:
        stages.close()
    return ExportResult(out_dir=out_dir, manifest=manifest, timings=stages.timings, model=model,
                        tokenizer=tokenizer, float_onnx_bytes=float_bytes)
