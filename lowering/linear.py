"""llmint8::linear: LLM.int8() linear, x [..., K], int8 weight [N, K] and fp32 scale [N] -> [..., N] in x's dtype.

The op the FX pass writes into graphs, fed from an Int8Weight. Its default implementation is the reference math;
`decompose` (in Inductor's decomposition table) replaces it while AOT autograd traces for Inductor, by device:
- CPU with dense codes and the AVX2 kernel: llmint8::avx2_linear (avx2_linear.py), one extern call that does the
  whole linear in C++;
- other CPU (`cpu_linear`): the reference quantization, which Inductor fuses into C++ loops, one oneDNN u8 x s8
  GEMM on the packed weight (onednn_int8_mm.py) and the dequantizing epilogue, fused by Inductor;
- Triton devices (`triton_linear`: CUDA, and CPU with Inductor's cpu_backend="triton"), by the number of rows of X:
  up to triton_gemm.FUSED_MAX_M (decode; known when compiling) llmint8::fused_linear, one kernel; more, or a dynamic count,
  llmint8::quantize_activation (two Triton launches, an extern call) then llmint8::int8_mm_dequant. Inductor lowers
  both GEMMs to templates that fuse the pointwise ops after them. Nothing syncs the host (safe under CUDA graphs).
The same two functions are the op's eager CPU and CUDA kernels.
"""

from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from int8pass import reference
from int8pass.lowering.checks import check_linear_args
from int8pass.lowering.inductor_api import HAS_TRITON, uses_triton
from int8pass.lowering import avx2_linear, onednn_int8_mm


@torch.library.custom_op("llmint8::linear", mutates_args=())
def linear(
    x: torch.Tensor,
    weight_q: torch.Tensor | None,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: float,
    outlier_weight: torch.Tensor | None = None,
    packed_handle: torch.Tensor | None = None,
) -> torch.Tensor:
    """A CPU weight packed for oneDNN has no dense codes: weight_q is None and packed_handle (int64 [1]) names its
    packed codes (int8pass.Int8Weight, onednn_int8_mm.py).
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


def cpu_linear(x, weight_q, weight_scale, bias, threshold, outlier_weight=None, packed_handle=None):
    """llmint8::linear on CPU: on dense codes where the AVX2 kernel runs, that one call (avx2_linear.py); else the
    reference steps, with the int8 GEMM done by oneDNN (packed codes, or a packed copy of dense ones) or, without
    oneDNN, by torch._int_mm.

    weight_q is None for a weight whose codes are kept only in oneDNN's layout (packed_handle names them)."""
    check_linear_args(x, weight_q, weight_scale, bias, packed_handle)
    if avx2_linear.runs(x, weight_q):
        return avx2_linear.linear(x, weight_q, weight_scale, bias, threshold, outlier_weight)
    x2d = x.reshape(-1, x.shape[-1])
    x_q, s_x, indices, count = reference.quantize_activation(x2d, threshold)
    outliers = None  # X[:, O] . W^[:, O]^T, from the dense codes (or outlier_weight) unless oneDNN reads them back
    if onednn_int8_mm.ONEDNN:
        shifted = (x_q.float() + onednn_int8_mm.ZERO_POINT).to(torch.uint8)  # via fp32: Inductor vectorizes this chain
        acc, code_outliers = torch.ops.llmint8.onednn_int8_mm(
            shifted, x2d, indices, count, weight_q, packed_handle, weight_scale.shape[0])
        if outlier_weight is None:
            outliers = code_outliers * (weight_scale / reference.Q_MAX)
    else:
        # weight_q is [N, K] row-major, so its transpose is the column-major [K, N] operand _int_mm wants
        acc = torch._int_mm(x_q, weight_q.t()).float()
    if outliers is None:
        outliers = torch.ops.llmint8.outlier_matmul(
            x2d, indices, count, weight_q if outlier_weight is None else outlier_weight, weight_scale)
    return reference.dequantize_output(x, acc, s_x, weight_scale, outliers, bias)


def triton_linear(x, weight_q, weight_scale, bias, threshold, outlier_weight=None, packed_handle=None):
    """llmint8::linear on Triton devices: the single-kernel form for few rows, else quantization then the GEMM."""
    from int8pass.lowering import triton_gemm  # Triton is optional: only Triton devices get here

    check_linear_args(x, weight_q, weight_scale, bias, packed_handle)
    if weight_q is None:  # a CPU weight packed for oneDNN, compiled with cpu_backend="triton": unpacked per call
        weight_q = torch.ops.llmint8.onednn_unpack(packed_handle, weight_scale.shape[0], x.shape[-1])
    x2d = x.reshape(-1, weight_q.shape[1])
    if statically_known_true(x2d.shape[0] <= triton_gemm.FUSED_MAX_M):
        y = torch.ops.llmint8.fused_linear(x2d, weight_q, weight_scale, bias, threshold, outlier_weight)
    else:
        x_q, s_x, indices, count = torch.ops.llmint8.quantize_activation(x2d, threshold)
        y = torch.ops.llmint8.int8_mm_dequant(x2d, x_q, s_x, indices, count, weight_q, weight_scale, bias, outlier_weight)
    return y.reshape(*x.shape[:-1], weight_q.shape[0])


def decompose(x, weight_q, weight_scale, bias, threshold, outlier_weight=None, packed_handle=None):
    """llmint8::linear as the ops Inductor compiles for x's device (NotImplemented: keep the op)."""
    if uses_triton(x.device):
        return triton_linear(x, weight_q, weight_scale, bias, threshold, outlier_weight, packed_handle)
    if x.device.type == "cpu":
        if avx2_linear.runs(x, weight_q):
            return torch.ops.llmint8.avx2_linear(x, weight_q, weight_scale, bias, threshold, outlier_weight)
        return cpu_linear(x, weight_q, weight_scale, bias, threshold, outlier_weight, packed_handle)
    return NotImplemented


# Eager calls use the same kernels (on CPU, they read the packed codes).
torch.library.register_kernel("llmint8::linear", "cpu", cpu_linear)
if HAS_TRITON:
    torch.library.register_kernel("llmint8::linear", "cuda", triton_linear)
