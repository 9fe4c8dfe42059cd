"""Triton path: llmint8::linear as activation quantization plus one GEMM, with no host synchronisation.

Used on CUDA, and on CPU when Inductor's cpu_backend is "triton". `linear` is both the decomposition applied
while AOT autograd traces and the eager CUDA kernel of llmint8::linear:
- llmint8::quantize_activation: Triton kernels on CUDA (lowering/triton_quantize.py), an extern call;
- llmint8::int8_mm_dequant: Inductor lowers it to a template that fuses the pointwise ops after it
  (lowering/int8_mm_template.py); its eager CUDA kernel is lowering/triton_gemm.py. The outlier loop
  reads its bound on the device, so both are safe under CUDA graphs.
"""

from __future__ import annotations

import torch

from int8pass import ops, stats
from lowering import int8_mm_template, triton_gemm, triton_quantize  # noqa: F401  (registers the lowering)


def linear(x, weight_q, weight_scale, bias, threshold, outlier_weight=None, stats_id=-1):
    ops.check_linear_args(x, weight_q, weight_scale, bias)
    x2d = x.reshape(-1, weight_q.shape[1])
    x_q, s_x, indices, count = torch.ops.llmint8.quantize_activation(x2d, threshold, stats_id)
    y = torch.ops.llmint8.int8_mm_dequant(x2d, x_q, s_x, indices, count, weight_q, weight_scale, bias, outlier_weight)
    return y.reshape(*x.shape[:-1], weight_q.shape[0])


def _quantize_activation_cuda(x, threshold, stats_id=-1):
    quantized = triton_quantize.quantize_activation(x, threshold)
    stats.record_indices(stats_id, quantized[2], quantized[3])  # opt-in: one device-to-host copy
    return quantized


def _int8_mm_dequant_cuda(x, x_q, s_x, indices, count, weight_q, weight_scale, bias, outlier_weight=None):
    ops.check_linear_args(x, weight_q, weight_scale, bias)
    return triton_gemm.int8_mm_dequant(x, x_q, s_x, indices, count, weight_q, weight_scale, bias, outlier_weight)


torch.library.register_kernel("llmint8::quantize_activation", "cuda", _quantize_activation_cuda)
torch.library.register_kernel("llmint8::int8_mm_dequant", "cuda", _int8_mm_dequant_cuda)
torch.library.register_kernel("llmint8::linear", "cuda", linear)
