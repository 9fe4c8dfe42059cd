"""The reference math against an independent float computation, within the docs/design.md bound."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from int8pass import reference
from tests.helpers import outlier_activation, within_bound

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def quantize_weight_by_hand(w):
    """Straightforward per-row loop, no vectorized tricks."""
    rows, scales = [], []
    for row in w.float():
        s = row.abs().max()
        scales.append(s)
        rows.append(torch.zeros_like(row, dtype=torch.int8) if s == 0 else torch.round(row / s * 127).to(torch.int8))
    return torch.stack(rows), torch.stack(scales)


@given(n=st.integers(1, 40), k=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_quantize_weight_matches_by_hand_loop(n, k, seed):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    w[0] = 0  # a zero row gives zero codes, no division by zero
    w_q, s_w = reference.quantize_weight(w)
    expected_q, expected_s = quantize_weight_by_hand(w)
    assert torch.equal(w_q, expected_q) and torch.equal(s_w, expected_s)
    assert w_q.dtype == torch.int8 and int(w_q.abs().max()) <= 127


def test_rounding_is_half_to_even():
    w = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5]])  # scale 127: codes are the values themselves
    w_q, _ = reference.quantize_weight(w)
    assert w_q.tolist() == [[127, 0, 2, 2, 0, -2]]


@given(
    m=st.integers(0, 9),
    k=st.integers(1, 70),
    threshold=st.sampled_from([-1.0, 0.0, 3.0, 6.0, 1e9]),
    n_outliers=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_outlier_columns_and_codes(m, k, threshold, n_outliers, seed):
    cols = list(range(0, k, max(1, k // (n_outliers + 1))))[:n_outliers]
    x = outlier_activation(m, k, outlier_cols=cols, seed=seed)
    x_q, s_x, indices, count = reference.quantize_activation(x, threshold)
    col_max = x.abs().amax(0) if m else torch.zeros(k)
    expected = [c for c in range(k) if threshold > 0 and col_max[c] >= threshold]
    assert indices[: int(count)].tolist() == expected
    assert sorted(indices.tolist()) == list(range(k))  # a permutation: the tail holds the other columns
    inliers = x.clone()
    inliers[:, expected] = 0
    for i in range(m):
        s = inliers[i].abs().max()
        assert s_x[i] == s
        want = torch.zeros(k, dtype=torch.int8) if s == 0 else torch.round(inliers[i] / s * 127).to(torch.int8)
        assert torch.equal(x_q[i], want)


def test_exact_int_matmul_is_exact_at_the_int32_limit():
    k = reference.MAX_EXACT_K
    x_q = torch.full((1, k), 127, dtype=torch.int8)
    w_q = torch.full((2, k), -127, dtype=torch.int8)
    assert reference.exact_int_matmul(x_q, w_q).tolist() == [[-(127 * 127) * k] * 2]


@pytest.mark.parametrize("dtype", DTYPES)
@given(
    m=st.integers(0, 8),
    n=st.integers(1, 24),
    k=st.integers(1, 80),
    threshold=st.sampled_from([0.0, 2.0, 6.0, 100.0]),
    with_bias=st.booleans(),
    outlier_cols=st.lists(st.integers(0, 79), max_size=4),
    zero_row=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_within_bound(dtype, m, n, k, threshold, with_bias, outlier_cols, zero_row, seed):
    g = torch.Generator().manual_seed(seed)
    x = outlier_activation(m, k, dtype, [c for c in outlier_cols if c < k], seed=seed)
    if zero_row and m:
        x[0] = 0
    weight = (torch.randn(n, k, generator=g) * 0.1).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
    w_q, s_w = reference.quantize_weight(weight)
    y = reference.linear(x, w_q, s_w, bias, threshold)
    assert y.dtype == dtype and y.shape == (m, n)
    within_bound(y, x, weight, bias, threshold)


def test_leading_dims_are_flattened():
    x = torch.randn(2, 3, 16)
    weight = torch.randn(5, 16)
    w_q, s_w = reference.quantize_weight(weight)
    y = reference.linear(x, w_q, s_w, None, 6.0)
    assert y.shape == (2, 3, 5)
    assert torch.equal(y.reshape(6, 5), reference.linear(x.reshape(6, 16), w_q, s_w, None, 6.0))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_activations_propagate_like_fp16(bad):
    torch.manual_seed(0)
    x = torch.randn(4, 32, dtype=torch.float16)
    weight = torch.randn(8, 32, dtype=torch.float16) * 0.1
    x[1, 5] = bad
    w_q, s_w = reference.quantize_weight(weight)
    for threshold in (0.0, 6.0):
        y = reference.linear(x, w_q, s_w, None, threshold)
        fp16 = (x.float() @ weight.float().t()).half()
        assert torch.equal(torch.isfinite(y), torch.isfinite(fp16))
        assert torch.isfinite(y[[0, 2, 3]]).all()


def test_naive_per_tensor_int8_breaks_on_outliers_where_llmint8_holds():
    torch.manual_seed(0)
    k, n = 512, 256
    x = outlier_activation(64, k, torch.float32, outlier_cols=[3, 100, 401], magnitude=60.0)
    weight = torch.randn(n, k) / math.sqrt(k)
    exact = x.double() @ weight.double().t()
    w_q, s_w = reference.quantize_weight(weight)
    llmint8 = reference.linear(x, w_q, s_w, None, 6.0)
    naive = reference.per_tensor_int8_linear(x, weight, None)
    within_bound(llmint8, x, weight, None, 6.0)
    # the signal of the non-outlier columns is ~1; naive int8 rounds those activations (|x| < 0.5 of a step) to 0
    inlier_part = x.clone()
    inlier_part[:, [3, 100, 401]] = 0
    signal = (inlier_part.double() @ weight.double().t()).abs().mean()
    naive_err = (naive.double() - exact).abs().mean()
    llmint8_err = (llmint8.double() - exact).abs().mean()
    assert naive_err > 0.3 * signal, (naive_err, signal)
    assert llmint8_err < 0.05 * signal, (llmint8_err, signal)
    assert naive_err > 10 * llmint8_err
