"""Triton path: llmint8::linear as Triton kernels, with no host synchronisation (safe under CUDA graphs).

Used on CUDA, and on CPU when Inductor's cpu_backend is "triton". `linear` is both the decomposition applied
while AOT autograd traces and the eager CUDA kernel of llmint8::linear. By the number of rows of X:
- up to triton_gemm.FUSED_MAX_M (decode; known when compiling): llmint8::fused_linear, one kernel;
- more, or a dynamic count: llmint8::quantize_activation (two Triton launches, an extern call), then
  llmint8::int8_mm_dequant.
Inductor lowers fused_linear and int8_mm_dequant to templates that fuse the pointwise ops after them
(lowering/int8_mm_template.py); their eager CUDA kernels are in lowering/triton_gemm.py.
"""

from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from int8pass import ops
from int8pass.lowering import int8_mm_template, triton_gemm, triton_quantize  # noqa: F401  (registers the lowering)


def linear(x, weight_q, weight_scale, bias, threshold, outlier_weight=None, packed_handle=None):
    ops.check_linear_args(x, weight_q, weight_scale, bias, packed_handle)
    if weight_q is None:  # a CPU weight packed for oneDNN, compiled with cpu_backend="triton": unpacked per call
        weight_q = torch.ops.llmint8.onednn_unpack(packed_handle, weight_scale.shape[0], x.shape[-1])
    x2d = x.reshape(-1, weight_q.shape[1])
    if statically_known_true(x2d.shape[0] <= triton_gemm.FUSED_MAX_M):
        y = torch.ops.llmint8.fused_linear(x2d, weight_q, weight_scale, bias, threshold, outlier_weight)
    else:
        x_q, s_x, indices, count = torch.ops.llmint8.quantize_activation(x2d, threshold)
        y = torch.ops.llmint8.int8_mm_dequant(x2d, x_q, s_x, indices, count, weight_q, weight_scale, bias, outlier_weight)
    return y.reshape(*x.shape[:-1], weight_q.shape[0])


def _quantize_activation_cuda(x, threshold):
    return triton_quantize.quantize_activation(x, threshold)


def _int8_mm_dequant_cuda(x, x_q, s_x, indices, count, weight_q, weight_scale, bias, outlier_weight=None):
    ops.check_linear_args(x, weight_q, weight_scale, bias)
    return triton_gemm.int8_mm_dequant(x, x_q, s_x, indices, count, weight_q, weight_scale, bias, outlier_weight)


def _fused_linear_cuda(x, weight_q, weight_scale, bias, threshold, outlier_weight=None):
    ops.check_linear_args(x, weight_q, weight_scale, bias)
    return triton_gemm.fused_linear(x, weight_q, weight_scale, bias, threshold, outlier_weight)


torch.library.register_kernel("llmint8::quantize_activation", "cuda", _quantize_activation_cuda)
torch.library.register_kernel("llmint8::fused_linear", "cuda", _fused_linear_cuda)
torch.library.register_kernel("llmint8::int8_mm_dequant", "cuda", _int8_mm_dequant_cuda)
torch.library.register_kernel("llmint8::linear", "cuda", linear)
