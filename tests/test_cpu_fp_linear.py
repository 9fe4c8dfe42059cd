"""llmint8::cpu_fp_linear (lowering/cpu_fp_linear_kernels.h), the decode GEMV of the linears a compiled graph keeps in
bf16/fp16, and the FX step that writes it (fx_pass.run_kept_linears_on_cpu_kernel, option cpu_fp_linears)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import int8pass
from int8pass.lowering import cpu_linear

pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="needs an x86-64 CPU with AVX2 and a C++ compiler")
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def fp_linear(x, weight, bias=None):
    return torch.ops.llmint8.cpu_fp_linear(x, weight, bias)


def assert_within_float32_sums(y, x, weight, bias):
    """|y - exact| within the float32 sums' error bound (K + 1 terms, each product exact) plus one rounding to the
    dtype (half an ulp, which below the dtype's smallest normal is half its smallest subnormal step): what any
    float32-accumulating GEMM guarantees."""
    x64, w64 = x.double(), weight.double()
    exact = x64 @ w64.T + (0 if bias is None else bias.double())
    magnitude = x64.abs() @ w64.abs().T + (0 if bias is None else bias.double().abs())
    rounding = exact.abs().clamp(min=torch.finfo(x.dtype).tiny) * UNIT_ROUNDOFF[x.dtype]
    bound = magnitude * (weight.shape[1] + 1) * 2.0**-24 * 1.01 + rounding
    excess = (y.double() - exact).abs() - bound
    assert (excess <= 0).all(), f"error exceeds the bound by {excess.max().item()}"


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 9), n=st.integers(1, 140), k=st.integers(1, 300),
       dtype=st.sampled_from([torch.bfloat16, torch.float16]), with_bias=st.booleans(),
       threads=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_is_the_float32_sum_rounded_once(rows, n, k, dtype, with_bias, threads, seed):
    """Any shape (K tails of 1-31 values, row counts past one pass of 4), both dtypes, with and without a bias."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=generator).to(dtype)
    weight = torch.randn(n, k, generator=generator).to(dtype)
    bias = torch.randn(n, generator=generator).to(dtype) if with_bias else None
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = fp_linear(x, weight, bias)
    finally:
        torch.set_num_threads(before)
    assert y.dtype == dtype and y.shape == (rows, n)
    assert_within_float32_sums(y, x, weight, bias)


def test_a_large_weight_across_threads_matches_pytorch():
    """Enough weight rows for every thread (the parallel loop), leading dims kept, against F.linear."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 640).to(torch.bfloat16)
    weight, bias = torch.randn(5000, 640).to(torch.bfloat16), torch.randn(5000).to(torch.bfloat16)
    y = fp_linear(x, weight, bias)
    assert y.shape == (1, 3, 5000)
    assert_within_float32_sums(y.reshape(3, -1), x.reshape(3, -1), weight, bias)
    torch.testing.assert_close(y, F.linear(x, weight, bias), rtol=2 * UNIT_ROUNDOFF[torch.bfloat16], atol=1e-2)


def test_reads_a_strided_activation():
    """The last position of a sequence (what an output head reads at prefill) is not contiguous."""
    torch.manual_seed(1)
    hidden = torch.randn(2, 7, 64).to(torch.bfloat16)
    weight = torch.randn(33, 64).to(torch.bfloat16)
    last = hidden[:, -1:, :]
    assert not last.is_contiguous()
    torch.testing.assert_close(fp_linear(last, weight), fp_linear(last.contiguous(), weight), rtol=0, atol=0)


def test_nan_and_inf_propagate_as_in_float32():
    x = torch.ones(2, 40, dtype=torch.bfloat16)
    weight = torch.ones(3, 40, dtype=torch.bfloat16)
    x[0, 5] = float("nan")
    weight[1, 39] = float("inf")  # in the K tail past the last 32-value step
    y = fp_linear(x, weight).float()
    assert y[0].isnan().all()
    assert y[1, 1] == float("inf") and y[1, 0] == 40 and y[1, 2] == 40


def test_an_overflowing_sum_is_inf_in_float16():
    x = torch.full((1, 8), 200.0, dtype=torch.float16)
    weight = torch.full((1, 8), 100.0, dtype=torch.float16)
    assert fp_linear(x, weight).item() == float("inf")  # 160000 > float16's 65504, as F.linear in float32 then cast


def test_a_subnormal_result_rounds_as_float16_does():
    """A product below float16's smallest normal, rounded once: float16's subnormal step, not its relative ulp."""
    x = torch.tensor([[0.0051]], dtype=torch.float16)
    weight = torch.tensor([[0.0049]], dtype=torch.float16)
    y = fp_linear(x, weight)
    assert y.abs().item() < torch.finfo(torch.float16).tiny
    assert y.item() == (x.float() @ weight.float().T).half().item()
    assert_within_float32_sums(y, x, weight, None)


@pytest.mark.parametrize("args, message", [
    ((torch.randn(1, 8), torch.randn(4, 8)), "x must be bfloat16 or float16"),
    ((torch.randn(1, 8).bfloat16(), torch.randn(4, 8).half()), "weight must be BFloat16"),
    ((torch.randn(1, 8).bfloat16(), torch.randn(4, 7).bfloat16()), "x's last dim must be K = 7"),
    ((torch.randn(1, 8).bfloat16(), torch.randn(4, 8).bfloat16(), torch.randn(5).bfloat16()),
     "bias must be a BFloat16 vector of N = 4"),
    ((torch.randn(1, 8).bfloat16(), torch.randn(4, 8).bfloat16(), torch.randn(4)), "bias must be a BFloat16 vector"),
])
def test_bad_input_is_a_clear_error(args, message):
    with pytest.raises(RuntimeError, match=message):
        fp_linear(*args)


# ---- the FX step: which kept linears run it --------------------------------------------------------------------------

class Head(torch.nn.Module):
    """A linear the compile rewrites to int8 and an output head it keeps in floating point."""

    def __init__(self, vocab=300, bias=False):
        super().__init__()
        self.body = torch.nn.Linear(64, 64)
        self.lm_head = torch.nn.Linear(64, vocab, bias=bias)

    def forward(self, x):
        return self.lm_head(torch.relu(self.body(x)))


def compiled(model, x, **options):
    torch._dynamo.reset()
    out = torch.compile(model, backend="llmint8", options=options)(x)
    return out, int8pass.last_report()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_kept_head_at_decode_runs_the_kernel(dtype, bias):
    torch.manual_seed(2)
    model = Head(bias=bias).to(dtype).eval()
    x = torch.randn(1, 1, 64).to(dtype)
    with torch.no_grad():
        out, report = compiled(model, x)
        assert report.fp_linears_on_cpu_kernel == ["lm_head"]
        assert [layer.name for layer in report.rewritten] == ["body"]  # the head is still reported as kept
        hidden = torch.relu(model.body(x))
        assert_within_float32_sums(out.reshape(1, -1), hidden.reshape(1, -1), model.lm_head.weight, model.lm_head.bias)


@pytest.mark.parametrize("case", ["prefill rows", "aten option", "float32", "grad"])
def test_other_kept_linears_stay_with_pytorch(case):
    """More rows than FP_LINEAR_MAX_ROWS, the "aten" option, a float32 head (MKL's GEMV reads it at the memory's
    speed) and a head a gradient flows into: PyTorch's linear, as before."""
    torch.manual_seed(3)
    dtype = torch.float32 if case == "float32" else torch.bfloat16
    model = Head().to(dtype)
    rows = cpu_linear.FP_LINEAR_MAX_ROWS + 1 if case == "prefill rows" else 1
    x = torch.randn(1, rows, 64).to(dtype)
    options = {"cpu_fp_linears": "aten"} if case == "aten option" else {}
    with torch.set_grad_enabled(case == "grad"):
        out, report = compiled(model.eval(), x, **options)
    assert report.fp_linears_on_cpu_kernel == []
    if case == "grad":
        out.sum().backward()
        assert model.lm_head.weight.grad is not None


def test_quantize_refuses_the_compile_option():
    with pytest.raises(ValueError, match="'cpu_fp_linears' applies to torch.compile"):
        int8pass.quantize_(torch.nn.Linear(8, 8), cpu_fp_linears="aten")
