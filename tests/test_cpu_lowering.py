"""The CPU lowering: Inductor-generated quantization and the fused linear against the reference."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import int8pass  # noqa: F401
from int8pass import reference
from lowering import cpu
from tests.helpers import outlier_activation, within_bound


@given(
    m=st.integers(1, 40),
    k=st.integers(1, 100),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
    threshold=st.sampled_from([0.0, 6.0]),
    seed=st.integers(0, 2**16),
)
def test_inductor_quantization_codes_are_bit_exact(m, k, dtype, threshold, seed):
    x = outlier_activation(m, k, dtype, outlier_cols=[k // 2], seed=seed)
    torch._dynamo.reset()  # each example is a fresh compile: hypothesis examples share one test call
    compiled = torch.compile(reference.quantize_activation, backend="inductor", fullgraph=True, dynamic=True)
    for got, want in zip(compiled(x, threshold), reference.quantize_activation(x, threshold)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 17, 64])
def test_decomposed_linear_matches_reference(dtype, m):
    x = outlier_activation(m, 96, dtype, outlier_cols=[5, 77])
    weight = (torch.randn(40, 96) * 0.05).to(dtype)
    bias = torch.randn(40).to(dtype)
    w_q, s_w = reference.quantize_weight(weight)
    compiled = torch.compile(cpu.decompose_linear, backend="inductor", fullgraph=True)
    y = compiled(x, w_q, s_w, bias, 6.0)
    within_bound(y, x, weight, bias, 6.0)
    # same math as the reference; only the order of fp32 scale multiplications may differ
    torch.testing.assert_close(y, reference.linear(x, w_q, s_w, bias, 6.0), rtol=2 * torch.finfo(dtype).eps, atol=1e-5)


def test_int_matmul_kernel_is_bit_exact():
    g = torch.Generator().manual_seed(0)
    x_q = torch.randint(-127, 128, (33, 300), generator=g, dtype=torch.int8)
    w_q = torch.randint(-127, 128, (70, 300), generator=g, dtype=torch.int8)
    assert torch.equal(cpu._int_matmul(x_q, w_q), reference.exact_int_matmul(x_q, w_q))
