#!/usr/bin/env bash
# Build circuit-tracer 0.5.0's own environment in folder $1 (default .ct, git-ignored) for
# bench/agree_circuit_tracer.py: its wheels from PyPI, installed without dependencies into a plain folder
# used as PYTHONPATH over this project's Python (torch comes from here). circuit-tracer pins
# transformers <= 4.57.3, so it cannot share the project's environment.
set -euo pipefail
CT="${1:-.ct}"
PY="${PYTHON:-.venv/bin/python}"
VER="$("$PY" -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")')"
WHEELS="$(mktemp -d)"
"$PY" -m pip download -q --no-deps -d "$WHEELS" --python-version "$VER" --only-binary=:all: \
    circuit-tracer==0.5.0 transformer-lens==3.2.1 transformers==4.57.3 tokenizers==0.22.2 \
    huggingface_hub==0.36.2 datasets==3.6.0 dill multiprocess better-abc fancy-einsum beartype typeguard \
    nnsight zstandard pydantic pydantic-core annotated-types typing-inspection einops jaxtyping
"$PY" -m pip install -q --no-index --no-deps --target "$CT" "$WHEELS"/*.whl
PYTHONPATH="$CT" "$PY" -c "import transformer_lens, circuit_tracer.attribution.attribute; print('circuit-tracer ready in $CT')"
