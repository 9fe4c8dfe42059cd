"""llmint8::cpu_int8_mm, the AVX2 kernel on dense codes: its int32 product is the reference's bit for bit, and its
outlier product is the reference's up to fp32 summation order."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import int8pass
from int8pass import reference
from int8pass.lowering import cpu_int8_mm
from tests.helpers import outlier_activation

pytestmark = pytest.mark.skipif(not cpu_int8_mm.available(), reason="needs an x86 CPU with AVX2 and a C++ compiler")


def check(x, w_q, threshold=6.0):
    is_outlier = reference.outlier_columns(x, threshold)
    x_q, _ = reference.quantize_inliers(x, is_outlier)
    acc, outliers = torch.ops.llmint8.cpu_int8_mm(x_q, x, is_outlier, w_q)
    assert acc.dtype == torch.int32 and torch.equal(acc, reference.exact_int_matmul(x_q, w_q))
    indices, count = reference.compact_indices(is_outlier)
    unit = torch.full((w_q.shape[0],), reference.Q_MAX)  # s_w = 127: the reference's outlier product in codes
    want = reference.outlier_matmul(x, indices, count, w_q, unit)
    torch.testing.assert_close(outliers, want, rtol=1e-5, atol=1e-5 * (1 + want.abs().max().item()) if want.numel() else 0)
    return acc, outliers


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(0, 9),
    n=st.integers(0, 150),
    k=st.integers(1, 200),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
    seed=st.integers(0, 2**16),
)
def test_matches_the_reference_at_every_tile_edge(m, n, k, dtype, seed):
    # m, n and k straddle the kernel's 3-row, 4-column and 32-wide tiles and its 64-row blocks
    g = torch.Generator().manual_seed(seed)
    x = outlier_activation(m, k, dtype, outlier_cols=[c for c in (0, k // 3, k - 1) if c < k], seed=seed)
    check(x, torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8))


@pytest.mark.parametrize("m", [1, 7, 64])
def test_extreme_codes_never_saturate(m):
    # |x_q| = 127 against w_q = -128 and 127: every int16 pair of vpmaddubsw at its largest magnitude
    k = 4096
    x = torch.full((m, k), 5.0)
    x[:, 1::2] = -5.0
    w_q = torch.full((130, k), 127, dtype=torch.int8)
    w_q[::2] = -128
    w_q[1::3, ::2] = -127
    acc, _ = check(x, w_q)
    assert acc.abs().max() > 2**24  # beyond fp32's exact range: compared as int32


def test_many_outlier_columns_and_non_finite_values_propagate():
    x = outlier_activation(33, 300, torch.bfloat16, outlier_cols=list(range(0, 300, 3)))
    x[4, 7] = float("nan")
    x[9, 8] = float("inf")
    w_q = torch.randint(-127, 128, (70, 300), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    w_q[:, 8] = 3  # no zero code in the Inf column, so inf * 0 does not turn it into NaN
    is_outlier = reference.outlier_columns(x, 6.0)
    x_q, _ = reference.quantize_inliers(x, is_outlier)
    acc, outliers = torch.ops.llmint8.cpu_int8_mm(x_q, x, is_outlier, w_q)
    assert torch.equal(acc, reference.exact_int_matmul(x_q, w_q))
    assert outliers[4].isnan().all() and outliers[9].isinf().all() and outliers[[0, 32]].isfinite().all()


def test_rejects_codes_outside_the_range_and_bad_shapes():
    w_q = torch.zeros(8, 32, dtype=torch.int8)
    x = torch.zeros(2, 32)
    mask = torch.zeros(32, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"in \[-127, 127\]; got -128"):
        torch.ops.llmint8.cpu_int8_mm(torch.full((2, 32), -128, dtype=torch.int8), x, mask, w_q)
    with pytest.raises(ValueError, match="expects x_q int8"):
        torch.ops.llmint8.cpu_int8_mm(torch.zeros(2, 31, dtype=torch.int8), x, mask, w_q)


def test_opcheck():
    x = outlier_activation(5, 64, torch.bfloat16, outlier_cols=[9])
    is_outlier = reference.outlier_columns(x, 6.0)
    x_q, _ = reference.quantize_inliers(x, is_outlier)
    w_q = torch.randint(-127, 128, (16, 64), dtype=torch.int8)
    torch.library.opcheck(torch.ops.llmint8.cpu_int8_mm.default, (x_q, x, is_outlier, w_q))


def test_weights_stay_dense_and_the_compiled_linear_runs_the_kernel():
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
        torch.testing.assert_close(linear(x), want, rtol=0, atol=0)  # eager: the same kernel
        compiled = torch.compile(linear, backend="llmint8", fullgraph=True)
        torch.testing.assert_close(compiled(x), want, rtol=2 * torch.finfo(torch.bfloat16).eps, atol=1e-5)
