"""Inductor lowerings for the llmint8 custom ops.

Of int8pass this package knows the op contract (int8pass.ops), the reference math (int8pass.reference: the CPU path
decomposes into its quantization ops, which Inductor fuses) and nothing else; it never sees model structure or who
owns a weight. Inductor internals are used only through inductor_api.
`llmint8::linear` is decomposed while AOT autograd traces, by device:
- Triton devices (CUDA; CPU with Inductor's cpu_backend="triton"): llmint8::fused_linear (one kernel) for
  at most 16 rows, else activation quantization and llmint8::int8_mm_dequant; Inductor lowers both GEMMs
  to Triton templates with the following pointwise ops fused in (lowering/triton_path.py,
  lowering/int8_mm_template.py).
- CPU: the reference quantization (which Inductor fuses into C++ loops), one oneDNN u8 x s8 GEMM on a weight
  packed at compile time, and a fused dequantize/bias epilogue (lowering/cpu.py).
- Other devices: the op runs its eager implementation, the reference math.
"""

from __future__ import annotations

import torch

from int8pass.lowering import cpu
from int8pass.lowering import inductor_api
from int8pass.lowering.inductor_api import HAS_TRITON, uses_triton

if HAS_TRITON:
    from int8pass.lowering import triton_path


def packs_weights(device: torch.device) -> bool:
    """Whether int8 weights on `device` keep their codes in oneDNN's packed layout (what the CPU GEMM reads) rather
    than dense (what Triton kernels read). Call under the Inductor config the graph compiles with."""
    return device.type == "cpu" and cpu.ONEDNN and not uses_triton(device)


def decompose_linear(x, weight_q, weight_scale, bias, threshold, outlier_weight=None, packed_handle=None):
    if uses_triton(x.device):
        return triton_path.linear(x, weight_q, weight_scale, bias, threshold, outlier_weight, packed_handle)
    if x.device.type == "cpu":
        return cpu.linear(x, weight_q, weight_scale, bias, threshold, outlier_weight, packed_handle)
    return NotImplemented


def decompositions() -> dict:
    """Inductor's decomposition table plus ours."""
    table = dict(inductor_api.select_decomp_table())
    table[torch.ops.llmint8.linear.default] = decompose_linear
    return table


__all__ = ["decompositions", "packs_weights"]
