"""llmint8::linear: LLM.int8() linear, x [..., K], int8 weight [N, K] and fp32 scale [N] -> [..., N] in x's dtype.

The op the FX pass writes into graphs, fed from an Int8Weight. Its default implementation is the reference math;
`decompose` (in Inductor's decomposition table) replaces it while AOT autograd traces for Inductor, by device:
- CPU with the int8pass kernel (x86-64 with AVX2 and a C++ compiler): llmint8::cpu_linear (cpu_linear.py), one extern
  call that does the whole linear in C++;
- other CPUs (`linear_on_cpu`): the reference steps, with torch._int_mm for the GEMM and llmint8::outlier_matmul;
- Triton devices (`triton_linear`: CUDA, and CPU with Inductor's cpu_backend="triton"), by the number of rows of X:
  up to triton_gemm.FUSED_MAX_M (decode; known when compiling) llmint8::fused_linear, one kernel; more, or a dynamic count,
  llmint8::quantize_activation (two Triton launches, an extern call) then llmint8::int8_mm_dequant. Inductor lowers
  both GEMMs to templates that fuse the pointwise ops after them. Nothing syncs the host (safe under CUDA graphs).
The same functions are the op's eager CPU and CUDA kernels.
"""

from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from int8pass import reference
from int8pass.lowering import cpu_linear
from int8pass.lowering.checks import check_linear_args
from int8pass.lowering.inductor_api import HAS_TRITON, uses_triton


@torch.library.custom_op("llmint8::linear", mutates_args=())
def linear(
    x: torch.Tensor,
    weight_q: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: float,
    outlier_weight: torch.Tensor | None = None,
    code_sums: torch.Tensor | None = None,
) -> torch.Tensor:
    """`outlier_weight` (optional, [N, K] floating) replaces the dequantized weight for the outlier columns.
    `code_sums` (optional, int32 [N]) is each row's sum of weight_q, as Int8Weight keeps it: not part of the math,
    it saves the CPU kernel a pass over the weight on every call (cpu_linear.cpp)."""
    check_linear_args(x, weight_q, weight_scale, bias, code_sums)
    return reference.linear(x, weight_q, weight_scale, bias, threshold, outlier_weight)


@linear.register_fake
def _(x, weight_q, weight_scale, bias, threshold, outlier_weight=None, code_sums=None):
    check_linear_args(x, weight_q, weight_scale, bias, code_sums)
    return x.new_empty((*x.shape[:-1], weight_scale.shape[0]))


def linear_on_cpu(x, weight_q, weight_scale, bias, threshold, outlier_weight=None, code_sums=None):
    """llmint8::linear on CPU: the C++ kernel where it runs (cpu_linear.py), else the reference steps with
    torch._int_mm."""
    check_linear_args(x, weight_q, weight_scale, bias, code_sums)
    if cpu_linear.runs(x, weight_q):
        return torch.ops.llmint8.cpu_linear(x, weight_q, weight_scale, bias, threshold, outlier_weight, code_sums)
    x2d = x.reshape(-1, x.shape[-1])
    x_q, s_x, indices, count = reference.quantize_activation(x2d, threshold)
    # weight_q is [N, K] row-major, so its transpose is the column-major [K, N] operand _int_mm wants
    acc = torch._int_mm(x_q, weight_q.t()).float()
    outliers = torch.ops.llmint8.outlier_matmul(
        x2d, indices, count, weight_q if outlier_weight is None else outlier_weight, weight_scale)
    return reference.dequantize_output(x, acc, s_x, weight_scale, outliers, bias)


def triton_linear(x, weight_q, weight_scale, bias, threshold, outlier_weight=None, code_sums=None):
    """llmint8::linear on Triton devices: the single-kernel form for few rows, else quantization then the GEMM (which
    multiply signed codes, so need no code sums)."""
    from int8pass.lowering import triton_gemm  # Triton is optional: only Triton devices get here

    check_linear_args(x, weight_q, weight_scale, bias, code_sums)
    x2d = x.reshape(-1, weight_q.shape[1])
    if statically_known_true(x2d.shape[0] <= triton_gemm.FUSED_MAX_M):
        y = torch.ops.llmint8.fused_linear(x2d, weight_q, weight_scale, bias, threshold, outlier_weight)
    else:
        x_q, s_x, indices, count = torch.ops.llmint8.quantize_activation(x2d, threshold)
        y = torch.ops.llmint8.int8_mm_dequant(x2d, x_q, s_x, indices, count, weight_q, weight_scale, bias, outlier_weight)
    return y.reshape(*x.shape[:-1], weight_q.shape[0])


def decompose(x, weight_q, weight_scale, bias, threshold, outlier_weight=None, code_sums=None):
    """llmint8::linear as the ops Inductor compiles for x's device (NotImplemented: keep the op)."""
    if uses_triton(x.device):
        return triton_linear(x, weight_q, weight_scale, bias, threshold, outlier_weight, code_sums)
    if x.device.type == "cpu":
        return linear_on_cpu(x, weight_q, weight_scale, bias, threshold, outlier_weight, code_sums)
    return NotImplemented


def register_input_and_bias_grads(op, dequantize) -> None:
    """Gradients of an int8 linear op (x, weight_q, weight_scale, bias, then the rest of its arguments) for x and the
    bias (a frozen int8 weight with a trainable bias, or adapters trained on its output): through the weight
    `dequantize(weight_q, weight_scale, *the rest)` gives, as bitsandbytes' Linear8bitLt; the codes, the scales and
    the rest get none."""

    def setup_context(ctx, inputs, output):
        x, weight_q, weight_scale, bias, *rest = inputs
        ctx.save_for_backward(weight_q, weight_scale)
        ctx.rest, ctx.x_dtype, ctx.bias_dtype = rest, x.dtype, None if bias is None else bias.dtype

    def backward(ctx, grad):
        weight_q, weight_scale = ctx.saved_tensors
        grad_x = (grad.float() @ dequantize(weight_q, weight_scale, *ctx.rest)).to(ctx.x_dtype)
        grad_bias = None if ctx.bias_dtype is None else grad.reshape(-1, grad.shape[-1]).float().sum(0).to(ctx.bias_dtype)
        return grad_x, None, None, grad_bias, *(None for _ in ctx.rest)

    op.register_autograd(backward, setup_context=setup_context)


register_input_and_bias_grads(linear, lambda weight_q, weight_scale, *_: reference.dequantize_weight(weight_q, weight_scale))

# Eager calls use the same kernels.
torch.library.register_kernel("llmint8::linear", "cpu", linear_on_cpu)
if HAS_TRITON:
    torch.library.register_kernel("llmint8::linear", "cuda", triton_linear)
