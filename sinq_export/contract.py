"""The names an export folder promises to the runtimes and to `validate`: one home for each.

Everything here is read by other programs (onnxruntime, onnxruntime-genai, transformers.js,
our own validator on a folder written by an older version), so a change to a value is a change
of the export format (docs/export-format.md), not a refactoring.

Folder layout of a causal-LM export, loaded unchanged by every runtime (docs/runtimes.md):

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

# ----------------------------------------------------------------------------- the custom op
# ``sinq.ops::SinqMatMulNBits``: what the native library registers and the exporter emits.
CUSTOM_DOMAIN = "sinq.ops"
CUSTOM_OP = "SinqMatMulNBits"
CUSTOM_OPSET_VERSION = 1
# Inputs in order; all after ``scales`` are optional (an empty name stands for one left out
# before a present one). MatMulNBits takes the same first four.
CUSTOM_OP_INPUTS = ("A", "B", "scales", "zero_points", "col_scale", "bias")
INPUT_A, INPUT_B, INPUT_SCALES, INPUT_ZERO_POINTS, INPUT_COL_SCALE, INPUT_BIAS = range(6)
# MatMulNBits' own inputs after the first four (A, B, scales, zero_points).
MATMUL_NBITS_G_IDX, MATMUL_NBITS_BIAS = 4, 5
# The native library's file names (built into the package folder, copied into no export).
CUSTOM_OP_LIBRARY = "libsinq_ops.so"
CUSTOM_OP_CUDA_LIBRARY = "libsinq_ops_cuda.so"

# onnxruntime's contrib ops the quantized nodes use where the stock kernels can run them.
STOCK_DOMAIN = "com.microsoft"
STOCK_OP = "MatMulNBits"
EMBEDDING_OP = "GatherBlockQuantized"
# A quantized table gathered with standard ONNX ops (Gather of the packed rows, then their
# dequantization): the same tensors, for runtimes without the contrib op.
STANDARD_TABLE_OP = "Gather"
STANDARD_DOMAIN = ""  # ONNX's own ops
TABLE_OPS = (EMBEDDING_OP, STANDARD_TABLE_OP)
QUANT_OPS = (STOCK_OP, CUSTOM_OP)

# ----------------------------------------------------------------------------- files
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
TRANSFORMERS_JS_KEY = "transformers.js_config"
# The t of each linear folded into another linear's rows (float32 [K] per linear, named by the
# linear): no ONNX tensor keeps it, and `validate` needs it to check both linears against the
# source weights. Runtimes never read it.
FOLDED_T_FILE = "sinq_folded_t.safetensors"
# An exported module (not a causal LM) keeps the graph at the folder's root, one data file.
MODULE_ONNX_FILE = "model.onnx"
MODULE_DATA_FILE = f"{MODULE_ONNX_FILE}.data"
# ``--with-reference``: the PyTorch model `validate` compares against when the source is gone.
REFERENCE_DIR = "reference"

# ----------------------------------------------------------------------------- the manifest
MANIFEST_FILE = "sinq_export.json"
# Bumped when a reader of an older manifest would misread the new one.
FORMAT_VERSION = 2
# The keys every manifest has: what makes a folder recognisably our export.
MANIFEST_KEYS = ("format_version", "kind", "config", "layers")

# ----------------------------------------------------------------------------- models
# model_type -> the transformers class, for every family with tiny-model parity tests
# (tests/test_architectures.py); `export.families` holds the per-family fixes around mobius.
SUPPORTED_MODELS: Mapping[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(SUPPORTED_MODELS)
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(SUPPORTED_MODELS.values())

# ----------------------------------------------------------------------------- graph I/O
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


def custom_op_inputs(values: Mapping[str, Any]) -> list[Any]:
    """``values`` (by input name) in the custom op's input order, None where one is left out,
    the trailing left-out ones dropped. MatMulNBits reads the same first four."""
    unknown = sorted(set(values) - set(CUSTOM_OP_INPUTS))
    if unknown:
        raise ValueError(f"{CUSTOM_OP} has no input {unknown[0]!r}; inputs: {', '.join(CUSTOM_OP_INPUTS)}")
    ordered = [values.get(name) for name in CUSTOM_OP_INPUTS]
    while ordered and ordered[-1] is None:
        ordered.pop()
    return ordered
