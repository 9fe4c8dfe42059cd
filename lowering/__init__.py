"""The llmint8 custom ops, one file each: its schema, fake implementation, eager implementation (the reference math),
device kernels and Inductor lowering.

    linear.py               llmint8::linear, what the FX pass writes; decomposed by device while AOT autograd traces
    quantize_activation.py  llmint8::quantize_activation   (Triton devices: the two-step linear's first step)
    int8_mm_dequant.py      llmint8::int8_mm_dequant       (its GEMM, lowered to a Triton template)
    fused_linear.py         llmint8::fused_linear          (few rows: one kernel, lowered to a Triton template)
    outlier_matmul.py       llmint8::outlier_matmul        (the outlier columns' floating-point product)
    cpu_int8_mm.py          llmint8::cpu_int8_mm           (the CPU GEMM on dense codes, AVX2 without VNNI; a C++ kernel)
    onednn_int8_mm.py       llmint8::onednn_int8_mm        (the CPU GEMM on the oneDNN-packed weight, VNNI or AMX)
    onednn_unpack.py        llmint8::onednn_unpack         (dense codes of a packed weight)
    record_outliers.py      llmint8::record_outliers       (runtime statistics, only with stats=True)

Beside them: checks.py (argument checks every implementation shares), templates.py (what the two Triton templates
share), triton_gemm.py and triton_quantize.py (the Triton kernels and their tile functions), inductor_api.py (every
Inductor internal used). Of int8pass this package knows the reference math (int8pass.reference) and the statistics
recorder (int8pass.stats), nothing else: it never sees model structure or who owns a weight.
"""

from __future__ import annotations

import torch

from int8pass.lowering import (  # noqa: F401  (each import registers its op)
    cpu_int8_mm,
    fused_linear,
    int8_mm_dequant,
    linear,
    onednn_int8_mm,
    onednn_unpack,
    outlier_matmul,
    quantize_activation,
    record_outliers,
)
from int8pass.lowering import inductor_api
from int8pass.lowering.inductor_api import uses_triton


def packs_weights(device: torch.device) -> bool:
    """Whether int8 weights on `device` keep their codes in oneDNN's packed layout rather than dense: on CPUs whose
    oneDNN int8 GEMM is exact in one pass (VNNI, AMX), or where our AVX2 kernel cannot run. Dense codes feed
    llmint8::cpu_int8_mm and the Triton kernels. Call under the Inductor config the graph compiles with."""
    if device.type != "cpu" or uses_triton(device) or not onednn_int8_mm.ONEDNN:
        return False
    return onednn_int8_mm.EXACT_U8_GEMM or not cpu_int8_mm.available()


# llmint8::linear is decomposed by device while AOT autograd traces for Inductor. Registered in Inductor's own table
# (not passed to compile_fx), so that its FX graph cache can key and reuse llmint8 graphs: a table passed in is part
# of the key and cannot be pickled. The op appears only in graphs of int8 weights.
inductor_api.register_decomposition(torch.ops.llmint8.linear.default)(linear.decompose)

__all__ = ["packs_weights"]
