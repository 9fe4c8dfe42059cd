"""Test-only Triton kernels: the raw int32 accumulators of the production tile functions (int8pass.lowering.triton_gemm),
stored as they are, so tests compare them bit-exactly with reference.exact_int_matmul. The production kernels carry
no test mode for this."""

import torch
import triton
import triton.language as tl

from int8pass.lowering import triton_gemm
from int8pass.lowering.triton_gemm import int8_product_tile, quantizing_product_tile
from int8pass.lowering.triton_quantize import outlier_limit


@triton.jit
def _int8_product_kernel(
    x_q_ptr, w_q_ptr, acc_ptr, M, N, K, stride_qm, stride_qk, stride_wn, stride_wk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = int8_product_tile(
        x_q_ptr, w_q_ptr, rows, cols, M, N, K, stride_qm, stride_qk, stride_wn, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K,
    )
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    tl.store(acc_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], acc, mask=mask)


def int8_product(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """X_q . W_q^T as int32 [M, N], computed by the tile function of the two-step GEMM, with its launch config."""
    m, k = x_q.shape
    n = w_q.shape[0]
    config = triton_gemm.gemm_config(m)
    acc = torch.empty((m, n), dtype=torch.int32, device=x_q.device)
    grid = (triton.cdiv(m, config["BLOCK_M"]), triton.cdiv(n, config["BLOCK_N"]))
    _int8_product_kernel[grid](
        x_q, w_q, acc, m, n, k, x_q.stride(0), x_q.stride(1), w_q.stride(0), w_q.stride(1), **config,
    )
    return acc


@triton.jit
def _quantizing_product_kernel(
    x_ptr, w_q_ptr, acc_ptr, M, N, K, limit, stride_xm, stride_xk, stride_wn, stride_wk,
    OUTLIER_CODES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc, outliers, s_x = quantizing_product_tile(
        x_ptr, w_q_ptr, w_q_ptr, rows, cols, M, N, K, limit, stride_xm, stride_xk, stride_wn, stride_wk,
        stride_wn, stride_wk, OUTLIER_CODES, BLOCK_M, BLOCK_N, BLOCK_K,
    )
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    tl.store(acc_ptr + rows[:, None] * N + cols[None, :], acc, mask=mask)


def quantizing_product(x: torch.Tensor, w_q: torch.Tensor, threshold: float) -> torch.Tensor:
    """The int32 product of X's codes (quantized inside the GEMM, as the single-kernel linear does) with W_q."""
    m, k = x.shape
    n = w_q.shape[0]
    config = triton_gemm.DECODE_CONFIG
    assert m <= config["BLOCK_M"], "the single-kernel product holds every row in one block"
    acc = torch.empty((m, n), dtype=torch.int32, device=x.device)
    _quantizing_product_kernel[(triton.cdiv(n, config["BLOCK_N"]),)](
        x, w_q, acc, m, n, k, outlier_limit(threshold), x.stride(0), x.stride(1), w_q.stride(0), w_q.stride(1),
        OUTLIER_CODES=True, **config,
    )
    return acc
