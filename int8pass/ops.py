"""The llmint8 custom ops: the contract between the FX pass (int8pass/) and the lowerings (lowering/).

Each op has a fake implementation (static output shapes: the outlier set is an index buffer of length K plus
a count tensor) and a device-generic eager implementation that is the reference math. The compiled paths
replace the eager implementations: on CPU by decomposing `llmint8::linear` into fused Inductor code, on CUDA
with Triton templates.
"""

from __future__ import annotations

import torch

from int8pass import reference, stats

NAMESPACE = "llmint8"


@torch.library.custom_op(f"{NAMESPACE}::quantize_activation", mutates_args=())
def quantize_activation(x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """X [M, K] -> (X_q int8 [M, K], s_x fp32 [M], outlier indices int32 [K], outlier count int32 [1])."""
    _check_2d("quantize_activation", x)
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


@torch.library.custom_op(f"{NAMESPACE}::outlier_matmul", mutates_args=())
def outlier_matmul(
    x: torch.Tensor,
    outlier_indices: torch.Tensor,
    outlier_count: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
) -> torch.Tensor:
    """X[:, O] . W[:, O]^T in fp32 [M, N]; int8 weights are dequantized with weight_scale / 127."""
    _check_2d("outlier_matmul", x)
    return reference.outlier_matmul(x, outlier_indices, outlier_count, weight, weight_scale)


@outlier_matmul.register_fake
def _(x, outlier_indices, outlier_count, weight, weight_scale):
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.float32)


@torch.library.custom_op(f"{NAMESPACE}::int8_mm_dequant", mutates_args=())
def int8_mm_dequant(
    x: torch.Tensor,
    x_q: torch.Tensor,
    s_x: torch.Tensor,
    outlier_indices: torch.Tensor,
    outlier_count: torch.Tensor,
    weight_q: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    outlier_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The GEMM after quantize_activation: (X_q . W_q^T) s_x s_w / 127^2 + X[:, O] . W[:, O]^T + b -> [M, N].

    In X's dtype, rounded once. The outlier weight is W^ (dequantized codes) unless `outlier_weight` is given.
    On Triton devices Inductor lowers this op to a template that fuses the following pointwise ops.
    """
    _check_2d("int8_mm_dequant", x)
    check_linear_args(x, weight_q, weight_scale, bias)
    return reference.int8_mm_dequant(
        x, x_q, s_x, outlier_indices, outlier_count, weight_q, weight_scale, bias, outlier_weight
    )


@int8_mm_dequant.register_fake
def _(x, x_q, s_x, outlier_indices, outlier_count, weight_q, weight_scale, bias, outlier_weight=None):
    check_linear_args(x, weight_q, weight_scale, bias)
    return x.new_empty((x.shape[0], weight_q.shape[0]))


@torch.library.custom_op(f"{NAMESPACE}::fused_linear", mutates_args=())
def fused_linear(
    x: torch.Tensor,
    weight_q: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: float,
    outlier_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """llmint8::linear of a 2-D X [M, K] with few rows, as one kernel on Triton devices (quantization, GEMM
    and epilogue): what a decode step runs. Inductor fuses the following pointwise ops into it too."""
    _check_2d("fused_linear", x)
    check_linear_args(x, weight_q, weight_scale, bias)
    return reference.linear(x, weight_q, weight_scale, bias, threshold, outlier_weight)


@fused_linear.register_fake
def _(x, weight_q, weight_scale, bias, threshold, outlier_weight=None):
    check_linear_args(x, weight_q, weight_scale, bias)
    return x.new_empty((x.shape[0], weight_q.shape[0]))


@torch.library.custom_op(f"{NAMESPACE}::linear", mutates_args=())
def linear(
    x: torch.Tensor,
    weight_q: torch.Tensor | None,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: float,
    outlier_weight: torch.Tensor | None = None,
    packed_handle: torch.Tensor | None = None,
) -> torch.Tensor:
    """LLM.int8() linear: x [..., K], weight_q int8 [N, K], weight_scale fp32 [N] -> [..., N] in x's dtype.

    A CPU weight packed for oneDNN has no dense codes: weight_q is None and packed_handle (int64 [1]) names its
    packed codes (int8pass.Int8Weight, int8pass.lowering.cpu).
    `outlier_weight` (optional, [N, K] floating) replaces the dequantized weight for the outlier columns.
    """
    check_linear_args(x, weight_q, weight_scale, bias, packed_handle)
    if weight_q is None:
        raise ValueError(f"llmint8::linear on {x.device.type}: int8 weights packed for oneDNN run only on the CPU")
    return reference.linear(x, weight_q, weight_scale, bias, threshold, outlier_weight)


@linear.register_fake
def _(x, weight_q, weight_scale, bias, threshold, outlier_weight=None, packed_handle=None):
    check_linear_args(x, weight_q, weight_scale, bias, packed_handle)
    return x.new_empty((*x.shape[:-1], weight_scale.shape[0]))


@torch.library.custom_op(f"{NAMESPACE}::record_outliers", mutates_args=())
def record_outliers(x: torch.Tensor, threshold: float, layer: str) -> None:
    """Record X's outlier columns for `layer` (int8pass.stats): the node the FX pass adds before a linear when
    options={"stats": True}. A host sync on GPUs; its only effect is the record, so it is marked side-effecting."""
    stats.record(layer, x, threshold)


@record_outliers.register_fake
def _(x, threshold, layer):
    return None


torch.fx.node.has_side_effect(torch.ops.llmint8.record_outliers.default)


def _check_2d(op: str, x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"llmint8::{op} expects a 2-D activation [M, K], got shape {tuple(x.shape)}")


def check_linear_args(x, weight_q, weight_scale, bias, packed_handle=None) -> None:
    """Clear errors for llmint8::linear arguments; every implementation of the op calls this.

    weight_q None (codes packed for oneDNN, named by packed_handle): N is the scale's length, K is x's last dim."""
    if (weight_q is None) == (packed_handle is None):
        raise ValueError("llmint8::linear takes either the dense int8 codes or the handle of packed ones, not "
                         f"{'both' if weight_q is not None else 'neither'}")
    if weight_q is None:
        n, k = weight_scale.shape[0], x.shape[-1]
    elif weight_q.dtype != torch.int8 or weight_q.dim() != 2:
        raise ValueError(f"llmint8::linear expects an int8 [N, K] weight, got {weight_q.dtype} {tuple(weight_q.shape)}")
    else:
        n, k = weight_q.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"llmint8::linear: activation shape {tuple(x.shape)} does not end in K={k}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"llmint8::linear expects a floating-point activation, got {x.dtype}")
    if weight_scale.shape != (n,) or weight_scale.dtype != torch.float32:
        raise ValueError(f"llmint8::linear expects an fp32 [{n}] weight scale, got {weight_scale.dtype} {tuple(weight_scale.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"llmint8::linear expects a bias of shape ({n},), got {tuple(bias.shape)}")
