"""The Triton kernels (lowering/triton_quantize.py, lowering/triton_gemm.py) against int8pass.reference.

Quantization (codes, s_x, indices, count) and the int32 accumulator are bit-exact; Y matches reference.linear
up to the fp32 summation order of the outlier columns and is within the docs/design.md bound. Without a GPU the
kernels run in Triton's interpreter on CPU tensors.
"""

import pytest
import torch

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from int8pass import reference  # noqa: E402
from int8pass.lowering import triton_gemm, triton_quantize  # noqa: E402
from tests.helpers import assert_close_to_reference, outlier_activation, within_bound  # noqa: E402
from tests.triton_accumulators import int8_product, quantizing_product  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # conftest.py selects the interpreter without CUDA

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
THRESHOLDS = [0.0, 6.0, 1e30]


@st.composite
def activations(draw, max_m=40, max_k=100):
    """X [M, K] with M = 0, 1 or more, K not a multiple of the block sizes, injected outlier columns, zero
    rows, and sometimes a strided (non-contiguous) view."""
    m = draw(st.sampled_from([0, 1]) | st.integers(2, max_m))
    k = draw(st.integers(1, max_k))
    dtype = draw(st.sampled_from(DTYPES))
    outlier_cols = draw(st.lists(st.integers(0, k - 1), max_size=3, unique=True))
    x = outlier_activation(m, k, dtype, outlier_cols, seed=draw(st.integers(0, 2**16)))
    if m:
        x[draw(st.lists(st.integers(0, m - 1), max_size=2))] = 0
    if draw(st.booleans()):
        x = torch.cat([x, x], dim=1)[:, ::2]
    return x.to(DEVICE)


def two_step_linear(x, w_q, s_w, bias, threshold):
    """The Triton path for more than FUSED_MAX_M rows: quantization kernels, then the GEMM; any leading dims."""
    x2d = x.reshape(-1, w_q.shape[1])
    y = triton_gemm.int8_mm_dequant(x2d, *triton_quantize.quantize_activation(x2d, threshold), w_q, s_w, bias)
    return y.reshape(*x.shape[:-1], w_q.shape[0])


def quantized_weight(n, k, dtype, seed=0):
    """A floating weight [N, K] with its int8 codes and scales."""
    weight = (torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05).to(dtype).to(DEVICE)
    return (weight, *reference.quantize_weight(weight))


@triton.jit
def _round_kernel(v_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(v_ptr + offs, mask=offs < n)
    tl.store(out_ptr + offs, triton_quantize.round_half_even(v), mask=offs < n)


def test_round_half_even_matches_torch_round():
    halves = torch.arange(-128, 128, dtype=torch.float32) + 0.5
    near = torch.cat([halves, torch.nextafter(halves, halves + 1), torch.nextafter(halves, halves - 1)])
    uniform = torch.rand(4096, generator=torch.Generator().manual_seed(0)) * 255 - 127.5
    v = torch.cat([near, near.round(), uniform, torch.tensor([0.0, -0.0, 0.49999997, -0.49999997])]).to(DEVICE)
    out = torch.empty(v.shape, dtype=torch.int32, device=DEVICE)
    _round_kernel[(triton.cdiv(v.numel(), 1024),)](v, out, v.numel(), BLOCK=1024)
    assert torch.equal(out, torch.round(v).to(torch.int32))


@given(x=activations(), threshold=st.sampled_from(THRESHOLDS))
def test_quantize_activation_is_bit_exact(x, threshold):
    got = triton_quantize.quantize_activation(x, threshold)
    want = reference.quantize_activation(x, threshold)
    for name, g, w in zip(("x_q", "s_x", "indices", "count"), got, want):
        assert g.dtype == w.dtype and torch.equal(g, w), name


def test_quantize_activation_rounds_ties_to_even():
    # Row scale 127: the codes are the values themselves, so x.5 are exact ties.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.5, 126.5]], device=DEVICE)
    x_q, *_ = triton_quantize.quantize_activation(x, 0.0)
    assert x_q.tolist() == [[127, 0, 2, 2, 0, -2, 4, 126]]


def test_many_outlier_columns_are_compacted_across_blocks():
    # More columns than one compaction block, outliers in every block, in a ragged last block.
    k = triton_quantize.COMPACT_BLOCK * 2 + 37
    x = outlier_activation(3, k, torch.float16, outlier_cols=range(5, k, 97)).to(DEVICE)
    x[1, k - 1] = float("nan")
    for got, want in zip(triton_quantize.quantize_activation(x, 6.0), reference.quantize_activation(x, 6.0)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("m", [triton_quantize.SINGLE_PASS_ROWS, 2 * triton_quantize.SINGLE_PASS_ROWS + 5])
def test_long_prefill_flags_are_split_over_rows(m):
    # Outliers only in the last rows: the program covering them, not the first, must flag their columns.
    x = outlier_activation(m, 70, torch.bfloat16).to(DEVICE)
    x[m - 3, 4] = 50.0
    x[m - 1, 69] = float("-inf")
    got = triton_quantize.quantize_activation(x, 6.0)
    for g, w in zip(got, reference.quantize_activation(x, 6.0)):
        assert torch.equal(g, w)
    assert got[2][: int(got[3])].tolist() == [4, 69]


@pytest.mark.parametrize("m, k, n", [(0, 5, 3), (1, 1, 1), (16, 300, 40), (17, 129, 33), (40, 64, 16)])
def test_int32_accumulator_is_exact(m, k, n):
    g = torch.Generator().manual_seed(m * k * n)
    x_q = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    w_q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    if m:
        x_q[0] = 127  # the largest products, all of one sign
        w_q[0] = -127
    x_q, w_q = x_q.to(DEVICE), w_q.to(DEVICE)
    assert torch.equal(int8_product(x_q, w_q), reference.exact_int_matmul(x_q, w_q))


@given(
    x=activations(),
    n=st.integers(1, 40),
    threshold=st.sampled_from(THRESHOLDS),
    with_bias=st.booleans(),
    batched=st.booleans(),
)
def test_linear_matches_reference_and_bound(x, n, threshold, with_bias, batched):
    weight, w_q, s_w = quantized_weight(n, x.shape[1], x.dtype)
    bias = torch.randn(n).to(x.dtype).to(DEVICE) if with_bias else None
    if batched:  # leading dims are flattened and restored
        x = x.reshape(1, *x.shape)
    y = two_step_linear(x, w_q, s_w, bias, threshold)
    assert y.shape == (*x.shape[:-1], n) and y.dtype == x.dtype
    assert_close_to_reference(y, x, w_q, s_w, bias, threshold)
    within_bound(y, x, weight, bias, threshold)


@given(
    x=activations(max_m=triton_gemm.FUSED_MAX_M, max_k=300),
    n=st.integers(1, 70),
    threshold=st.sampled_from(THRESHOLDS),
    with_bias=st.booleans(),
    original=st.booleans(),
)
def test_single_kernel_linear_matches_reference(x, n, threshold, with_bias, original):
    # Quantizes X inside the GEMM: its int32 product is still the reference's, bit for bit (codes included).
    weight, w_q, s_w = quantized_weight(n, x.shape[1], x.dtype)
    bias = torch.randn(n).to(x.dtype).to(DEVICE) if with_bias else None
    x_q = reference.quantize_activation(x, threshold)[0]
    acc = quantizing_product(x, w_q, threshold)
    assert torch.equal(acc, reference.exact_int_matmul(x_q, w_q))
    outlier_weight = weight if original else None
    y = triton_gemm.fused_linear(x, w_q, s_w, bias, threshold, outlier_weight)
    assert y.shape == (x.shape[0], n) and y.dtype == x.dtype
    assert_close_to_reference(y, x, w_q, s_w, bias, threshold, outlier_weight)
    within_bound(y, x, weight, bias, threshold)


def test_single_kernel_linear_rejects_long_inputs():
    _, w_q, s_w = quantized_weight(8, 32, torch.float32)
    with pytest.raises(ValueError, match="at most 16 rows"):
        triton_gemm.fused_linear(torch.randn(17, 32, device=DEVICE), w_q, s_w, None, 6.0)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf * 0
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("single_kernel", [True, False])
def test_nan_and_inf_columns_poison_only_their_rows(dtype, threshold, single_kernel):
    m = 6 if single_kernel else 20
    x = outlier_activation(m, 50, dtype, outlier_cols=[7]).to(DEVICE)
    x[2, 11] = float("nan")
    x[5, 30] = float("inf")
    weight, w_q, s_w = quantized_weight(24, 50, dtype)
    bias = torch.randn(24).to(dtype).to(DEVICE)
    _, _, indices, count = triton_quantize.quantize_activation(x, threshold)
    assert set(indices[: int(count)].tolist()) == ({7, 11, 30} if threshold else {11, 30})
    if single_kernel:
        y = triton_gemm.fused_linear(x, w_q, s_w, bias, threshold)
    else:
        y = two_step_linear(x, w_q, s_w, bias, threshold)
    floating = x.float() @ weight.float().t()
    assert torch.equal(y.isfinite(), floating.isfinite())
    assert not y[[2, 5]].isfinite().any() and y[[0, 1, 3, 4, *range(6, m)]].isfinite().all()
    assert_close_to_reference(y, x, w_q, s_w, bias, threshold)


def test_cuda_op_kernel_matches_reference():
    from int8pass.lowering import linear

    x = outlier_activation(2 * 3, 40, torch.bfloat16, outlier_cols=[5, 31]).view(2, 3, 40).to(DEVICE)
    weight = (torch.randn(24, 40) * 0.1).to(torch.bfloat16).to(DEVICE)
    bias = torch.randn(24).to(torch.bfloat16).to(DEVICE)
    w_q, s_w = reference.quantize_weight(weight)
    y = linear.triton_linear(x, w_q, s_w, bias, 6.0)
    assert y.shape == (2, 3, 24)
    torch.testing.assert_close(y, reference.linear(x, w_q, s_w, bias, 6.0), rtol=2 * torch.finfo(torch.bfloat16).eps, atol=1e-3)
    with pytest.raises(ValueError, match="int8"):
        linear.triton_linear(x, weight, s_w, bias, 6.0)
