"""llmint8::quantize_activation: X [M, K] -> (X_q int8 [M, K], s_x fp32 [M], outlier indices int32 [K], count int32 [1]).

The first step of the two-step linear on Triton devices. The eager implementation is the reference math; on CUDA the
kernel is two Triton launches (triton_quantize.py), with the outlier count kept on the device.
"""

from __future__ import annotations

import torch

from int8pass import reference
from int8pass.lowering.checks import check_2d
from int8pass.lowering.inductor_api import HAS_TRITON


@torch.library.custom_op("llmint8::quantize_activation", mutates_args=())
def quantize_activation(x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """X [M, K] -> (X_q int8 [M, K], s_x fp32 [M], outlier indices int32 [K], outlier count int32 [1])."""
    check_2d("quantize_activation", x)
    return reference.quantize_activation(x, threshold)


@quantize_activation.register_fake
def _(x, threshold):
    m, k = x.shape
    return (
        x.new_empty((m, k), dtype=torch.int8),
        x.new_empty((m,), dtype=torch.float32),
        x.new_empty((k,), dtype=torch.int32),
        x.new_empty((1,), dtype=torch.int32),
    )


if HAS_TRITON:
    from int8pass.lowering import triton_quantize

    torch.library.register_kernel("llmint8::quantize_activation", "cuda", triton_quantize.quantize_activation)
