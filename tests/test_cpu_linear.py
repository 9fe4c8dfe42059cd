"""llmint8::cpu_linear, the CPU linear in one C++ call, with each GEMM kernel this CPU has (AVX2, AVX512-VNNI, AMX):
its int32 accumulator is the reference's bit for bit, and so is its output wherever the reference's fp32 steps are
exact regardless of summation order."""

import contextlib
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import int8pass
from int8pass import reference
from int8pass.int8_weight import code_sums
from int8pass.lowering import cpu_linear
from tests.helpers import outlier_activation, within_bound

pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="needs an x86-64 CPU with AVX2 and a C++ compiler")
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
KERNELS = cpu_linear.kernels()


@contextlib.contextmanager
def using(kernel, vbmi2="1"):
    """The kernel capped at `kernel`; vbmi2="0": the decode rows' outlier codes gathered after the GEMM rather than
    collected by it (what CPUs without AVX512-VBMI2 run)."""
    previous = {name: os.environ.get(name) for name in ("INT8PASS_CPU_KERNEL", "INT8PASS_CPU_VBMI2")}
    os.environ["INT8PASS_CPU_KERNEL"], os.environ["INT8PASS_CPU_VBMI2"] = kernel, vbmi2
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


VBMI2 = pytest.mark.parametrize("vbmi2", ["1", "0"], ids=["collected", "gathered"])


def accumulator(x_q, w_q, with_sums):
    """X_q . W_q^T as the kernel computes it, read through the op: x = X_q / 127 with a code of 127 in every row makes
    s_x = 1 and gives back X_q exactly, s_w = 127^2 makes the epilogue multiply by exactly 1, and fp32 holds the int32
    exactly below 2^24. with_sums: given the weight's code sums, as an Int8Weight passes them (without, the VNNI and
    AMX kernels sum the rows themselves)."""
    x = x_q.float() / reference.Q_MAX
    sums = code_sums(w_q) if with_sums else None
    return torch.ops.llmint8.cpu_linear(x, w_q, torch.full((w_q.shape[0],), reference.Q_MAX**2), None, 6.0, None, sums)


def codes(m, k, n, seed, limit=127):
    g = torch.Generator().manual_seed(seed)
    x_q = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    x_q[:, 0] = 127
    w_q = torch.randint(-limit, limit + 1, (n, k), generator=g, dtype=torch.int8)
    return x_q, w_q


def test_kernel_choice_follows_the_rows_and_the_cap():
    assert cpu_linear.kernel(512, 4096) == KERNELS[-1]
    if "amx" in KERNELS:  # from 5 rows up AMX (16-row tiles) beats VNNI; fewer run VNNI's dot products
        assert cpu_linear.kernel(4, 4096) == "avx512_vnni" and cpu_linear.kernel(5, 4096) == "amx"
    with using("avx2"):
        assert cpu_linear.kernel(512, 4096) == "avx2"


@pytest.mark.parametrize("kernel", KERNELS)
@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 150), k=st.integers(1, 300), seed=st.integers(0, 2**16),
       with_sums=st.booleans())
def test_accumulator_is_the_reference_at_every_tile_edge(kernel, m, n, k, seed, with_sums):
    # m, n and k straddle every kernel's tiles (3 x 4 x 32, 4 x 4 x 64, VNNI's 4-row vectors from 5 to 16 rows in 2, 3
    # or 4 groups over 16 columns, its packed 16-row tiles in ones, twos and threes from 17; AMX's 16 x 16 x 64) and
    # the 64-row blocks
    x_q, w_q = codes(m, k, n, seed)
    with using(kernel):
        assert torch.equal(accumulator(x_q, w_q, with_sums), reference.exact_int_matmul(x_q, w_q).float())


@pytest.mark.parametrize("kernel", KERNELS)
# (600, ...): three chunks of activation rows; (48, ...): the VNNI kernel's packed tiles, three of them, and K % 4 = 2;
# (4, ...): VNNI's 4 x 4 tiles streaming a long K; (16, ...), (13, ...), (7, ...): 4 rows to a vector, 4 and 2 groups,
# several column passes, K % 16 = 4 and 10
@pytest.mark.parametrize("m, n, k", [(1, 4096, 4096), (4, 300, 14336), (16, 130, 4160), (13, 70, 4100), (7, 70, 2058),
                                     (33, 64, 4096), (100, 70, 1000), (600, 70, 4096), (48, 100, 4102)])
@pytest.mark.parametrize("with_sums", [False, True])
def test_accumulator_is_the_reference_at_model_sizes(kernel, m, n, k, with_sums):
    x_q, w_q = codes(m, k, n, seed=m, limit=31)  # |acc| < 2^24: exact in the fp32 output
    with using(kernel):
        assert torch.equal(accumulator(x_q, w_q, with_sums), reference.exact_int_matmul(x_q, w_q).float())


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("m", [1, 7, 13, 64])
@pytest.mark.parametrize("with_sums", [False, True])
def test_extreme_codes_never_saturate(kernel, m, with_sums):
    # |x_q| = 127 against w_q = -128 and 127: every int16 pair of AVX2's vpmaddubsw at its largest magnitude, and
    # VNNI's X_q + 128 at 255
    k = 4096
    x_q = torch.full((m, k), 127, dtype=torch.int8)
    x_q[:, 1::2] = -127
    w_q = torch.full((130, k), 127, dtype=torch.int8)
    w_q[::2] = -128
    w_q[1::3, ::2] = -127
    want = reference.exact_int_matmul(x_q, w_q)
    with using(kernel):
        got = accumulator(x_q, w_q, with_sums)
    assert want.abs().max() > 2**24 and torch.equal(got, want.float())  # past 2^24: compared as fp32 rounds them


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


@pytest.mark.parametrize("kernel", KERNELS)
@VBMI2
@settings(max_examples=30, deadline=None)
@given(m=st.integers(0, 40), n=st.integers(1, 140), k=st.integers(1, 300), dtype=st.sampled_from(DTYPES),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_linear_is_the_reference_bit_for_bit(kernel, vbmi2, m, n, k, dtype, bias, seed):
    # outlier columns at both ends of the rows and in the middle
    outlier_cols = sorted({c for c in (0, 1, 2, k // 2, k - 1) if c < k})
    x, w_q, s_w = integer_valued(m, k, n, dtype, outlier_cols, seed)
    for cols in ([], outlier_cols):
        xs = x.clone()
        if not cols:
            xs = xs.clamp(-5, 5)  # no outlier column at all
        b = torch.randint(-3, 4, (n,)).to(dtype) if bias else None
        with using(kernel, vbmi2):
            got = torch.ops.llmint8.cpu_linear(xs, w_q, s_w, b, 6.0)
        assert got.dtype == dtype and torch.equal(got, reference.linear(xs, w_q, s_w, b, 6.0))


@pytest.mark.parametrize("kernel", KERNELS)
@VBMI2
@pytest.mark.parametrize("m", [1, 2, 3, 4, 6, 7, 40])
@pytest.mark.parametrize("dtype", DTYPES)
def test_many_outlier_columns_are_the_reference_bit_for_bit(kernel, vbmi2, m, dtype):
    # 250 outlier columns of 600: the outlier product goes 96 columns at a time (continuing each output's sums) and
    # several activation rows at a time (with AMX from 32 rows, by bf16 tiles of 32 columns, the last one short, the
    # values split into 1-3 bf16 terms by dtype); 70 weight rows: a full 64-row block, then 6 (the kernels' tails)
    outlier_cols = list(range(0, 600, 12)) + list(range(5, 600, 3))[:200]
    x, w_q, s_w = integer_valued(m, 600, 70, dtype, sorted(set(outlier_cols)), seed=m)
    with using(kernel, vbmi2):
        got = torch.ops.llmint8.cpu_linear(x, w_q, s_w, None, 6.0)
    assert torch.equal(got, reference.linear(x, w_q, s_w, None, 6.0))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 5, 130])
@pytest.mark.parametrize("outlier_cols", [[3, 500, 999], list(range(7, 1000, 25))])
def test_linear_within_the_bound_of_real_valued_inputs(kernel, dtype, m, outlier_cols):
    # 40 outlier columns at 130 rows: with AMX, the outlier product by bf16 tiles
    x = outlier_activation(m, 1000, dtype, outlier_cols=outlier_cols)
    weight = (torch.randn(200, 1000) * 0.03).to(dtype)
    bias = torch.randn(200).to(dtype)
    w_q, s_w = reference.quantize_weight(weight)
    with using(kernel):
        y = torch.ops.llmint8.cpu_linear(x.reshape(m, 2, 500).reshape(m, 1000), w_q, s_w, bias, 6.0)
        original = torch.ops.llmint8.cpu_linear(x, w_q, s_w, bias, 6.0, weight)  # outlier_weights="original"
    within_bound(y, x, weight, bias, 6.0)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(y, reference.linear(x, w_q, s_w, bias, 6.0), rtol=2 * eps, atol=1e-5)
    torch.testing.assert_close(original, reference.linear(x, w_q, s_w, bias, 6.0, weight), rtol=2 * eps, atol=1e-5)


def test_leading_dims_and_strided_inputs():
    x = outlier_activation(24, 96, torch.bfloat16, outlier_cols=[5]).reshape(2, 3, 4, 96)
    w_q, s_w = reference.quantize_weight(torch.randn(40, 96) * 0.1)
    y = torch.ops.llmint8.cpu_linear(x.transpose(0, 1), w_q, s_w, None, 6.0)  # not contiguous
    assert y.shape == (3, 2, 4, 40) and y.is_contiguous()
    assert torch.equal(y, reference.linear(x.transpose(0, 1).contiguous(), w_q, s_w, None, 6.0))
    empty = torch.ops.llmint8.cpu_linear(torch.zeros(0, 96, dtype=torch.bfloat16), w_q, s_w, None, 6.0)
    assert empty.shape == (0, 40)


@pytest.mark.parametrize("dtype", DTYPES)
def test_threshold_zero_and_non_finite_values_propagate(dtype):
    # 40 rows and 100 outlier columns: with AMX the outlier product by bf16 tiles, the values split into bf16 terms and
    # the products summed in another order than the reference's (a few fp32 ulps of the largest outputs, where an
    # output cancels; bf16 outputs round them away)
    x = outlier_activation(40, 300, dtype, outlier_cols=list(range(0, 300, 3)))
    x[4, 7] = float("nan")
    x[6, 8] = float("inf")
    w_q = torch.randint(1, 128, (70, 300), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    s_w = torch.rand(70) + 0.5
    for threshold in (6.0, 0.0):  # with threshold 0 only the non-finite columns are outliers
        y = torch.ops.llmint8.cpu_linear(x, w_q, s_w, None, threshold)
        want = reference.linear(x, w_q, s_w, None, threshold)
        assert y[4].isnan().all() and y[6].isinf().all() and y[[0, 8]].isfinite().all()
        reorder = 16 * torch.finfo(torch.float32).eps * want[want.isfinite()].abs().max().item()
        torch.testing.assert_close(y, want, rtol=2 * torch.finfo(dtype).eps, atol=max(1e-5, reorder), equal_nan=True)


@pytest.mark.parametrize("kernel", KERNELS)
@VBMI2
@pytest.mark.parametrize("m", [1, 2, 4])
def test_decode_rows_propagate_non_finite_outlier_columns(kernel, vbmi2, m):
    # for up to 4 rows and dense outlier columns (here one in 7) the VNNI kernel takes the outlier product 16 columns
    # at a time, from the codes the GEMM collected, or (one or two rows, without VBMI2) with zeros beside the outlier
    # columns: a NaN or an Inf must still reach every output of its row, and only its row's
    x = outlier_activation(m, 300, torch.bfloat16, outlier_cols=list(range(0, 300, 7)))
    x[m - 1, 8] = float("nan") if m == 1 else float("inf")
    w_q = torch.randint(1, 128, (70, 300), generator=torch.Generator().manual_seed(2), dtype=torch.int8)
    s_w = torch.rand(70) + 0.5
    with using(kernel, vbmi2):
        y = torch.ops.llmint8.cpu_linear(x, w_q, s_w, None, 6.0)
    assert (y[m - 1].isnan() if m == 1 else y[m - 1].isinf()).all() and y[: m - 1].isfinite().all()
    want = reference.linear(x, w_q, s_w, None, 6.0)
    torch.testing.assert_close(y, want, rtol=2 * torch.finfo(torch.bfloat16).eps, atol=1e-5, equal_nan=True)


def test_rejects_what_it_cannot_run():
    w_q = torch.zeros(8, 32, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="x must be float32, bfloat16 or float16"):
        torch.ops.llmint8.cpu_linear(torch.zeros(2, 32, dtype=torch.float64), w_q, torch.ones(8), None, 6.0)
    with pytest.raises(RuntimeError, match="last dim must be K = 32"):
        torch.ops.llmint8.cpu_linear(torch.zeros(2, 31), w_q, torch.ones(8), None, 6.0)
    with pytest.raises(RuntimeError, match="weight_scale must be float32 \\[8\\]"):
        torch.ops.llmint8.cpu_linear(torch.zeros(2, 32), w_q, torch.ones(7), None, 6.0)
    with pytest.raises(RuntimeError, match="weight_q must be int8"):
        torch.ops.llmint8.cpu_linear(torch.zeros(2, 32), w_q.float(), torch.ones(8), None, 6.0)
    with pytest.raises(RuntimeError, match="code_sums must be a CPU int32 \\[8\\]"):
        torch.ops.llmint8.cpu_linear(torch.zeros(2, 32), w_q, torch.ones(8), None, 6.0, None, torch.zeros(8))


def test_opcheck():
    x = outlier_activation(5, 64, torch.bfloat16, outlier_cols=[9])
    w_q, s_w = reference.quantize_weight(torch.randn(16, 64) * 0.1)
    torch.library.opcheck(torch.ops.llmint8.cpu_linear.default, (x, w_q, s_w, torch.randn(16).bfloat16(), 6.0))
    torch.library.opcheck(torch.ops.llmint8.cpu_linear.default, (x, w_q, s_w, None, 6.0, None, code_sums(w_q)))


def test_compiled_linears_are_one_call_of_the_kernel(tmp_path):
    linear = torch.nn.Linear(64, 48).to(torch.bfloat16)
    weight = linear.weight.detach().clone()
    x = outlier_activation(6, 64, torch.bfloat16, outlier_cols=[3])
    linear.weight = torch.nn.Parameter(int8pass.Int8Weight.from_float(weight), requires_grad=False)
    w_q, s_w = reference.quantize_weight(weight)
    want = reference.linear(x, w_q, s_w, linear.bias, 6.0)
    eps = torch.finfo(torch.bfloat16).eps
    with torch.no_grad():
        torch.testing.assert_close(linear(x), want, rtol=2 * eps, atol=1e-5)  # eager
        compiled = torch.compile(linear, backend="llmint8", fullgraph=True, options={"dump_dir": str(tmp_path)})
        torch.testing.assert_close(compiled(x), want, rtol=2 * eps, atol=1e-5)
    (code,) = [path.read_text() for path in tmp_path.rglob("output_code.py")]
    assert code.count("torch.ops.llmint8.cpu_linear.default(") == 1 and "cpp_fused" not in code


@pytest.mark.parametrize("kernel", KERNELS)
@settings(max_examples=25, deadline=None)
@given(m=st.integers(0, 40), ns=st.lists(st.integers(0, 150), min_size=1, max_size=4), k=st.integers(1, 300),
       dtype=st.sampled_from(DTYPES), bias=st.booleans(), sums=st.booleans(), threshold=st.sampled_from([0.0, 6.0]),
       seed=st.integers(0, 2**16))
def test_group_is_each_linear_bit_for_bit(kernel, m, ns, k, dtype, bias, sums, threshold, seed):
    # the weights of a group share one quantized x and one parallel loop over all their row blocks: each output must be
    # what the weight's own call gives, including weights with no rows and blocks that straddle two weights
    g = torch.Generator().manual_seed(seed)
    x = outlier_activation(m, k, dtype, outlier_cols=[c for c in (0, k // 2) if c < k], seed=seed)
    w_qs = [torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8) for n in ns]
    s_ws = [torch.rand(n, generator=g) + 0.1 for n in ns]
    biases = [torch.randn(n, generator=g).to(dtype) for n in ns] if bias else []
    code_sums_ = [code_sums(w_q) for w_q in w_qs] if sums else []
    with using(kernel):
        group = torch.ops.llmint8.cpu_linear_group(x, w_qs, s_ws, biases, threshold, code_sums_)
        for i, y in enumerate(group):
            alone = torch.ops.llmint8.cpu_linear(x, w_qs[i], s_ws[i], biases[i] if bias else None, threshold, None,
                                                 code_sums_[i] if sums else None)
            assert y.shape == (m, ns[i]) and torch.equal(y, alone)


def test_group_rejects_what_it_cannot_run():
    x, w_q = torch.zeros(2, 32), torch.zeros(8, 32, dtype=torch.int8)
    group = torch.ops.llmint8.cpu_linear_group
    with pytest.raises(RuntimeError, match="no weights"):
        group(x, [], [], [], 6.0, [])
    with pytest.raises(RuntimeError, match="2 weights but 1 weight_scales"):
        group(x, [w_q, w_q], [torch.ones(8)], [], 6.0, [])
    with pytest.raises(RuntimeError, match="bias must be empty or one per weight"):
        group(x, [w_q, w_q], [torch.ones(8)] * 2, [torch.ones(8)], 6.0, [])
    with pytest.raises(RuntimeError, match="last dim must be K = 16"):
        group(x, [w_q, torch.zeros(8, 16, dtype=torch.int8)], [torch.ones(8)] * 2, [], 6.0, [])
    with pytest.raises(RuntimeError, match="code_sums must be a CPU int32 \\[8\\]"):
        group(x, [w_q], [torch.ones(8)], [], 6.0, [torch.zeros(8)])


def test_group_opcheck():
    x = outlier_activation(5, 64, torch.bfloat16, outlier_cols=[9])
    (w1, s1), (w2, s2) = (reference.quantize_weight(torch.randn(n, 64) * 0.1) for n in (16, 70))
    op = torch.ops.llmint8.cpu_linear_group.default
    torch.library.opcheck(op, (x, [w1, w2], [s1, s2], [torch.randn(16).bfloat16(), torch.randn(70).bfloat16()], 6.0,
                               [code_sums(w1), code_sums(w2)]))
    torch.library.opcheck(op, (x.view(1, 5, 64), [w1, w2], [s1, s2], [], 0.0, []))
