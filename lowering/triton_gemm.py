"""Triton int8 GEMM with the LLM.int8() epilogue: reference.linear on the GPU in one launch after quantization.

Two tile functions hold the math, shared by the eager kernel below and by the Inductor template
(lowering/int8_mm_template.py), which adds Inductor's fused epilogue after them:
- `int8_product_tile`: the exact int32 product X_q . W_q^T of one [BLOCK_M, BLOCK_N] tile, with tl.dot;
- `dequantize_tile`: scales it, adds the outlier columns' fp32 product (read from X and W_q, or the original
  weight, through the index list up to the count stored on the device: no host sync) and the bias.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from int8pass.reference import Q_MAX
from lowering.triton_quantize import quantize_activation

_Q_MAX = tl.constexpr(Q_MAX)

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
def dequantize_tile(
    acc, rows, cols, M, N,
    s_x_ptr, s_w_ptr, x_ptr, stride_xm, stride_xk,
    outlier_w_ptr, stride_own, stride_owk, indices_ptr, count_ptr, bias_ptr,
    OUTLIER_CODES: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """fp32 tile of Y = acc s_x s_w / 127^2 + X[:, O] . W[:, O]^T + b, in reference.dequantize_output's order.

    The outlier weight is W_q's codes scaled by s_w / 127 (OUTLIER_CODES) or the original floating weight.
    tl.div_rn is IEEE division (`/` is not, on CUDA).
    """
    row_mask = rows < M
    col_mask = cols < N
    s_x = tl.load(s_x_ptr + rows, mask=row_mask, other=0.0)
    s_w = tl.load(s_w_ptr + cols, mask=col_mask, other=0.0)
    y = acc.to(tl.float32) * (s_x[:, None] * tl.div_rn(s_w, _Q_MAX * _Q_MAX)[None, :])

    # Outlier columns in ascending order, fp32 products (reference.outlier_matmul).
    x_rows = x_ptr + rows.to(tl.int64) * stride_xm
    w_cols = outlier_w_ptr + cols.to(tl.int64) * stride_own
    outliers = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, tl.load(count_ptr)):
        k = tl.load(indices_ptr + i)
        x_col = tl.load(x_rows + k * stride_xk, mask=row_mask, other=0.0).to(tl.float32)
        w_col = tl.load(w_cols + k * stride_owk, mask=col_mask, other=0).to(tl.float32)
        outliers += x_col[:, None] * w_col[None, :]
    if OUTLIER_CODES:
        outliers = outliers * tl.div_rn(s_w, _Q_MAX)[None, :]
    y = y + outliers

    if HAS_BIAS:
        y = y + tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def _int8_linear_kernel(
    x_q_ptr, w_q_ptr, y_ptr,
    x_ptr, s_x_ptr, s_w_ptr, outlier_w_ptr, bias_ptr, indices_ptr, count_ptr,
    M, N, K,
    stride_qm, stride_qk, stride_wn, stride_wk, stride_ym, stride_yn, stride_xm, stride_xk,
    stride_own, stride_owk,
    RAW_ACC: tl.constexpr, OUTLIER_CODES: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One tile of Y in y's dtype, or of the raw int32 accumulator if RAW_ACC."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = int8_product_tile(
        x_q_ptr, w_q_ptr, rows, cols, M, N, K, stride_qm, stride_qk, stride_wn, stride_wk,
        BLOCK_M, BLOCK_N, BLOCK_K,
    )
    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :] * stride_yn
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    if RAW_ACC:
        tl.store(y_ptrs, acc, mask=mask)
    else:
        y = dequantize_tile(
            acc, rows, cols, M, N, s_x_ptr, s_w_ptr, x_ptr, stride_xm, stride_xk,
            outlier_w_ptr, stride_own, stride_owk, indices_ptr, count_ptr, bias_ptr,
            OUTLIER_CODES, HAS_BIAS, BLOCK_M, BLOCK_N,
        )
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


def _launch(x_q, w_q, out, x=None, s_x=None, s_w=None, bias=None, indices=None, count=None, outlier_weight=None):
    """Run the kernel into `out`; without s_x it stores the raw int32 accumulator (no epilogue inputs read)."""
    m, k = x_q.shape
    n = w_q.shape[0]
    config = gemm_config(m)
    grid = (triton.cdiv(m, config["BLOCK_M"]), triton.cdiv(n, config["BLOCK_N"]))
    stride_xm, stride_xk = x.stride() if x is not None else (0, 0)
    outlier_w = w_q if outlier_weight is None else outlier_weight
    _int8_linear_kernel[grid](
        x_q, w_q, out, x, s_x, s_w, outlier_w, bias, indices, count, m, n, k,
        x_q.stride(0), x_q.stride(1), w_q.stride(0), w_q.stride(1), out.stride(0), out.stride(1),
        stride_xm, stride_xk, outlier_w.stride(0), outlier_w.stride(1),
        RAW_ACC=s_x is None, OUTLIER_CODES=outlier_weight is None, HAS_BIAS=bias is not None, **config,
    )
    return out


def int8_matmul_int32(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """The kernel's exact int32 accumulator X_q . W_q^T [M, N] (reference.exact_int_matmul), for tests."""
    out = torch.empty((x_q.shape[0], w_q.shape[0]), dtype=torch.int32, device=x_q.device)
    return _launch(x_q, w_q, out)


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
    out = torch.empty((x2d.shape[0], w_q.shape[0]), dtype=x2d.dtype, device=x2d.device)
    return _launch(x_q, w_q, out, x2d, s_x, s_w, bias, indices, count, outlier_weight)


def linear(
    x: torch.Tensor,
    w_q: torch.Tensor,
    s_w: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: float,
    outlier_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """reference.linear for X with any leading dims: quantization, then one GEMM launch."""
    x2d = x.reshape(-1, w_q.shape[1])
    x_q, s_x, indices, count = quantize_activation(x2d, threshold)
    y = int8_mm_dequant(x2d, x_q, s_x, indices, count, w_q, s_w, bias, outlier_weight)
    return y.reshape(*x.shape[:-1], w_q.shape[0])
