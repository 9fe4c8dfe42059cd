"""llmint8::outlier_matmul: X[:, O] . W[:, O]^T in fp32 [M, N], the outlier columns' floating-point product.

Used by the CPU linear when the weight is dense or the outlier product takes the original weight; the eager
implementation (the reference math) is its kernel on every device.
"""

from __future__ import annotations

import torch

from int8pass import reference
from int8pass.lowering.checks import check_2d


@torch.library.custom_op("llmint8::outlier_matmul", mutates_args=())
def outlier_matmul(
    x: torch.Tensor,
    outlier_indices: torch.Tensor,
    outlier_count: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
) -> torch.Tensor:
    """X[:, O] . W[:, O]^T in fp32 [M, N]; int8 weights are dequantized with weight_scale / 127."""
    check_2d("outlier_matmul", x)
    return reference.outlier_matmul(x, outlier_indices, outlier_count, weight, weight_scale)


@outlier_matmul.register_fake
def _(x, outlier_indices, outlier_count, weight, weight_scale):
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.float32)
