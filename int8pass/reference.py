"""LLM.int8() semantics in plain PyTorch: the spec every kernel and lowering is tested against.

See docs/design.md §1. Everything here is traceable (no data-dependent shapes except in `outlier_matmul`, which
the compiled paths replace with a custom op), so the CPU lowering traces these same functions and Inductor
fuses them.
"""

from __future__ import annotations

import math
import torch

Q_MAX = 127.0
# int8 x int8 products are at most 127**2, so int32 holds any K up to this without overflow.
MAX_EXACT_K = (2**31 - 1) // (127 * 127)


def _scale_to_codes(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """round(127 * v / s) as int8, with s = 0 giving 0.

    Divides before multiplying so that values near the fp32 maximum cannot overflow: |v / s| <= 1.
    """
    safe_scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.round(values / safe_scale * Q_MAX).to(torch.int8)


def _row_absmax(w: torch.Tensor) -> torch.Tensor:
    """max_k |W[n, k]| of a [N, K] weight, in its dtype (0 for rows without columns)."""
    return w.abs().amax(dim=1) if w.shape[1] > 0 else w.new_zeros(w.shape[0])


def quantize_weight(weight: torch.Tensor, row_absmax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Vector-wise (per output row) int8 quantization of a [N, K] weight -> (W_q int8 [N, K], s_w fp32 [N]).

    row_absmax: s_w when `weight` holds some columns of longer rows (a row-parallel shard, docs/design.md §1c), so
    that its codes are those columns of the whole weight's codes.
    """
    w = weight.float()
    s_w = _row_absmax(w) if row_absmax is None else row_absmax.float()
    return _scale_to_codes(w, s_w[:, None]), s_w


def dequantize_weight(w_q: torch.Tensor, s_w: torch.Tensor) -> torch.Tensor:
    """W^ = W_q * s_w / 127 in fp32 [N, K]."""
    return w_q.float() * (s_w / Q_MAX)[:, None]


def outlier_columns(x2d: torch.Tensor, threshold: float) -> torch.Tensor:
    """Bool [K]: columns whose max |x| reaches the threshold, plus every column holding NaN or +-Inf.

    Non-finite columns are outliers even when threshold <= 0 (no magnitude outliers): they must travel the
    fp32 path so that NaN/Inf propagate as in an fp16 matmul instead of poisoning a row's scale.
    """
    if x2d.shape[0] == 0:
        return torch.zeros(x2d.shape[1], dtype=torch.bool, device=x2d.device)
    # in fp32 (the same values: abs and max are exact); a bf16 result here trips Inductor's C++ codegen when
    # several linears share one input (duplicate declarations when storing the shared reduction as bf16)
    col_absmax = x2d.float().abs().amax(dim=0)
    limit = threshold if threshold > 0 else math.inf
    return ~(col_absmax < limit)  # NaN compares False, so NaN columns land in the outlier set


def compact_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Static-shape form of a column set: (indices int32 [K], count int32 [1]).

    The first `count` entries are the set's columns in ascending order; the rest are the other columns (never
    read). A stable sort keeps the order deterministic without a data-dependent shape.
    """
    order = torch.sort((~mask).to(torch.uint8), stable=True).indices
    return order.to(torch.int32), mask.sum(dtype=torch.int32).reshape(1)


def quantize_activation(
    x2d: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Calibrate-free activation quantization of X [M, K].

    Returns (X_q int8 [M, K], s_x fp32 [M], outlier indices int32 [K], outlier count int32 [1]).
    Outlier columns are zeroed before the row scales are taken, so X_q is 0 there.
    """
    is_outlier = outlier_columns(x2d, threshold)
    x_inliers = torch.where(is_outlier, 0.0, x2d.float())
    if x2d.shape[0] == 0:
        s_x = x_inliers.new_zeros(0)
    else:
        s_x = x_inliers.abs().amax(dim=1)
    indices, count = compact_indices(is_outlier)
    return _scale_to_codes(x_inliers, s_x[:, None]), s_x, indices, count


def exact_int_matmul(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """(X_q . W_q^T) as int32, computed in fp64 (exact: |sums| < 2**53), so it runs on any device."""
    return (x_q.double() @ w_q.double().t()).to(torch.int32)


def outlier_matmul(
    x2d: torch.Tensor,
    indices: torch.Tensor,
    count: torch.Tensor,
    weight: torch.Tensor,
    s_w: torch.Tensor,
) -> torch.Tensor:
    """X[:, O] . W^[:, O]^T in fp32 [M, N].

    An int8 weight is dequantized, W^ = W_q s_w / 127, applied as (X[:, O] . W_q[:, O]^T) * s_w / 127: the
    same product with the scale taken out of the sum, so kernels that see only the codes match bit for bit.
    A floating weight (the outlier_weights="original" option) is used as it is.
    """
    cols = indices[: int(count.item())].long()
    product = x2d[:, cols].float() @ weight[:, cols].float().t()
    return product * (s_w / Q_MAX) if weight.dtype == torch.int8 else product


def dequantize_output(
    x: torch.Tensor,
    acc: torch.Tensor,
    s_x: torch.Tensor,
    s_w: torch.Tensor,
    outlier_product: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """The epilogue: acc * s_x s_w / 127^2 + outlier product + b in fp32, then one rounding to X's dtype.

    acc is the int32 accumulator already converted to fp32 (exact below 2**24, one rounding above).
    """
    y = acc * (s_x[:, None] * (s_w[None, :] / (Q_MAX * Q_MAX))) + outlier_product
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], s_w.shape[0])


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
    """The output [M, N] from X [M, K] and its quantization: the exact int32 product, the outlier product
    (with `outlier_weight` instead of W^ when given) and the epilogue."""
    acc = exact_int_matmul(x_q, w_q).float()
    outliers = outlier_matmul(x2d, indices, count, w_q if outlier_weight is None else outlier_weight, s_w)
    return dequantize_output(x2d, acc, s_x, s_w, outliers, bias)


def linear(
    x: torch.Tensor,
    w_q: torch.Tensor,
    s_w: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: float,
    outlier_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Y = (X_q . W_q^T) * s_x s_w / 127^2 + X[:, O] . W^[:, O]^T + b, rounded once to X's dtype.

    x may have any leading dims. `outlier_weight` replaces W^ for the outlier columns when given (the
    `outlier_weights="original"` option).
    """
    x2d = x.reshape(-1, w_q.shape[1])
    y = int8_mm_dequant(x2d, *quantize_activation(x2d, threshold), w_q, s_w, bias, outlier_weight)
    return y.reshape(*x.shape[:-1], w_q.shape[0])


def error_bound(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, threshold: float,
    row_absmax: torch.Tensor | None = None,
) -> torch.Tensor:
    """docs/design.md §1 bound on |llmint8(x) - (x W^T + b)| for each output element, in fp64.

    Slack terms used: fp32 accumulation of the scaled int32 part, the outlier product and the bias, bounded
    by (K + 4) * 2**-24 * (|X| |W|^T + |b|) plus the same for the quantization terms; and one rounding to
    X's dtype, half an ulp of (|exact| + bound). row_absmax: s_w when `weight`'s rows are slices of longer ones
    (quantize_weight's).
    """
    k = weight.shape[1]
    x2d = x.reshape(-1, k).double()
    w = weight.double()
    _, s_x, _, _ = quantize_activation(x.reshape(-1, k), threshold)
    s_x = s_x.double()
    s_w = _row_absmax(w) if row_absmax is None else row_absmax.double()
    abs_w_rows = w.abs().sum(dim=1)
    abs_x_rows = x2d.abs().sum(dim=1)
    quantization = (
        s_x[:, None] / 254 * abs_w_rows[None, :]
        + s_w[None, :] / 254 * abs_x_rows[:, None]
        + k * s_x[:, None] * s_w[None, :] / 254**2
    )
    magnitude = x2d.abs() @ w.abs().t()
    exact = x2d @ w.t()
    if bias is not None:
        magnitude = magnitude + bias.double().abs()
        exact = exact + bias.double()
    fp32_slack = (k + 4) * 2.0**-24 * (magnitude + quantization)
    bound = quantization + fp32_slack
    out_eps = torch.finfo(x.dtype).eps if x.dtype.is_floating_point else 2.0**-23
    bound = bound + out_eps * (exact.abs() + bound)
    return bound.reshape(*x.shape[:-1], weight.shape[0])


def shard_bounds(size: int, world_size: int) -> list[tuple[int, int]]:
    """[start, stop) of each rank's slice when `size` rows or columns are split over `world_size` ranks: DTensor's
    Shard rule (torch.chunk's: ceil(size / world_size) each, the last ones shorter or empty)."""
    chunk = -(-size // world_size) if world_size else 0
    return [(min(rank * chunk, size), min((rank + 1) * chunk, size)) for rank in range(world_size)]


def row_parallel_error_bound(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, threshold: float, world_size: int
) -> torch.Tensor:
    """docs/design.md §1c bound on |Y - (x W^T + b)| when `world_size` ranks each hold a slice of W's columns
    (shard_bounds), compute llmint8 of their slice of x (its own s_x, outliers, one rounding to x's dtype), and the
    partials are summed in x's dtype (all-reduce), then b is added: the slices' §1 bounds with the whole rows' s_w,
    plus world_size roundings to x's dtype of the partials' magnitudes."""
    k = weight.shape[1]
    x2d, w = x.reshape(-1, k), weight.double()
    s_w = _row_absmax(w)
    bound = x2d.new_zeros(x2d.shape[0], w.shape[0], dtype=torch.float64)
    magnitude = bound.clone()
    for start, stop in shard_bounds(k, world_size):
        if start == stop:  # a rank without columns adds nothing
            continue
        part = error_bound(x2d[:, start:stop], weight[:, start:stop], None, threshold, row_absmax=s_w)
        bound = bound + part
        magnitude = magnitude + (x2d[:, start:stop].double() @ w[:, start:stop].t()).abs() + part
    if bias is not None:
        magnitude = magnitude + bias.double().abs()
    out_eps = torch.finfo(x.dtype).eps if x.dtype.is_floating_point else 2.0**-23
    bound = bound + world_size * out_eps * magnitude
    return bound.reshape(*x.shape[:-1], weight.shape[0])


# ---- block mode (docs/design.md §1b): one scale per block of `block_size` consecutive columns of each row --------

BLOCK_SIZES = (32, 64, 128)


def block_count(k: int, block_size: int) -> int:
    return -(-k // block_size)


def _block_absmax(values: torch.Tensor, block_size: int) -> torch.Tensor:
    """max |v| over each block of columns of a 2-D tensor -> fp32 [rows, blocks] (the last block may be shorter)."""
    rows, k = values.shape
    blocks = block_count(k, block_size)
    padded = values.float().new_zeros(rows, blocks * block_size)
    padded[:, :k] = values.float().abs()
    return padded.reshape(rows, blocks, block_size).amax(dim=2) if blocks else padded.new_zeros(rows, 0)


def _per_column(scale: torch.Tensor, k: int, block_size: int) -> torch.Tensor:
    """A [rows, blocks] scale expanded to [rows, k], each column getting its block's."""
    return scale.float().repeat_interleave(block_size, dim=1)[:, :k]


def _block_codes(values: torch.Tensor, d: torch.Tensor, block_size: int) -> torch.Tensor:
    """clamp(round(v / d), -127, 127) as int8 with each column's block scale d (d = 0 divides by 1). The clamp only
    acts where d is subnormal and so coarser than absmax / 127."""
    d = _per_column(d, values.shape[1], block_size)
    safe = torch.where(d == 0, torch.ones_like(d), d)
    return torch.round(values.float() / safe).clamp(-Q_MAX, Q_MAX).to(torch.int8)


def quantize_weight_blocks(weight: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise int8 quantization of a [N, K] weight -> (W_q int8 [N, K], d_w bf16 [N, blocks]).

    d_w = absmax / 127 rounded to bf16 (its range is fp32's, so no weight is out of range), and the codes are taken
    with that stored d_w, so W_q * d_w is what the kernels multiply by.
    """
    d_w = (_block_absmax(weight, block_size) / Q_MAX).to(torch.bfloat16)
    return _block_codes(weight, d_w, block_size), d_w


def dequantize_blocks(w_q: torch.Tensor, d_w: torch.Tensor, block_size: int) -> torch.Tensor:
    """W_q * d_w in fp32 [N, K]."""
    return w_q.float() * _per_column(d_w, w_q.shape[1], block_size)


def quantize_activation_blocks(
    x2d: torch.Tensor, block_size: int, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """X [M, K] -> (X_q int8 [M, K], d_x fp32 [M, blocks], outlier mask bool [K]): the outlier columns (as
    LLM.int8()'s, outlier_columns) are zeroed, then each block of each row gets d_x = its absmax / 127 in fp32."""
    is_outlier = outlier_columns(x2d, threshold)
    x_inliers = torch.where(is_outlier, 0.0, x2d.float())
    d_x = _block_absmax(x_inliers, block_size) / Q_MAX
    return _block_codes(x_inliers, d_x, block_size), d_x, is_outlier


def block_linear(
    x: torch.Tensor,
    w_q: torch.Tensor,
    d_w: torch.Tensor,
    bias: torch.Tensor | None,
    block_size: int,
    threshold: float,
) -> torch.Tensor:
    """Y = sum over blocks b of (X_q . W_q^T over b)_int32 * d_x[:, b] d_w[:, b] + X[:, O] . W^[:, O]^T + b, in fp32,
    rounded once to X's dtype; W^ = W_q * d_w. x may have any leading dims.

    The blocks' int32 products are exact (computed in fp64, |sums| < 2**53); their scaled fp32 values are added in
    block order here, in another order by the kernels (the bound of docs/design.md §1b covers any order).
    """
    k = w_q.shape[1]
    x2d = x.reshape(-1, k)
    x_q, d_x, is_outlier = quantize_activation_blocks(x2d, block_size, threshold)
    y = x2d.new_zeros(x2d.shape[0], w_q.shape[0], dtype=torch.float32)
    for b, start in enumerate(range(0, k, block_size)):
        cols = slice(start, start + block_size)
        dots = exact_int_matmul(x_q[:, cols], w_q[:, cols]).float()
        y = y + dots * (d_x[:, b, None] * d_w[None, :, b].float())
    cols = is_outlier.nonzero().flatten()
    if cols.numel():
        y = y + x2d[:, cols].float() @ dequantize_blocks(w_q, d_w, block_size)[:, cols].t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], w_q.shape[0])


def block_error_bound(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, block_size: int, threshold: float
) -> torch.Tensor:
    """docs/design.md §1b bound on |block_linear(x) - (x W^T + b)| for each output element, in fp64.

    Per block, |E_x| <= d_x / 2 and |E_w| <= d_w / 2 elementwise, so the block's product is off by at most
    d_x/2 sum|W| + d_w/2 sum|X| + n_b d_x d_w / 4; plus 127 * 2**-149 per element where a scale underflowed to 0 (a
    block of values below 2**-140), the fp32 slack and one rounding to X's dtype, as in error_bound.
    """
    k = weight.shape[1]
    x2d = x.reshape(-1, k)
    _, d_x, _ = quantize_activation_blocks(x2d, block_size, threshold)
    _, d_w = quantize_weight_blocks(weight, block_size)
    d_x, d_w = d_x.double(), d_w.double()
    xd, w = x2d.double(), weight.double()
    blocks = block_count(k, block_size)
    sizes = torch.tensor([min(block_size, k - b * block_size) for b in range(blocks)], dtype=torch.float64)
    abs_x_blocks = _block_sums(xd.abs(), block_size)
    abs_w_blocks = _block_sums(w.abs(), block_size)
    quantization = d_x / 2 @ abs_w_blocks.t() + abs_x_blocks @ (d_w / 2).t() + (d_x * sizes) @ d_w.t() / 4
    underflow = 127 * 2.0**-149 * (xd.abs().sum(dim=1)[:, None] + w.abs().sum(dim=1)[None, :] + k)
    magnitude = xd.abs() @ w.abs().t()
    exact = xd @ w.t()
    if bias is not None:
        magnitude = magnitude + bias.double().abs()
        exact = exact + bias.double()
    bound = quantization + underflow
    bound = bound + (k + 4) * 2.0**-24 * (magnitude + bound)
    out_eps = torch.finfo(x.dtype).eps if x.dtype.is_floating_point else 2.0**-23
    bound = bound + out_eps * (exact.abs() + bound)
    return bound.reshape(*x.shape[:-1], weight.shape[0])


def _block_sums(values: torch.Tensor, block_size: int) -> torch.Tensor:
    rows, k = values.shape
    blocks = block_count(k, block_size)
    padded = values.new_zeros(rows, blocks * block_size)
    padded[:, :k] = values
    return padded.reshape(rows, blocks, block_size).sum(dim=2)


def per_tensor_int8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Naive W8A8 baseline: one absmax scale for all of X and one for all of W, no outlier split.

    Not part of llmint8; tests, the demo and the benchmarks use it to show what the outlier split prevents.
    """
    x2d = x.reshape(-1, x.shape[-1]).float()
    w = weight.float()
    s_x, s_w = x2d.abs().amax(), w.abs().amax()
    x_q = _scale_to_codes(x2d, s_x)
    w_q = _scale_to_codes(w, s_w)
    y = exact_int_matmul(x_q, w_q).float() * (s_x * s_w / (Q_MAX * Q_MAX))
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])
