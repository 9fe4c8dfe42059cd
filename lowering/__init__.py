"""Inductor lowerings for the llmint8 custom ops.

The ops (int8pass.ops) are the only thing this package knows of int8pass: it never sees model structure.
- CPU: `llmint8::linear` decomposes, while AOT autograd traces, into the reference quantization (which Inductor
  fuses into C++ loops), one oneDNN u8 x s8 GEMM on a weight packed at compile time, and a fused
  dequantize/bias epilogue (lowering/cpu.py).
- CUDA (when Triton is installed): the op stays in the graph and runs as Triton kernels (lowering/cuda.py).
- Other devices: the op runs its eager implementation, the reference math.
"""

from __future__ import annotations

import importlib.util

from lowering.cpu import decompositions, prepare_weight

if importlib.util.find_spec("triton") is not None:
    from lowering import cuda  # noqa: F401  (registers the CUDA kernel of llmint8::linear)

__all__ = ["decompositions", "prepare_weight"]
