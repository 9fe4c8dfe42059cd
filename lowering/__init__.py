"""Inductor lowerings for the llmint8 custom ops.

The ops (int8pass.ops) are the only thing this package knows of int8pass: it never sees model structure.
- CPU: `llmint8::linear` decomposes, while AOT autograd traces, into the reference quantization (which Inductor
  fuses into C++ loops), one oneDNN u8 x s8 GEMM on a weight packed at compile time, and a fused
  dequantize/bias epilogue (lowering/cpu.py).
- Other devices: the op stays in the graph and runs its eager implementation.
"""

from __future__ import annotations

from lowering.cpu import decompositions, prepare_weight

__all__ = ["decompositions", "prepare_weight"]
