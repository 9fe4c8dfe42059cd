"""Triton int8 GEMM with the LLM.int8() epilogue: reference.linear on the GPU in two launches plus quantization.

`_int8_linear_kernel` computes one [BLOCK_M, BLOCK_N] tile of the exact int32 product X_q . W_q^T with
tl.dot, then (unless RAW_ACC) dequantizes it, adds the outlier columns' fp32 product (read from X and W_q
through the index list, up to the count stored on the device), adds the bias and rounds once to X's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from int8pass.reference import Q_MAX
from lowering.triton_quantize import quantize_activation

_Q_MAX = tl.constexpr(Q_MAX)

# Tile shapes and launch options by number of rows: decode (M <= 16) streams the weight through thin tiles
# so that many programs share it; larger M uses square tiles. The one place to tune (or autotune) them.
DECODE_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4)
PREFILL_CONFIG = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)


def gemm_config(m: int) -> dict:
    return DECODE_CONFIG if m <= 16 else PREFILL_CONFIG


@triton.jit
def _int8_linear_kernel(
    x_q_ptr, w_q_ptr, y_ptr,
    x_ptr, s_x_ptr, s_w_ptr, bias_ptr, indices_ptr, count_ptr,
    M, N, K,
    stride_qm, stride_qk, stride_wn, stride_wk, stride_ym, stride_yn, stride_xm, stride_xk,
    RAW_ACC: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Y = acc * s_x s_w / 127^2 + (X[:, O] . W_q[:, O]^T) s_w / 127 + b, or the raw int32 acc if RAW_ACC."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    offs_k = tl.arange(0, BLOCK_K)

    # Exact int8 x int8 -> int32 product over K; ragged edges load zeros.
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

    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :] * stride_yn
    mask = row_mask[:, None] & col_mask[None, :]
    if RAW_ACC:
        tl.store(y_ptrs, acc, mask=mask)
    else:
        # Epilogue, in reference.dequantize_output's order; tl.div_rn is IEEE division (`/` is not on CUDA).
        s_x = tl.load(s_x_ptr + rows, mask=row_mask, other=0.0)
        s_w = tl.load(s_w_ptr + cols, mask=col_mask, other=0.0)
        y = acc.to(tl.float32) * (s_x[:, None] * tl.div_rn(s_w, _Q_MAX * _Q_MAX)[None, :])

        # Outlier columns in ascending order, fp32 products of X and the int8 codes (reference.outlier_matmul).
        x_rows = x_ptr + rows.to(tl.int64) * stride_xm
        w_cols = w_q_ptr + cols.to(tl.int64) * stride_wn
        outliers = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for i in range(0, tl.load(count_ptr)):
            k = tl.load(indices_ptr + i)
            x_col = tl.load(x_rows + k * stride_xk, mask=row_mask, other=0.0).to(tl.float32)
            w_col = tl.load(w_cols + k * stride_wk, mask=col_mask, other=0).to(tl.float32)
            outliers += x_col[:, None] * w_col[None, :]
        y = y + outliers * tl.div_rn(s_w, _Q_MAX)[None, :]

        if HAS_BIAS:
            y = y + tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


def _launch(x_q, w_q, out, x=None, s_x=None, s_w=None, bias=None, indices=None, count=None):
    """Run the kernel into `out`; without s_x it stores the raw int32 accumulator (no epilogue inputs read)."""
    m, k = x_q.shape
    n = w_q.shape[0]
    config = gemm_config(m)
    grid = (triton.cdiv(m, config["BLOCK_M"]), triton.cdiv(n, config["BLOCK_N"]))
    stride_xm, stride_xk = x.stride() if x is not None else (0, 0)
    _int8_linear_kernel[grid](
        x_q, w_q, out, x, s_x, s_w, bias, indices, count, m, n, k,
        x_q.stride(0), x_q.stride(1), w_q.stride(0), w_q.stride(1), out.stride(0), out.stride(1),
        stride_xm, stride_xk,
        RAW_ACC=s_x is None, HAS_BIAS=bias is not None, **config,
    )
    return out


def int8_matmul_int32(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """The kernel's exact int32 accumulator X_q . W_q^T [M, N] (reference.exact_int_matmul), for tests."""
    out = torch.empty((x_q.shape[0], w_q.shape[0]), dtype=torch.int32, device=x_q.device)
    return _launch(x_q, w_q, out)


def int8_linear(
    x2d: torch.Tensor,
    x_q: torch.Tensor,
    s_x: torch.Tensor,
    indices: torch.Tensor,
    count: torch.Tensor,
    w_q: torch.Tensor,
    s_w: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Y [M, N] in X's dtype from X [M, K], its quantization (triton_quantize.quantize_activation) and W_q, s_w."""
    out = torch.empty((x2d.shape[0], w_q.shape[0]), dtype=x2d.dtype, device=x2d.device)
    return _launch(x_q, w_q, out, x2d, s_x, s_w, bias, indices, count)


def linear(
    x: torch.Tensor, w_q: torch.Tensor, s_w: torch.Tensor, bias: torch.Tensor | None, threshold: float
) -> torch.Tensor:
    """reference.linear (with the dequantized int8 weight for outlier columns) for X with any leading dims."""
    x2d = x.reshape(-1, w_q.shape[1])
    x_q, s_x, indices, count = quantize_activation(x2d, threshold)
    y = int8_linear(x2d, x_q, s_x, indices, count, w_q, s_w, bias)
    return y.reshape(*x.shape[:-1], w_q.shape[0])
