"""llmint8::avx2_linear, the CPU linear on dense codes in one C++ call: its int32 accumulator is the reference's bit
for bit, and so is its output wherever the reference's fp32 steps are exact regardless of summation order."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import int8pass
from int8pass import reference
from int8pass.lowering import avx2_linear
from tests.helpers import outlier_activation, within_bound

pytestmark = pytest.mark.skipif(not avx2_linear.available(), reason="needs an x86 CPU with AVX2 and a C++ compiler")
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@settings(max_examples=60, deadline=None)
@given(m=st.integers(0, 9), n=st.integers(0, 150), k=st.integers(1, 200), seed=st.integers(0, 2**16))
def test_accumulator_is_the_reference_at_every_tile_edge(m, n, k, seed):
    # m, n and k straddle the 3-row, 4-column and 32-wide tiles and the 64-row blocks
    g = torch.Generator().manual_seed(seed)
    x_q = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    w_q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    assert torch.equal(avx2_linear.int8_mm(x_q, w_q), reference.exact_int_matmul(x_q, w_q))


@pytest.mark.parametrize("m", [1, 7, 64])
def test_extreme_codes_never_saturate(m):
    # |x_q| = 127 against w_q = -128 and 127: every int16 pair of vpmaddubsw at its largest magnitude
    k = 4096
    x_q = torch.full((m, k), 127, dtype=torch.int8)
    x_q[:, 1::2] = -127
    w_q = torch.full((130, k), 127, dtype=torch.int8)
    w_q[::2] = -128
    w_q[1::3, ::2] = -127
    acc = avx2_linear.int8_mm(x_q, w_q)
    assert torch.equal(acc, reference.exact_int_matmul(x_q, w_q)) and acc.abs().max() > 2**24


def integer_valued(m, k, n, dtype, outlier_cols, seed):
    """Activations, codes and scales for which every fp32 step of the reference is exact whatever the order of its
    sums (integers, and outlier products far below 2**24), so the kernel must match it bit for bit."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-5, 6, (m, k), generator=g).float()
    x[:, outlier_cols] = torch.randint(-60, 61, (m, len(outlier_cols)), generator=g).float()
    if m:
        x[0, outlier_cols] = 40.0  # each listed column reaches the threshold
    w_q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    return x.to(dtype), w_q, torch.full((n,), reference.Q_MAX)


@settings(max_examples=40, deadline=None)
@given(m=st.integers(0, 20), n=st.integers(1, 140), k=st.integers(1, 300), dtype=st.sampled_from(DTYPES),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_linear_is_the_reference_bit_for_bit(m, n, k, dtype, bias, seed):
    outlier_cols = sorted({0, k // 2, k - 1})
    x, w_q, s_w = integer_valued(m, k, n, dtype, outlier_cols, seed)
    for cols in ([], outlier_cols):
        xs = x.clone()
        if not cols:
            xs = xs.clamp(-5, 5)  # no outlier column at all
        b = torch.randint(-3, 4, (n,)).to(dtype) if bias else None
        got = torch.ops.llmint8.avx2_linear(xs, w_q, s_w, b, 6.0)
        assert got.dtype == dtype and torch.equal(got, reference.linear(xs, w_q, s_w, b, 6.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 5, 130])
def test_linear_within_the_bound_of_real_valued_inputs(dtype, m):
    x = outlier_activation(m, 1000, dtype, outlier_cols=[3, 500, 999])
    weight = (torch.randn(200, 1000) * 0.03).to(dtype)
    bias = torch.randn(200).to(dtype)
    w_q, s_w = reference.quantize_weight(weight)
    y = torch.ops.llmint8.avx2_linear(x.reshape(m, 2, 500).reshape(m, 1000), w_q, s_w, bias, 6.0)
    within_bound(y, x, weight, bias, 6.0)
    torch.testing.assert_close(y, reference.linear(x, w_q, s_w, bias, 6.0), rtol=2 * torch.finfo(dtype).eps, atol=1e-5)
    original = torch.ops.llmint8.avx2_linear(x, w_q, s_w, bias, 6.0, weight)  # outlier_weights="original"
    torch.testing.assert_close(original, reference.linear(x, w_q, s_w, bias, 6.0, weight),
                               rtol=2 * torch.finfo(dtype).eps, atol=1e-5)


def test_threshold_zero_and_non_finite_values_propagate():
    x = outlier_activation(9, 300, torch.bfloat16, outlier_cols=list(range(0, 300, 3)))
    x[4, 7] = float("nan")
    x[6, 8] = float("inf")
    w_q = torch.randint(1, 128, (70, 300), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    s_w = torch.rand(70) + 0.5
    for threshold in (6.0, 0.0):  # with threshold 0 only the non-finite columns are outliers
        y = torch.ops.llmint8.avx2_linear(x, w_q, s_w, None, threshold)
        want = reference.linear(x, w_q, s_w, None, threshold)
        assert y[4].isnan().all() and y[6].isinf().all() and y[[0, 8]].isfinite().all()
        torch.testing.assert_close(y, want, rtol=2 * torch.finfo(torch.bfloat16).eps, atol=1e-5, equal_nan=True)


def test_rejects_what_it_cannot_run():
    w_q = torch.zeros(8, 32, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="for torch.float32"):
        torch.ops.llmint8.avx2_linear(torch.zeros(2, 32, dtype=torch.float64), w_q, torch.ones(8), None, 6.0)
    with pytest.raises(ValueError, match="does not end in K=32"):
        torch.ops.llmint8.avx2_linear(torch.zeros(2, 31), w_q, torch.ones(8), None, 6.0)


def test_opcheck():
    x = outlier_activation(5, 64, torch.bfloat16, outlier_cols=[9])
    w_q, s_w = reference.quantize_weight(torch.randn(16, 64) * 0.1)
    torch.library.opcheck(torch.ops.llmint8.avx2_linear.default, (x, w_q, s_w, torch.randn(16).bfloat16(), 6.0))


def test_weights_stay_dense_and_compiled_linears_are_one_call():
    # on a CPU without VNNI the kernel replaces oneDNN's split GEMM, so weights keep the dense layout it reads
    if not int8pass.lowering.onednn_int8_mm.EXACT_U8_GEMM:
        assert not int8pass.lowering.packs_weights(torch.device("cpu"))
    linear = torch.nn.Linear(64, 48).to(torch.bfloat16)
    weight = linear.weight.detach().clone()
    x = outlier_activation(6, 64, torch.bfloat16, outlier_cols=[3])
    linear.weight = torch.nn.Parameter(int8pass.Int8Weight.from_float(weight, packed=False), requires_grad=False)
    w_q, s_w = reference.quantize_weight(weight)
    want = reference.linear(x, w_q, s_w, linear.bias, 6.0)
    with torch.no_grad():
        torch.testing.assert_close(linear(x), want, rtol=2 * torch.finfo(torch.bfloat16).eps, atol=1e-5)  # eager
        compiled = torch.compile(linear, backend="llmint8", fullgraph=True)
        torch.testing.assert_close(compiled(x), want, rtol=2 * torch.finfo(torch.bfloat16).eps, atol=1e-5)
