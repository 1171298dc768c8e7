"""The causal-LM export folder's file names and I/O dimension names: what other runtimes rely on.

One layout every runtime loads unchanged (docs/runtimes.md):

* ``onnx/model.onnx`` + ``onnx/model.onnx_data`` (``_1``, ``_2``, ... when split): the names
  transformers.js looks for (dtype ``fp32``: no file-name suffix) and that onnxruntime (Python,
  C, C#, Java, onnxruntime-node) resolves next to the graph; ``genai_config.json`` names the
  graph by its path in the folder, which onnxruntime-genai accepts.
* Every data file stays below `DATA_FILE_LIMIT`: a browser fetches each into one ArrayBuffer,
  and onnxruntime-web (through transformers.js) is told how many files there are by
  ``config.json``'s ``transformers.js_config.use_external_data_format``.
* The symbolic dims carry the names transformers.js resolves when it sizes an empty KV cache
  from the model's input metadata (an unknown name becomes 0, and GroupQueryAttention then
  refuses a batch of 0).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MODEL_SUBDIR = "onnx"
MODEL_NAME = "model.onnx"
MODEL_FILE = f"{MODEL_SUBDIR}/{MODEL_NAME}"
# transformers.js' chunk names: model.onnx_data, model.onnx_data_1, model.onnx_data_2, ...
DATA_SUFFIX = "_data"
# Below the 2 GB (2^31 bytes) a browser can hold in one ArrayBuffer / fetch, with room to spare.
DATA_FILE_LIMIT = 2_000_000_000
# What transformers.js calls the export's weights: "fp32" picks model.onnx (no suffix); the
# MatMulNBits weights inside are whatever the export's bits say.
TRANSFORMERS_JS_DTYPE = "fp32"
# The t of each linear folded into another linear's rows (float32 [K] per linear, named by the
# linear): no ONNX tensor keeps it, and `validate` needs it to check both linears against the
# source weights. Runtimes never read it.
FOLDED_T_FILE = "sinq_folded_t.safetensors"
TRANSFORMERS_JS_KEY = "transformers.js_config"

# The builder's names for the decoder's dynamic dims -> the names the runtimes share.
DIM_NAMES: Mapping[str, str] = {
    "batch": "batch_size",
    "sequence_len": "sequence_length",
    "past_sequence_len": "past_sequence_length",
    "past_seq_len + seq_len": "total_sequence_length",
    "past_sequence_len + sequence_len": "total_sequence_length",
}


def data_file_names(model_name: str, count: int) -> list[str]:
    """The external-data file names for ``count`` chunks of ``model_name`` (transformers.js'
    convention: the first has no number)."""
    return [f"{model_name}{DATA_SUFFIX}" + (f"_{i}" if i else "") for i in range(count)]


def transformers_js_config(data_files: int) -> dict[str, Any]:
    """``config.json``'s ``transformers.js_config``: which dtype to load and how many data files
    the browser must fetch next to the graph."""
    return {"dtype": TRANSFORMERS_JS_DTYPE,
            "use_external_data_format": {MODEL_NAME: data_files}}


def add_transformers_js_config(config_file: Path, data_files: int) -> None:
    """Add the ``transformers.js_config`` section to a copied ``config.json`` (other keys and
    their order kept; Python transformers ignores the section)."""
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config[TRANSFORMERS_JS_KEY] = transformers_js_config(data_files)
    config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
