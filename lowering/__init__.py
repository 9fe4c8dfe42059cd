"""The llmint8 custom ops, one file each: its schema, fake implementation, eager implementation (the reference math),
device kernels and Inductor lowering.

    linear.py               llmint8::linear, what the FX pass writes; decomposed by device while AOT autograd traces
    linear_group.py         llmint8::linear_group          (linears of one activation, as one op: on CPU one call of
                                                            llmint8::cpu_linear_group, else one linear each)
    block_linear.py         llmint8::block_linear          (block mode, docs/design.md §1b: the CPU kernel's
                                                            llmint8::cpu_block_linear, else the reference math)
    block_linear_group.py   llmint8::block_linear_group    (block-mode linears of one activation: on CPU one call of
                                                            llmint8::cpu_block_linear_group, else one each)
    cpu_linear.py           llmint8::cpu_linear            (the CPU linear in one C++ call: cpu_linear.cpp, registered
                                                            with TORCH_LIBRARY, and its kernels, cpu_linear_kernels.h)
    quantize_activation.py  llmint8::quantize_activation   (Triton devices: the two-step linear's first step)
    int8_mm_dequant.py      llmint8::int8_mm_dequant       (its GEMM, lowered to a Triton template)
    fused_linear.py         llmint8::fused_linear          (few rows: one kernel, lowered to a Triton template)
    outlier_matmul.py       llmint8::outlier_matmul        (the outlier columns' floating-point product)
    record_outliers.py      llmint8::record_outliers       (runtime statistics, only with stats=True)

Beside them: checks.py (argument checks every implementation shares), templates.py (what the two Triton templates
share), triton_gemm.py and triton_quantize.py (the Triton kernels and their tile functions), inductor_api.py (every
Inductor internal used). Of int8pass this package knows the reference math (int8pass.reference) and the statistics
recorder (int8pass.stats), nothing else: it never sees model structure or who owns a weight.
"""

from __future__ import annotations

import torch

from int8pass.lowering import (  # noqa: F401  (each import registers its op)
    block_linear,
    block_linear_group,
    cpu_linear,
    fused_linear,
    int8_mm_dequant,
    linear,
    linear_group,
    outlier_matmul,
    quantize_activation,
    record_outliers,
)
from int8pass.lowering import inductor_api


def cpu_path() -> str:
    """How CPU linears run on this machine: the C++ kernel and the GEMM it picks for decode and for prefill, or the
    reference steps with torch._int_mm. A fact of the machine, and part of the graph-cache key (it decides whether
    a compiled linear is one extern call or Inductor's own loops)."""
    if not cpu_linear.available():
        return "reference steps with torch._int_mm (no int8pass CPU kernel)"
    return f"int8pass CPU kernel: {cpu_linear.kernel(1, 4096)} GEMM for 1 row, {cpu_linear.kernel(512, 4096)} for 512"


# llmint8::linear is decomposed by device while AOT autograd traces for Inductor. Registered in Inductor's own table
# (not passed to compile_fx), so that its FX graph cache can key and reuse llmint8 graphs: a table passed in is part
# of the key and cannot be pickled. The op appears only in graphs of int8 weights.
inductor_api.register_decomposition(torch.ops.llmint8.linear.default)(linear.decompose)
inductor_api.register_decomposition(torch.ops.llmint8.linear_group.default)(linear_group.decompose)
inductor_api.register_decomposition(torch.ops.llmint8.block_linear.default)(block_linear.decompose)
inductor_api.register_decomposition(torch.ops.llmint8.block_linear_group.default)(block_linear_group.decompose)

__all__ = ["cpu_path"]
