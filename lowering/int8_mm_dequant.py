"""llmint8::int8_mm_dequant: the GEMM after quantize_activation,
(X_q . W_q^T) s_x s_w / 127^2 + X[:, O] . W[:, O]^T + b -> [M, N] in X's dtype, rounded once.

The eager implementation is the reference math; on CUDA the kernel is triton_gemm.int8_mm_dequant. Inductor lowers the
op to a Triton template (below) that fuses the pointwise ops after it.
"""

from __future__ import annotations

import torch

from int8pass import reference
from int8pass.lowering import inductor_api as inductor
from int8pass.lowering import templates
from int8pass.lowering.checks import check_2d, check_linear_args


@torch.library.custom_op("llmint8::int8_mm_dequant", mutates_args=())
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
    """The outlier weight is W^ (dequantized codes) unless `outlier_weight` is given."""
    check_2d("int8_mm_dequant", x)
    check_linear_args(x, weight_q, weight_scale, bias)
    return reference.int8_mm_dequant(
        x, x_q, s_x, outlier_indices, outlier_count, weight_q, weight_scale, bias, outlier_weight
    )


@int8_mm_dequant.register_fake
def _(x, x_q, s_x, outlier_indices, outlier_count, weight_q, weight_scale, bias, outlier_weight=None):
    check_linear_args(x, weight_q, weight_scale, bias)
    return x.new_empty((x.shape[0], weight_q.shape[0]))


INT8_MM_DEQUANT_SOURCE = templates.OPTIONAL_INPUTS + r"""
from int8pass.lowering.triton_gemm import int8_product_tile, dequantize_tile
{{def_kernel("X_Q", "W_Q", "S_X", "S_W", "X", "IDX", "CNT", *optional_inputs)}}
    M = {{size("X_Q", 0)}}
    N = {{size("W_Q", 0)}}
    K = {{size("X_Q", 1)}}
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = int8_product_tile(
        X_Q, W_Q, rows, cols, M, N, K,
        {{stride("X_Q", 0)}}, {{stride("X_Q", 1)}}, {{stride("W_Q", 0)}}, {{stride("W_Q", 1)}},
        BLOCK_M, BLOCK_N, BLOCK_K,
    )
    y = dequantize_tile(
        acc, rows, cols, M, N, S_X, S_W, X, {{stride("X", 0)}}, {{stride("X", 1)}},
        {{outlier_w}}, {{stride(outlier_w, 0)}}, {{stride(outlier_w, 1)}}, IDX, CNT, {{"BIAS" if HAS_BIAS else "None"}},
        OUTLIER_CODES, HAS_BIAS, BLOCK_M, BLOCK_N,
    )
""" + templates.STORE


@inductor.SymbolicGridFn
def _tile_grid(m, n, meta, *, cdiv):
    return (cdiv(m, meta["BLOCK_M"]), cdiv(n, meta["BLOCK_N"]), 1)


def lower_int8_mm_dequant(x, x_q, s_x, indices, count, weight_q, weight_scale, bias=None, outlier_weight=None):
    """Inductor's lowering: the template over its tile configs, or the extern op where Triton is not the codegen."""
    op_args = (torch.ops.llmint8.int8_mm_dequant.default, x, x_q, s_x, indices, count, weight_q, weight_scale, bias,
               outlier_weight)
    if not inductor.uses_triton(x.get_device()):
        return inductor.fallback(*op_args)
    optional_inputs = [node for node in (outlier_weight, bias) if node is not None]  # the order the source names them
    input_nodes = inductor.realize_inputs(x_q, weight_q, s_x, weight_scale, x, indices, count, *optional_inputs)
    m, n = x_q.get_size()[0], weight_q.get_size()[0]
    layout = inductor.FixedLayout(x.get_device(), x.get_dtype(), [m, n])
    return templates.select("llmint8_int8_mm_dequant", INT8_MM_DEQUANT, op_args, input_nodes,
                            templates.configs(inductor.size_hint(m)), layout,
                            OUTLIER_CODES=outlier_weight is None, HAS_BIAS=bias is not None)


def _int8_mm_dequant_cuda(x, x_q, s_x, indices, count, weight_q, weight_scale, bias, outlier_weight=None):
    check_linear_args(x, weight_q, weight_scale, bias)
    return triton_gemm.int8_mm_dequant(x, x_q, s_x, indices, count, weight_q, weight_scale, bias, outlier_weight)


# Triton is optional: without it the op runs its eager implementation, as an extern call in compiled graphs
if inductor.HAS_TRITON:
    from int8pass.lowering import triton_gemm

    INT8_MM_DEQUANT = inductor.TritonTemplate(
        name="llmint8_int8_mm_dequant", grid=_tile_grid, source=INT8_MM_DEQUANT_SOURCE)
    inductor.register_op_lowering(torch.ops.llmint8.int8_mm_dequant.default)(lower_int8_mm_dequant)
    torch.library.register_kernel("llmint8::int8_mm_dequant", "cuda", _int8_mm_dequant_cuda)
