"""Inductor lowerings of the llmint8 GEMM ops to Triton templates, so following pointwise ops fuse into them.

Each template is the eager kernel's tile math (lowering/triton_gemm.py) followed by Inductor's
`store_output`, where Inductor appends the pointwise ops it fuses (a GELU, a residual add, a cast...):
- `llmint8::int8_mm_dequant` (after quantize_activation): the int8 GEMM and the dequantizing epilogue;
- `llmint8::fused_linear` (at most FUSED_MAX_M rows): quantization, GEMM and epilogue, so a decode-step
  linear and what follows it are one kernel.
Where Triton is not Inductor's code generator for the device, the ops stay extern kernel calls.

Tile configs: one by heuristic (triton_gemm.gemm_config) by default; under max-autotune every config for
the M class (decode: M <= 16, GEMV-like and weight-bandwidth bound; prefill: compute bound) is benchmarked
and the fastest kept.
"""

from __future__ import annotations

import torch

from int8pass.lowering import inductor_api as inductor
from int8pass.lowering.triton_gemm import FUSED_MAX_M, gemm_config

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
DECODE_CONFIGS = [(16, 32, 128, 4, 4), (16, 64, 128, 4, 4), (16, 64, 256, 4, 3), (16, 128, 128, 4, 4), (16, 32, 256, 2, 4)]
PREFILL_CONFIGS = [
    (64, 64, 128, 4, 4), (64, 128, 128, 4, 4), (128, 64, 128, 4, 4), (128, 128, 64, 8, 3), (128, 128, 128, 8, 3),
    (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
]

# Jinja sources. `def_kernel` names the inputs (pointer arguments); `size`/`stride` give their shapes, as
# constants or, for dynamic shapes, kernel arguments; `store_output` writes Y and Inductor's fused epilogue.
_OPTIONAL_INPUTS = r"""
{%- set outlier_w = "W_Q" if OUTLIER_CODES else "OW" -%}
{%- set optional_inputs = ([] if OUTLIER_CODES else ["OW"]) + (["BIAS"] if HAS_BIAS else []) -%}
"""
_STORE = r"""
    idx_m = rows[:, None]
    idx_n = cols[None, :]
    mask = (idx_m < M) & (idx_n < N)
    {{store_output(("idx_m", "idx_n"), "y", "mask", val_shape=("BLOCK_M", "BLOCK_N"))}}
"""

INT8_MM_DEQUANT_SOURCE = _OPTIONAL_INPUTS + r"""
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
""" + _STORE

# One program row block holds all of X's rows (M <= BLOCK_M), so the grid runs over columns only.
FUSED_LINEAR_SOURCE = _OPTIONAL_INPUTS + r"""
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
""" + _STORE


@inductor.SymbolicGridFn
def _tile_grid(m, n, meta, *, cdiv):
    return (cdiv(m, meta["BLOCK_M"]), cdiv(n, meta["BLOCK_N"]), 1)


@inductor.SymbolicGridFn
def _column_grid(m, n, meta, *, cdiv):
    return (cdiv(n, meta["BLOCK_N"]), 1, 1)


INT8_MM_DEQUANT = inductor.TritonTemplate(name="llmint8_int8_mm_dequant", grid=_tile_grid, source=INT8_MM_DEQUANT_SOURCE)
FUSED_LINEAR = inductor.TritonTemplate(name="llmint8_fused_linear", grid=_column_grid, source=FUSED_LINEAR_SOURCE)


def configs(m_hint: int) -> list[tuple[int, int, int, int, int]]:
    if not inductor.max_autotune():
        c = gemm_config(m_hint)
        return [(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["num_warps"], c["num_stages"])]
    return DECODE_CONFIGS if m_hint <= 16 else PREFILL_CONFIGS


def select(name, template, op_args, input_nodes, tile_configs, layout, **meta):
    """The template over the tile configs (benchmarked if more than one), or the extern op."""
    choices: list = []
    for block_m, block_n, block_k, num_warps, num_stages in tile_configs:
        template.maybe_append_choice(
            choices, input_nodes=tuple(input_nodes), layout=layout, num_warps=num_warps, num_stages=num_stages,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **meta,
        )
    if not choices:  # the template could not be generated (logged by Inductor)
        return inductor.fallback(*op_args)
    return inductor.autotune_select_algorithm(name, choices, input_nodes, layout)


@inductor.register_op_lowering(torch.ops.llmint8.int8_mm_dequant.default)
def lower_int8_mm_dequant(x, x_q, s_x, indices, count, weight_q, weight_scale, bias=None, outlier_weight=None):
    op_args = (torch.ops.llmint8.int8_mm_dequant.default, x, x_q, s_x, indices, count, weight_q, weight_scale, bias,
               outlier_weight)
    if not inductor.uses_triton(x.get_device()):
        return inductor.fallback(*op_args)
    optional_inputs = [node for node in (outlier_weight, bias) if node is not None]  # the order the source names them
    input_nodes = inductor.realize_inputs(x_q, weight_q, s_x, weight_scale, x, indices, count, *optional_inputs)
    m, n = x_q.get_size()[0], weight_q.get_size()[0]
    layout = inductor.FixedLayout(x.get_device(), x.get_dtype(), [m, n])
    return select("llmint8_int8_mm_dequant", INT8_MM_DEQUANT, op_args, input_nodes, configs(inductor.size_hint(m)),
                  layout, OUTLIER_CODES=outlier_weight is None, HAS_BIAS=bias is not None)


@inductor.register_op_lowering(torch.ops.llmint8.fused_linear.default)
def lower_fused_linear(x, weight_q, weight_scale, bias, threshold, outlier_weight=None):
    op_args = (torch.ops.llmint8.fused_linear.default, x, weight_q, weight_scale, bias, threshold, outlier_weight)
    m, n = x.get_size()[0], weight_q.get_size()[0]
    if not inductor.uses_triton(x.get_device()) or not inductor.statically_at_most(m, FUSED_MAX_M):
        return inductor.fallback(*op_args)
    optional_inputs = [node for node in (outlier_weight, bias) if node is not None]
    input_nodes = inductor.realize_inputs(x, weight_q, weight_scale, *optional_inputs)
    layout = inductor.FixedLayout(x.get_device(), x.get_dtype(), [m, n])
    rows = inductor.size_hint(m)
    tile_configs = [c for c in configs(rows) if c[0] >= rows]  # one row block must hold every row
    return select("llmint8_fused_linear", FUSED_LINEAR, op_args, input_nodes, tile_configs, layout,
                  LIMIT=threshold if threshold > 0 else "INF", OUTLIER_CODES=outlier_weight is None,
                  HAS_BIAS=bias is not None)
