"""Triton int8 GEMMs with the LLM.int8() epilogue: reference.linear on the GPU.

Two kernels, each one launch:
- `_int8_linear_kernel`, after triton_quantize.quantize_activation: the exact int32 product X_q . W_q^T of a
  [BLOCK_M, BLOCK_N] tile with tl.dot, then the scales, the outlier columns' fp32 product (read from X and
  W_q, or the original weight, through the index list up to the count stored on the device) and the bias;
- `_fused_linear_kernel`, for X with at most FUSED_MAX_M rows (decode): every program holds all of X's rows,
  so it finds the outlier columns and row scales itself and quantizes X on the fly: the whole linear is one
  launch reading the weight once. The outlier product is an fp32 tl.dot on the K blocks holding outliers.
The tile functions (`*_tile`) are shared with the Inductor templates (int8_mm_dequant.py, fused_linear.py), which
add Inductor's fused epilogue after them. No kernel syncs the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from int8pass.reference import Q_MAX
from int8pass.lowering.triton_quantize import is_outlier, outlier_limit, to_codes

_Q_MAX = tl.constexpr(Q_MAX)
INF = tl.constexpr(float("inf"))
# Up to this many rows of X (at most DECODE_CONFIG's BLOCK_M), linears take the single-kernel path.
FUSED_MAX_M = 16

# Tile shapes and launch options by number of rows: decode (M <= 16) streams the weight through thin tiles
# so that many programs share it; larger M uses square tiles. The template autotunes over more (CONFIGS).
DECODE_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4)
PREFILL_CONFIG = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)


def gemm_config(m: int) -> dict:
    return DECODE_CONFIG if m <= 16 else PREFILL_CONFIG


@triton.jit
def int8_product_tile(
    x_q_ptr, w_q_ptr, rows, cols, M, N, K, stride_qm, stride_qk, stride_wn, stride_wk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Exact int32 X_q[rows] . W_q[cols]^T over all of K; rows and cols past M, N and K load zeros."""
    row_mask = rows < M
    col_mask = cols < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_q_ptr + rows.to(tl.int64)[:, None] * stride_qm + offs_k[None, :] * stride_qk
    b_ptrs = w_q_ptr + offs_k[:, None] * stride_wk + cols.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for start in range(0, K, BLOCK_K):
        k_mask = offs_k < K - start
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_qk
        b_ptrs += BLOCK_K * stride_wk
    return acc


@triton.jit
def scale_tile(acc, s_x, s_w, outliers, cols, N, bias_ptr, OUTLIER_CODES: tl.constexpr, HAS_BIAS: tl.constexpr):
    """fp32 tile of Y = acc s_x s_w / 127^2 + outliers + b, in reference.dequantize_output's order.

    `outliers` is X[:, O] . W[:, O]^T, still to be scaled by s_w / 127 if W was W_q's codes (OUTLIER_CODES).
    tl.div_rn is IEEE division (`/` is not, on CUDA).
    """
    y = acc.to(tl.float32) * (s_x[:, None] * tl.div_rn(s_w, _Q_MAX * _Q_MAX)[None, :])
    if OUTLIER_CODES:
        outliers = outliers * tl.div_rn(s_w, _Q_MAX)[None, :]
    y = y + outliers
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def dequantize_tile(
    acc, rows, cols, M, N,
    s_x_ptr, s_w_ptr, x_ptr, stride_xm, stride_xk,
    outlier_w_ptr, stride_own, stride_owk, indices_ptr, count_ptr, bias_ptr,
    OUTLIER_CODES: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """fp32 tile of Y from the int32 product: scales from memory, outlier columns through the index list."""
    row_mask = rows < M
    col_mask = cols < N
    s_x = tl.load(s_x_ptr + rows, mask=row_mask, other=0.0)
    s_w = tl.load(s_w_ptr + cols, mask=col_mask, other=0.0)

    # Outlier columns in ascending order, fp32 products (reference.outlier_matmul).
    x_rows = x_ptr + rows.to(tl.int64) * stride_xm
    w_cols = outlier_w_ptr + cols.to(tl.int64) * stride_own
    outliers = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, tl.load(count_ptr)):
        k = tl.load(indices_ptr + i)
        x_col = tl.load(x_rows + k * stride_xk, mask=row_mask, other=0.0).to(tl.float32)
        w_col = tl.load(w_cols + k * stride_owk, mask=col_mask, other=0).to(tl.float32)
        outliers += x_col[:, None] * w_col[None, :]
    return scale_tile(acc, s_x, s_w, outliers, cols, N, bias_ptr, OUTLIER_CODES, HAS_BIAS)


@triton.jit
def quantizing_product_tile(
    x_ptr, w_q_ptr, outlier_w_ptr, rows, cols, M, N, K, limit,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_own, stride_owk,
    OUTLIER_CODES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """(exact int32 X_q . W_q^T, fp32 X[:, O] . W[:, O]^T, s_x) for a program holding every row of X.

    With all rows in the tile, a K block's column maxima are the whole columns' (reference.outlier_columns):
    a first pass over X takes the row scales of the non-outlier columns, the second quantizes X on the fly
    (the reference's codes) into the int32 product and adds the outlier columns' exact fp32 products.
    """
    row_mask = rows < M
    col_mask = cols < N
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm

    s_x = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        ks = start + offs_k
        mask = row_mask[:, None] & (ks < K)[None, :]
        x = tl.load(x_rows + ks[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
        outlier_cols = tl.max((mask & is_outlier(x, limit)).to(tl.int32), axis=0) == 1
        s_x = tl.maximum(s_x, tl.max(tl.abs(tl.where(outlier_cols[None, :], 0.0, x)), axis=1))
    safe_scale = tl.where(s_x == 0.0, 1.0, s_x)[:, None]

    w_cols = cols.to(tl.int64)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    outliers = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        ks = start + offs_k
        k_mask = ks < K
        mask = row_mask[:, None] & k_mask[None, :]
        w_mask = k_mask[:, None] & col_mask[None, :]
        x = tl.load(x_rows + ks[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
        outlier_cols = tl.max((mask & is_outlier(x, limit)).to(tl.int32), axis=0) == 1
        codes = to_codes(tl.where(outlier_cols[None, :], 0.0, x), safe_scale).to(tl.int8)
        w = tl.load(w_q_ptr + ks[:, None] * stride_wk + w_cols * stride_wn, mask=w_mask, other=0)
        acc = tl.dot(codes, w, acc, out_dtype=tl.int32)
        if tl.max(outlier_cols.to(tl.int32), axis=0) > 0:
            if OUTLIER_CODES:
                w_outliers = w.to(tl.float32)
            else:
                w_outliers = tl.load(outlier_w_ptr + ks[:, None] * stride_owk + w_cols * stride_own,
                                     mask=w_mask, other=0.0).to(tl.float32)
            # Zero outside the outlier columns, so exactly the reference's products: fp32 FMAs, no TF32.
            x_outliers = tl.where(outlier_cols[None, :], x, 0.0)
            outliers += tl.dot(x_outliers, w_outliers, input_precision="ieee")
    return acc, outliers, s_x


@triton.jit
def _int8_linear_kernel(
    x_q_ptr, w_q_ptr, y_ptr,
    x_ptr, s_x_ptr, s_w_ptr, outlier_w_ptr, bias_ptr, indices_ptr, count_ptr,
    M, N, K,
    stride_qm, stride_qk, stride_wn, stride_wk, stride_ym, stride_yn, stride_xm, stride_xk,
    stride_own, stride_owk,
    OUTLIER_CODES: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One tile of Y in y's dtype."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = int8_product_tile(
        x_q_ptr, w_q_ptr, rows, cols, M, N, K, stride_qm, stride_qk, stride_wn, stride_wk,
        BLOCK_M, BLOCK_N, BLOCK_K,
    )
    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :] * stride_yn
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    y = dequantize_tile(
        acc, rows, cols, M, N, s_x_ptr, s_w_ptr, x_ptr, stride_xm, stride_xk,
        outlier_w_ptr, stride_own, stride_owk, indices_ptr, count_ptr, bias_ptr,
        OUTLIER_CODES, HAS_BIAS, BLOCK_M, BLOCK_N,
    )
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fused_linear_kernel(
    x_ptr, w_q_ptr, outlier_w_ptr, s_w_ptr, bias_ptr, y_ptr, M, N, K, limit,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_own, stride_owk, stride_ym, stride_yn,
    OUTLIER_CODES: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """All of Y's rows (M <= BLOCK_M) for BLOCK_N columns, from X itself."""
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc, outliers, s_x = quantizing_product_tile(
        x_ptr, w_q_ptr, outlier_w_ptr, rows, cols, M, N, K, limit,
        stride_xm, stride_xk, stride_wn, stride_wk, stride_own, stride_owk,
        OUTLIER_CODES, BLOCK_M, BLOCK_N, BLOCK_K,
    )
    y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    s_w = tl.load(s_w_ptr + cols, mask=cols < N, other=0.0)
    y = scale_tile(acc, s_x, s_w, outliers, cols, N, bias_ptr, OUTLIER_CODES, HAS_BIAS)
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


def fused_linear(
    x2d: torch.Tensor,
    w_q: torch.Tensor,
    s_w: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: float,
    outlier_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Y [M, N] in X's dtype in one launch, for M <= FUSED_MAX_M."""
    m, k = x2d.shape
    n = w_q.shape[0]
    config = DECODE_CONFIG
    if m > config["BLOCK_M"]:  # one row block must hold every row
        raise ValueError(f"llmint8: the single-kernel linear takes at most {config['BLOCK_M']} rows, got {m}")
    out = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    outlier_w = w_q if outlier_weight is None else outlier_weight
    _fused_linear_kernel[(triton.cdiv(n, config["BLOCK_N"]),)](
        x2d, w_q, outlier_w, s_w, bias, out, m, n, k, outlier_limit(threshold),
        x2d.stride(0), x2d.stride(1), w_q.stride(0), w_q.stride(1), outlier_w.stride(0), outlier_w.stride(1),
        out.stride(0), out.stride(1),
        OUTLIER_CODES=outlier_weight is None, HAS_BIAS=bias is not None, **config,
    )
    return out


def int8_mm_dequant(
    x2d: torch.Tensor,
    x_q: torch.Tensor,
    s_x: torch.Tensor,
    indices: torch.Tensor,
    count: torch.Tensor,
    w_q: torch.Tensor,
    s_w: torch.Tensor,
    bias: torch.Tensor | None,
    outlier_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Y [M, N] in X's dtype from X [M, K], its quantization (triton_quantize.quantize_activation) and W_q, s_w."""
    m, k = x_q.shape
    n = w_q.shape[0]
    out = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    config = gemm_config(m)
    outlier_w = w_q if outlier_weight is None else outlier_weight
    _int8_linear_kernel[(triton.cdiv(m, config["BLOCK_M"]), triton.cdiv(n, config["BLOCK_N"]))](
        x_q, w_q, out, x2d, s_x, s_w, outlier_w, bias, indices, count, m, n, k,
        x_q.stride(0), x_q.stride(1), w_q.stride(0), w_q.stride(1), out.stride(0), out.stride(1),
        x2d.stride(0), x2d.stride(1), outlier_w.stride(0), outlier_w.stride(1),
        OUTLIER_CODES=outlier_weight is None, HAS_BIAS=bias is not None, **config,
    )
    return out

