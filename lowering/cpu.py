"""CPU path: llmint8::linear as fused Inductor code around torch._int_mm."""

from __future__ import annotations

import torch

from int8pass import reference


def _int_matmul(x_q: torch.Tensor, weight_q: torch.Tensor) -> torch.Tensor:
    # weight_q is [N, K] row-major, so its transpose is the column-major [K, N] operand oneDNN wants.
    return torch._int_mm(x_q, weight_q.t())


def decompose_linear(x, weight_q, weight_scale, bias, threshold, outlier_weight=None):
    """The reference math with its two matmuls swapped for kernels; everything else is traced as is.

    The column/row absmax, rounding and the dequantize-scale-bias epilogue become Inductor-fused loops; the
    outlier columns go through llmint8::outlier_matmul, which gathers only the few outlier columns.
    """
    if x.device.type != "cpu":
        return NotImplemented
    return reference.linear(
        x,
        weight_q,
        weight_scale,
        bias,
        threshold,
        outlier_weight,
        int_matmul=_int_matmul,
        outlier_product=torch.ops.llmint8.outlier_matmul,
    )


def decompositions() -> dict:
    """Inductor's decomposition table plus ours."""
    from torch._inductor.decomposition import select_decomp_table

    table = dict(select_decomp_table())
    table[torch.ops.llmint8.linear.default] = decompose_linear
    return table
