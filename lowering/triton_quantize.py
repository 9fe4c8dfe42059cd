"""Triton activation quantization: reference.quantize_activation on the GPU, with no host synchronisation.

Two launches, each reading X at most twice:
1. `_outlier_flags_kernel`: flags[k] = 1 for every column with some |x| not below the threshold (NaN and
   +-Inf included). Each program reduces a column block over its rows. Up to SINGLE_PASS_ROWS rows one
   program covers all of them and stores its flags; a longer prefill is split over rows as well, and the
   programs OR their flags into a zeroed buffer with an atomic max (one memset more).
2. `_quantize_rows_kernel`: per row block, the absmax over the non-outlier columns, then the int8 codes; its
   last program instead turns the flags into the reference's index list (outlier columns ascending, then the
   others ascending) and writes the count on the device, so nothing has a data-dependent shape.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from int8pass.reference import Q_MAX

_Q_MAX = tl.constexpr(Q_MAX)

# (BLOCK_M, BLOCK_K) of the tiles the flag and row kernels read; the compaction walks K in COMPACT_BLOCK steps.
FLAGS_BLOCK = (32, 128)
ROWS_BLOCK = (8, 256)
COMPACT_BLOCK = 1024
# Up to this many rows, one program per column block reads all rows (decode and short prompts: no memset,
# no atomics); past it, programs split the rows so a long prefill still fills the GPU.
SINGLE_PASS_ROWS = 256


@triton.jit
def round_half_even(v):
    """torch.round of fp32 values with |v| < 2**22, as int32.

    Never subtracts from `v` itself: the compiler may fuse the multiplication producing `v` into a following
    add (an FMA skips the rounding of the product), which would move exact ties.
    """
    floor = tl.floor(v)
    r = floor.to(tl.int32)
    half = floor + 0.5
    round_up = (v > half) | ((v == half) & ((r & 1) == 1))
    return r + round_up.to(tl.int32)


@triton.jit
def to_codes(x, safe_scale):
    """int32 codes round(x / s * 127) of fp32 values: IEEE division (Triton's `/` is approximate on CUDA),
    then * 127, in the reference's order."""
    return round_half_even(tl.div_rn(x, safe_scale) * _Q_MAX)


@triton.jit
def is_outlier(x, limit):
    """!(|x| < limit) elementwise: `<` is False for NaN, so NaN counts; limit = inf still catches +-Inf."""
    return ~(tl.abs(x.to(tl.float32)) < limit)


@triton.jit
def _outlier_flags_kernel(
    x_ptr, flags_ptr, M, K, stride_xm, stride_xk, limit, rows_per_program,
    ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """flags[k] = any(!(|X[m, k]| < limit)) over this program's rows; ORed into zeroed flags if ATOMIC."""
    first_row = tl.program_id(0) * rows_per_program
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_mask = cols < K
    column_flags = tl.zeros((BLOCK_K,), dtype=tl.int32)
    for start in range(first_row, tl.minimum(first_row + rows_per_program, M), BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0)
        tile = (mask & is_outlier(x, limit)).to(tl.int32)
        column_flags = tl.maximum(column_flags, tl.max(tile, axis=0))
    if ATOMIC:
        tl.atomic_max(flags_ptr + cols, column_flags, mask=col_mask)
    else:
        tl.store(flags_ptr + cols, column_flags, mask=col_mask)


@triton.jit
def compact_outliers(flags_ptr, indices_ptr, count_ptr, K, BLOCK: tl.constexpr):
    """In one program: indices = outlier columns ascending, then the rest ascending; count = #outliers.

    What a stable sort of (~flags) gives (reference.compact_indices): a first pass counts the outliers, a
    second places every column at its rank by a running prefix sum.
    """
    offs = tl.arange(0, BLOCK)
    count = 0
    for start in range(0, K, BLOCK):
        count += tl.sum(tl.load(flags_ptr + start + offs, mask=start + offs < K, other=0), axis=0)
    outliers_before = 0
    for start in range(0, K, BLOCK):
        cols = start + offs
        in_range = cols < K
        flag = tl.load(flags_ptr + cols, mask=in_range, other=0)
        other = in_range.to(tl.int32) - flag
        outlier_rank = outliers_before + tl.cumsum(flag, axis=0) - 1
        other_rank = count + (start - outliers_before) + tl.cumsum(other, axis=0) - 1
        tl.store(indices_ptr + tl.where(flag == 1, outlier_rank, other_rank), cols, mask=in_range)
        outliers_before += tl.sum(flag, axis=0)
    tl.store(count_ptr, count)


@triton.jit
def quantize_row_block(
    x_ptr, flags_ptr, x_q_ptr, s_x_ptr, block, M, K, stride_xm, stride_xk, stride_qm, stride_qk,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """s_x[m] = max |X~[m, :]| and X_q = round(X~ / s_x * 127), where X~ is X with outlier columns zeroed."""
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    q_rows = x_q_ptr + rows.to(tl.int64)[:, None] * stride_qm
    offs_k = tl.arange(0, BLOCK_K)

    s_x = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        cols = start + offs_k
        mask = row_mask[:, None] & (cols < K)[None, :]
        x = tl.load(x_rows + cols[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
        is_outlier = tl.load(flags_ptr + cols, mask=cols < K, other=0) == 1
        x = tl.where(is_outlier[None, :], 0.0, x)  # non-finite values are all in outlier columns
        s_x = tl.maximum(s_x, tl.max(tl.abs(x), axis=1))
    tl.store(s_x_ptr + rows, s_x, mask=row_mask)

    safe_scale = tl.where(s_x == 0.0, 1.0, s_x)[:, None]
    for start in range(0, K, BLOCK_K):
        cols = start + offs_k
        mask = row_mask[:, None] & (cols < K)[None, :]
        x = tl.load(x_rows + cols[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
        is_outlier = tl.load(flags_ptr + cols, mask=cols < K, other=0) == 1
        x = tl.where(is_outlier[None, :], 0.0, x)
        codes = to_codes(x, safe_scale)
        tl.store(q_rows + cols[None, :] * stride_qk, codes.to(tl.int8), mask=mask)


@triton.jit
def _quantize_rows_kernel(
    x_ptr, flags_ptr, x_q_ptr, s_x_ptr, indices_ptr, count_ptr, M, K,
    stride_xm, stride_xk, stride_qm, stride_qk,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, COMPACT_BLOCK: tl.constexpr,
):
    """One row block per program; the program after the last row block compacts the outlier index list."""
    if tl.program_id(0) == tl.num_programs(0) - 1:
        compact_outliers(flags_ptr, indices_ptr, count_ptr, K, COMPACT_BLOCK)
    else:
        quantize_row_block(
            x_ptr, flags_ptr, x_q_ptr, s_x_ptr, tl.program_id(0), M, K, stride_xm, stride_xk, stride_qm, stride_qk,
            BLOCK_M, BLOCK_K,
        )


def outlier_limit(threshold: float) -> float:
    """The kernels' `limit`: |x| >= limit marks an outlier column; threshold <= 0 leaves only non-finite ones."""
    return threshold if threshold > 0 else math.inf


def quantize_activation(
    x2d: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """X [M, K] -> (X_q int8 [M, K], s_x fp32 [M], outlier indices int32 [K], outlier count int32 [1]).

    Same outputs, bit for bit, as reference.quantize_activation; the count stays on the device.
    """
    m, k = x2d.shape
    device = x2d.device
    limit = outlier_limit(threshold)

    block_m, block_k = FLAGS_BLOCK
    rows_per_program = max(block_m, SINGLE_PASS_ROWS)
    row_programs = triton.cdiv(m, rows_per_program)
    atomic = row_programs > 1
    flags = (torch.zeros if atomic else torch.empty)(k, dtype=torch.int32, device=device)
    _outlier_flags_kernel[(max(1, row_programs), triton.cdiv(k, block_k))](
        x2d, flags, m, k, x2d.stride(0), x2d.stride(1), limit, rows_per_program,
        ATOMIC=atomic, BLOCK_M=block_m, BLOCK_K=block_k,
    )

    x_q = torch.empty((m, k), dtype=torch.int8, device=device)
    s_x = torch.empty(m, dtype=torch.float32, device=device)
    indices = torch.empty(k, dtype=torch.int32, device=device)
    count = torch.empty(1, dtype=torch.int32, device=device)
    block_m, block_k = ROWS_BLOCK
    _quantize_rows_kernel[(triton.cdiv(m, block_m) + 1,)](
        x2d, flags, x_q, s_x, indices, count, m, k,
        x2d.stride(0), x2d.stride(1), x_q.stride(0), x_q.stride(1),
        BLOCK_M=block_m, BLOCK_K=block_k, COMPACT_BLOCK=COMPACT_BLOCK,
    )
    return x_q, s_x, indices, count
