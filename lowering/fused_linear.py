"""llmint8::fused_linear: llmint8::linear of a 2-D X [M, K] with at most FUSED_MAX_M rows as one kernel on Triton
devices (quantization, GEMM and epilogue): what a decode step runs.

Each program holds all rows of X, so it finds the outlier columns and row scales itself. The eager implementation is
the reference math; on CUDA the kernel is triton_gemm.fused_linear. Inductor lowers the op to a Triton template (below)
that fuses the pointwise ops after it.
"""

from __future__ import annotations

import torch

from int8pass import reference
from int8pass.lowering import inductor_api as inductor
from int8pass.lowering import templates
from int8pass.lowering.checks import check_2d, check_linear_args


@torch.library.custom_op("llmint8::fused_linear", mutates_args=())
def fused_linear(
    x: torch.Tensor,
    weight_q: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: float,
    outlier_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    check_2d("fused_linear", x)
    check_linear_args(x, weight_q, weight_scale, bias)
    return reference.linear(x, weight_q, weight_scale, bias, threshold, outlier_weight)


@fused_linear.register_fake
def _(x, weight_q, weight_scale, bias, threshold, outlier_weight=None):
    check_linear_args(x, weight_q, weight_scale, bias)
    return x.new_empty((x.shape[0], weight_q.shape[0]))


# One program row block holds all of X's rows (M <= BLOCK_M), so the grid runs over columns only.
FUSED_LINEAR_SOURCE = templates.OPTIONAL_INPUTS + r"""
from int8pass.lowering.triton_gemm import INF, quantizing_product_tile, scale_tile
{{def_kernel("X", "W_Q", "S_W", *optional_inputs)}}
    M = {{size("X", 0)}}
    N = {{size("W_Q", 0)}}
    K = {{size("X", 1)}}
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc, outliers, s_x = quantizing_product_tile(
        X, W_Q, {{outlier_w}}, rows, cols, M, N, K, LIMIT,
        {{stride("X", 0)}}, {{stride("X", 1)}}, {{stride("W_Q", 0)}}, {{stride("W_Q", 1)}},
        {{stride(outlier_w, 0)}}, {{stride(outlier_w, 1)}},
        OUTLIER_CODES, BLOCK_M, BLOCK_N, BLOCK_K,
    )
    s_w = tl.load(S_W + cols, mask=cols < N, other=0.0)
    y = scale_tile(acc, s_x, s_w, outliers, cols, N, {{"BIAS" if HAS_BIAS else "None"}}, OUTLIER_CODES, HAS_BIAS)
""" + templates.STORE


@inductor.SymbolicGridFn
def _column_grid(m, n, meta, *, cdiv):
    return (cdiv(n, meta["BLOCK_N"]), 1, 1)


def lower_fused_linear(x, weight_q, weight_scale, bias, threshold, outlier_weight=None):
    """Inductor's lowering: the template over its tile configs, or the extern op where Triton is not the codegen or
    M may exceed FUSED_MAX_M."""
    op_args = (torch.ops.llmint8.fused_linear.default, x, weight_q, weight_scale, bias, threshold, outlier_weight)
    m, n = x.get_size()[0], weight_q.get_size()[0]
    if not inductor.uses_triton(x.get_device()) or not inductor.statically_at_most(m, triton_gemm.FUSED_MAX_M):
        return inductor.fallback(*op_args)
    optional_inputs = [node for node in (outlier_weight, bias) if node is not None]
    input_nodes = inductor.realize_inputs(x, weight_q, weight_scale, *optional_inputs)
    layout = inductor.FixedLayout(x.get_device(), x.get_dtype(), [m, n])
    rows = inductor.size_hint(m)
    tile_configs = [c for c in templates.configs(rows) if c[0] >= rows]  # one row block must hold every row
    return templates.select("llmint8_fused_linear", FUSED_LINEAR, op_args, input_nodes, tile_configs, layout,
                            LIMIT=threshold if threshold > 0 else "INF", OUTLIER_CODES=outlier_weight is None,
                            HAS_BIAS=bias is not None)


def _fused_linear_cuda(x, weight_q, weight_scale, bias, threshold, outlier_weight=None):
    check_linear_args(x, weight_q, weight_scale, bias)
    return triton_gemm.fused_linear(x, weight_q, weight_scale, bias, threshold, outlier_weight)


# Triton is optional: without it the op runs its eager implementation, as an extern call in compiled graphs
if inductor.HAS_TRITON:
    from int8pass.lowering import triton_gemm

    FUSED_LINEAR = inductor.TritonTemplate(name="llmint8_fused_linear", grid=_column_grid, source=FUSED_LINEAR_SOURCE)
    inductor.register_op_lowering(torch.ops.llmint8.fused_linear.default)(lower_fused_linear)
    torch.library.register_kernel("llmint8::fused_linear", "cuda", _fused_linear_cuda)
