"""Block mode (docs/design.md §1b): llmint8::block_linear, its reference math and bound, the CPU kernel on each path
this machine has (AVX2 dot products, AVX512-VNNI packed tiles), and block-mode Int8Weights through quantize_, compile,
save and load."""

import copy
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import int8pass
from int8pass import reference
from int8pass.int8_weight import Int8Weight
from int8pass.lowering import cpu_linear
from tests.helpers import outlier_activation
from tests.test_cpu_linear import KERNELS, using

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
needs_kernel = pytest.mark.skipif(not cpu_linear.available(), reason="needs an x86-64 CPU with AVX2 and a C++ compiler")


def within_block_bound(y, x, weight, bias, block_size, threshold):
    exact = x.reshape(-1, x.shape[-1]).double() @ weight.double().t()
    if bias is not None:
        exact = exact + bias.double()
    exact = exact.reshape(*x.shape[:-1], weight.shape[0])
    bound = reference.block_error_bound(x, weight, bias, block_size, threshold)
    err = (y.double() - exact).abs()
    bad = ~(err <= bound)
    assert not bad.any(), f"{int(bad.sum())} elements out of bound; worst err {err[bad].max():.4g} vs bound {bound[bad].min():.4g}"


def exactly_scaled(m, k, n, block_size, outlier_cols, seed):
    """Activations and a weight whose block scales are powers of two and whose codes are small, so that every fp32
    step (each block's scaled product, their sum in any order, the outlier product, the bias) is exact: the kernel
    must then match the reference bit for bit, which checks its codes and int32 sums exactly."""
    g = torch.Generator().manual_seed(seed)
    blocks = reference.block_count(k, block_size)

    def values(rows, exponents):
        codes = torch.randint(-7, 8, (rows, k), generator=g).float()
        scale = 2.0 ** torch.randint(exponents[0], exponents[1] + 1, (rows, blocks), generator=g).float()
        codes[:, torch.arange(0, k, block_size)] = 127.0  # each block's absmax is 127 * its scale
        return codes * reference._per_column(scale, k, block_size)

    x = values(m, (-6, -5))  # inliers below 127 / 32 < 6
    x[:, outlier_cols] = torch.randint(-20, 21, (m, len(outlier_cols)), generator=g).float()
    if m:
        x[0, outlier_cols] = 20.0
    w = values(n, (-1, 0))
    return x, w


@needs_kernel
@pytest.mark.parametrize("kernel", KERNELS)
@settings(max_examples=30, deadline=None)
@given(m=st.integers(0, 40), n=st.integers(1, 140), k=st.integers(1, 300), block_size=st.sampled_from(reference.BLOCK_SIZES),
       dtype=st.sampled_from(DTYPES), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_kernel_is_the_reference_bit_for_bit(kernel, m, n, k, block_size, dtype, bias, seed):
    # m, n and k straddle the AVX2 dot-product tiles (3 x 4 x 32), VNNI's (4 x 4 x 64) and its packed tiles (from 8
    # rows, 3, 2 or 1 at a time, 4 weight rows, 8 for a single one), the 64-row blocks, the blocks of columns and a
    # last block shorter than the others
    outlier_cols = sorted({c for c in (1, k // 2, k - 1) if 0 < c < k and c % block_size})
    b = torch.randint(-3, 4, (n,)).to(dtype) if bias else None
    for threshold, cols in ((6.0, outlier_cols), (0.0, [])):
        x, w = exactly_scaled(m, k, n, block_size, cols, seed)
        w_q, d_w = reference.quantize_weight_blocks(w, block_size)
        assert torch.equal(reference.dequantize_blocks(w_q, d_w, block_size), w)  # the construction is exact
        x = x.to(dtype)
        with using(kernel):
            got = torch.ops.llmint8.cpu_block_linear(x, w_q, d_w, b, block_size, threshold)
        assert got.dtype == dtype and torch.equal(got, reference.block_linear(x, w_q, d_w, b, block_size, threshold))


@needs_kernel
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("m, k", [(4, 1000), (7, 1000), (8, 1100), (40, 1100), (70, 1100)])
@pytest.mark.parametrize("block_size", reference.BLOCK_SIZES)
def test_kernel_is_the_reference_bit_for_bit_over_long_rows(kernel, m, k, block_size):
    # m = 4 and 7: VNNI's row lanes, over 15 64-column steps and a 32-column one (K / 32 * 32 = 992 for k = 1000);
    # k = 1100: VNNI's packed tiles in passes of 512 columns (the third one short); both: a last block cut short and
    # a K % 32 tail. m = 8, 40, 70: one 16-row tile, three at once, three then two. n: a 64-row block (four 16-row
    # groups of row lanes), then 6 rows (4 + 1 + 1)
    n = 70
    b = torch.randint(-3, 4, (n,)).to(torch.bfloat16)
    for threshold, cols in ((6.0, [5, 600]), (0.0, [])):
        x, w = exactly_scaled(m, k, n, block_size, [c for c in cols if c % block_size], seed=m + block_size)
        w_q, d_w = reference.quantize_weight_blocks(w, block_size)
        x = x.to(torch.bfloat16)
        with using(kernel):
            got = torch.ops.llmint8.cpu_block_linear(x, w_q, d_w, b, block_size, threshold)
        assert torch.equal(got, reference.block_linear(x, w_q, d_w, b, block_size, threshold))


@needs_kernel
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 4, 7, 8, 16, 130])
@pytest.mark.parametrize("block_size", reference.BLOCK_SIZES)
def test_kernel_within_the_bound_of_real_valued_inputs(kernel, dtype, m, block_size):
    k = 1000  # a last block of 1000 % block_size columns, and a K % 32 tail
    x = outlier_activation(m, k, dtype, outlier_cols=[3, 500, 999])
    weight = (torch.randn(200, k) * 0.03).to(dtype)
    bias = torch.randn(200).to(dtype)
    w_q, d_w = reference.quantize_weight_blocks(weight, block_size)
    for threshold in (0.0, 6.0):
        with using(kernel):
            y = torch.ops.llmint8.cpu_block_linear(x, w_q, d_w, bias, block_size, threshold)
        within_block_bound(y, x, weight, bias, block_size, threshold)
        want = reference.block_linear(x, w_q, d_w, bias, block_size, threshold)
        torch.testing.assert_close(y, want, rtol=2 * torch.finfo(dtype).eps, atol=1e-4)


@needs_kernel
def test_kernel_at_model_sizes():
    # long K (VNNI's packed passes of 512 columns, three activation chunks), decode, and the 16-row tile alone
    for m, n, k in [(1, 4096, 4096), (4, 300, 14336), (16, 130, 4160), (600, 70, 4096)]:
        x = outlier_activation(m, k, torch.bfloat16, outlier_cols=[7])
        weight = torch.randn(n, k) * 0.02
        w_q, d_w = reference.quantize_weight_blocks(weight, 32)
        for kernel in KERNELS:
            with using(kernel):
                y = torch.ops.llmint8.cpu_block_linear(x, w_q, d_w, None, 32, 0.0)
            within_block_bound(y, x, weight, None, 32, 0.0)


@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 12), n=st.integers(1, 20), k=st.integers(1, 200), block_size=st.sampled_from(reference.BLOCK_SIZES),
       threshold=st.sampled_from([0.0, 3.0, 6.0]), magnitude=st.sampled_from([1e-30, 1e-3, 1.0, 1e4]),
       seed=st.integers(0, 2**16))
def test_reference_within_the_bound(m, n, k, block_size, threshold, magnitude, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * magnitude
    x[:, torch.randint(0, k, (2,), generator=g)] *= 50
    weight = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)
    weight[0, : min(k, 5)] = 0.0
    w_q, d_w = reference.quantize_weight_blocks(weight, block_size)
    assert w_q.abs().max() <= 127 and d_w.dtype == torch.bfloat16
    assert ((reference.dequantize_blocks(w_q, d_w, block_size) - weight).abs()
            <= reference._per_column(d_w, k, block_size) / 2).all()
    y = reference.block_linear(x, w_q, d_w, None, block_size, threshold)
    within_block_bound(y, x, weight, None, block_size, threshold)


def test_blocks_bound_outliers_to_their_own_block():
    """What the mode is for: an outlier column costs the resolution of its own blocks only, so with no outlier split
    the error stays near the inliers' (row-wise LLM.int8() at threshold 0 loses every column of the row)."""
    x = outlier_activation(8, 4096, torch.float32, outlier_cols=[100], magnitude=60.0)
    weight = torch.randn(512, 4096) * 0.02
    exact = x.double() @ weight.double().t()
    w_q, d_w = reference.quantize_weight_blocks(weight, 32)
    blocks = (reference.block_linear(x, w_q, d_w, None, 32, 0.0).double() - exact).abs().mean()
    rows = (reference.linear(x, *reference.quantize_weight(weight), None, 0.0).double() - exact).abs().mean()
    assert blocks < rows / 5


@needs_kernel
def test_non_finite_values_propagate():
    x = outlier_activation(9, 300, torch.bfloat16, outlier_cols=[3])
    x[4, 7] = float("nan")
    x[6, 8] = float("inf")
    w_q, d_w = reference.quantize_weight_blocks(torch.rand(70, 300) + 0.1, 32)
    for threshold in (6.0, 0.0):
        y = torch.ops.llmint8.cpu_block_linear(x, w_q, d_w, None, 32, threshold)
        assert y[4].isnan().all() and y[6].isinf().all() and y[[0, 8]].isfinite().all()


@needs_kernel
@pytest.mark.parametrize("kernel", KERNELS)
@settings(max_examples=25, deadline=None)
@given(m=st.integers(0, 40), ns=st.lists(st.integers(0, 150), min_size=1, max_size=4), k=st.integers(1, 300),
       block_size=st.sampled_from(reference.BLOCK_SIZES), dtype=st.sampled_from(DTYPES), bias=st.booleans(),
       threshold=st.sampled_from([0.0, 6.0]), seed=st.integers(0, 2**16))
def test_group_is_each_linear_bit_for_bit(kernel, m, ns, k, block_size, dtype, bias, threshold, seed):
    # one quantized x and one parallel loop over all the weights' row blocks (weights with no rows, row blocks that
    # straddle two weights): each output must be what the weight's own call gives
    g = torch.Generator().manual_seed(seed)
    x = outlier_activation(m, k, dtype, outlier_cols=[c for c in (0, k // 2) if c < k], seed=seed)
    weights = [reference.quantize_weight_blocks(torch.randn(n, k, generator=g), block_size) for n in ns]
    biases = [torch.randn(n, generator=g).to(dtype) for n in ns] if bias else []
    w_qs, d_ws = [w for w, _ in weights], [d for _, d in weights]
    with using(kernel):
        group = torch.ops.llmint8.cpu_block_linear_group(x, w_qs, d_ws, biases, block_size, threshold)
        for i, y in enumerate(group):
            alone = torch.ops.llmint8.cpu_block_linear(x, w_qs[i], d_ws[i], biases[i] if bias else None, block_size,
                                                       threshold)
            assert y.shape == (m, ns[i]) and torch.equal(y, alone)
        eager = torch.ops.llmint8.block_linear_group(x, w_qs, d_ws, biases, block_size, threshold)  # the op's kernel
        assert all(torch.equal(a, b) for a, b in zip(eager, group))


@needs_kernel
def test_group_rejects_what_it_cannot_run():
    x, w_q, d_w = torch.zeros(2, 64), torch.zeros(8, 64, dtype=torch.int8), torch.ones(8, 2, dtype=torch.bfloat16)
    group = torch.ops.llmint8.cpu_block_linear_group
    with pytest.raises(RuntimeError, match="no weights"):
        group(x, [], [], [], 32, 0.0)
    with pytest.raises(RuntimeError, match="2 weights but 1 weight_scales"):
        group(x, [w_q, w_q], [d_w], [], 32, 0.0)
    with pytest.raises(RuntimeError, match="bias must be empty or one per weight"):
        group(x, [w_q, w_q], [d_w, d_w], [torch.ones(8)], 32, 0.0)
    with pytest.raises(RuntimeError, match="weight_scale must be bfloat16 \\[8, 1\\]"):
        group(x, [w_q], [d_w], [], 64, 0.0)
    with pytest.raises(ValueError, match="2 weights but 1 weight_scale"):
        torch.ops.llmint8.block_linear_group(x, [w_q, w_q], [d_w], [], 32, 0.0)
    with pytest.raises(ValueError, match="block_size must be one of"):
        torch.ops.llmint8.block_linear_group(x, [w_q], [d_w], [], 48, 0.0)


@needs_kernel
def test_group_opcheck():
    x = outlier_activation(5, 64, torch.bfloat16, outlier_cols=[9])
    (w1, d1), (w2, d2) = (reference.quantize_weight_blocks(torch.randn(n, 64) * 0.1, 32) for n in (16, 70))
    for op in (torch.ops.llmint8.cpu_block_linear_group.default, torch.ops.llmint8.block_linear_group.default):
        torch.library.opcheck(op, (x, [w1, w2], [d1, d2], [torch.randn(16).bfloat16(), torch.randn(70).bfloat16()],
                                   32, 6.0))
        torch.library.opcheck(op, (x.view(1, 5, 64), [w1, w2], [d1, d2], [], 32, 0.0))


@needs_kernel
def test_rejects_what_it_cannot_run():
    w_q = torch.zeros(8, 64, dtype=torch.int8)
    d_w = torch.ones(8, 2, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="weight_scale must be bfloat16 \\[8, 2\\]"):
        torch.ops.llmint8.cpu_block_linear(torch.zeros(2, 64), w_q, d_w.float(), None, 32, 0.0)
    with pytest.raises(RuntimeError, match="block_size must be a positive multiple of 32"):
        torch.ops.llmint8.cpu_block_linear(torch.zeros(2, 64), w_q, d_w, None, 48, 0.0)
    with pytest.raises(ValueError, match="block_size must be one of"):
        torch.ops.llmint8.block_linear(torch.zeros(2, 64), w_q, d_w, None, 48, 0.0)
    with pytest.raises(ValueError, match="bf16 \\[8, 1\\] block scales"):
        torch.ops.llmint8.block_linear(torch.zeros(2, 64), w_q, d_w, None, 64, 0.0)


@needs_kernel
def test_opcheck():
    x = outlier_activation(5, 64, torch.bfloat16, outlier_cols=[9])
    w_q, d_w = reference.quantize_weight_blocks(torch.randn(16, 64) * 0.1, 32)
    args = (x, w_q, d_w, torch.randn(16).bfloat16(), 32, 0.0)
    torch.library.opcheck(torch.ops.llmint8.cpu_block_linear.default, args)
    torch.library.opcheck(torch.ops.llmint8.block_linear.default, args)


def test_gradients_reach_the_input_and_the_bias():
    linear = torch.nn.Linear(64, 24)
    int8pass.quantize_(linear, skip_modules=[], block_size=32)
    x = torch.randn(3, 64, requires_grad=True)
    linear(x).square().sum().backward()
    weight = linear.weight.dequantize().float()
    x2 = x.detach().clone().requires_grad_()
    bias = linear.bias.detach().clone().requires_grad_()
    with torch.no_grad():
        y = linear(x2)
    (y.detach() + (x2 @ weight.t() + bias) - (x2 @ weight.t() + bias).detach()).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(linear.bias.grad, bias.grad)


@needs_kernel
def test_quantize_compile_save_load(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256)).bfloat16()
    x = outlier_activation(14, 256, torch.bfloat16, outlier_cols=[5]).reshape(2, 7, 256)
    fp = copy.deepcopy(model)
    int8pass.quantize_(model, block_size=64)
    weight = model[0].weight
    assert isinstance(weight, Int8Weight) and weight.block_size == 64 and weight.threshold == 0.0
    assert weight.scale.shape == (512, 4) and weight.int8_nbytes == 512 * 256 + 512 * 4 * 2
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, backend="llmint8", options={"dump_dir": str(tmp_path)})(x)
    assert torch.equal(eager, compiled)
    code = "".join(path.read_text() for path in tmp_path.rglob("output_code.py"))
    assert code.count("torch.ops.llmint8.cpu_block_linear.default(") == 2
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = copy.deepcopy(fp)
    int8pass.quantize_(fresh, block_size=64)
    fresh.load_state_dict(torch.load(buffer))
    assert fresh[0].weight.block_size == 64 and torch.equal(fresh[0].weight.codes, weight.codes)
    with torch.no_grad():
        assert torch.equal(fresh(x), eager)
        fresh[0].weight.copy_(fp[0].weight)  # a floating-point write re-quantizes into the same block layout
    assert torch.equal(fresh[0].weight.scale, weight.scale)


def test_compiling_a_floating_point_model_in_block_mode():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 96), torch.nn.ReLU(), torch.nn.Linear(96, 128))
    x = torch.randn(5, 128)
    with torch.no_grad():
        want = model(x)
        got = torch.compile(model, backend="llmint8", options={"block_size": 32})(x)
    assert all(isinstance(layer.weight, Int8Weight) and layer.weight.block_size == 32 for layer in (model[0], model[2]))
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)


def test_options_say_what_is_wrong():
    with pytest.raises(ValueError, match="'block_size' must be one of 0, 32, 64, 128"):
        int8pass.quantize_(torch.nn.Linear(64, 64), block_size=48)
    with pytest.raises(ValueError, match="outlier_weights='original' applies to LLM.int8"):
        int8pass.quantize_(torch.nn.Linear(64, 64), block_size=32, outlier_weights="original")
    with pytest.raises(ValueError, match="block scales \\(block_size 32\\) must be bfloat16"):
        Int8Weight.from_codes(torch.zeros(4, 64, dtype=torch.int8), torch.ones(4), dtype=torch.float32, block_size=32)
