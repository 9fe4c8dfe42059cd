"""The llmint8 custom ops, one file each: its schema, fake implementation, eager implementation (the reference math),
device kernels and Inductor lowering.

    linear.py               llmint8::linear, what the FX pass writes; decomposed by device while AOT autograd traces
    avx2_linear.py          llmint8::avx2_linear           (the CPU linear on dense codes, AVX2 without VNNI: one C++ call)
    quantize_activation.py  llmint8::quantize_activation   (Triton devices: the two-step linear's first step)
    int8_mm_dequant.py      llmint8::int8_mm_dequant       (its GEMM, lowered to a Triton template)
    fused_linear.py         llmint8::fused_linear          (few rows: one kernel, lowered to a Triton template)
    outlier_matmul.py       llmint8::outlier_matmul        (the outlier columns' floating-point product)
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
    avx2_linear,
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


def _cpu_packs() -> bool:
    """Whether this CPU's linears run oneDNN's GEMM on packed codes: where it is exact in one pass (VNNI, AMX), or
    where our AVX2 kernel cannot run."""
    return onednn_int8_mm.ONEDNN and (onednn_int8_mm.EXACT_U8_GEMM or not avx2_linear.available())


def packs_weights(device: torch.device) -> bool:
    """Whether int8 weights on `device` keep their codes in oneDNN's packed layout rather than dense (_cpu_packs).
    Dense codes feed the AVX2 kernel (avx2_linear.py) and the Triton kernels. Call under the Inductor config the
    graph compiles with."""
    return device.type == "cpu" and not uses_triton(device) and _cpu_packs()


def cpu_gemm() -> str:
    """The int8 GEMM that CPU linears with new weights run on this machine (it decides how they are compiled; a fact
    of the machine, whatever the Inductor config)."""
    if _cpu_packs():
        return "oneDNN u8s8 (packed codes)" + ("" if onednn_int8_mm.EXACT_U8_GEMM else ", rows split in two: no VNNI")
    return "int8pass AVX2 kernel (dense codes)" if avx2_linear.available() else "torch._int_mm (dense codes)"


# llmint8::linear is decomposed by device while AOT autograd traces for Inductor. Registered in Inductor's own table
# (not passed to compile_fx), so that its FX graph cache can key and reuse llmint8 graphs: a table passed in is part
# of the key and cannot be pickled. The op appears only in graphs of int8 weights.
inductor_api.register_decomposition(torch.ops.llmint8.linear.default)(linear.decompose)

__all__ = ["cpu_gemm", "packs_weights"]
