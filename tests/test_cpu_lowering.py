"""The CPU lowering: the compiled linear (the C++ kernel, or the reference steps with torch._int_mm where it cannot
run) and Inductor-generated quantization against the reference."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import int8pass  # noqa: F401
from int8pass import reference
from int8pass.lowering import cpu_linear, linear
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
@pytest.mark.parametrize("kernel", ["as_the_cpu_allows", "reference_steps"])
def test_compiled_linear_matches_reference(dtype, m, kernel, monkeypatch):
    if kernel == "reference_steps":  # what CPUs without the C++ kernel compile, checked on every CPU
        monkeypatch.setattr(cpu_linear, "available", lambda: False)
    x = outlier_activation(m, 96, dtype, outlier_cols=[5, 77])
    weight = (torch.randn(40, 96) * 0.05).to(dtype)
    bias = torch.randn(40).to(dtype)
    w_q, s_w = reference.quantize_weight(weight)
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False):  # the two kernels compile the same graph differently
        compiled = torch.compile(lambda *args: torch.ops.llmint8.linear(*args), backend="inductor", fullgraph=True)
        y = compiled(x, w_q, s_w, bias, 6.0)
    within_bound(y, x, weight, bias, 6.0)
    # same math as the reference; only the order of fp32 scale multiplications may differ
    torch.testing.assert_close(y, reference.linear(x, w_q, s_w, bias, 6.0), rtol=2 * torch.finfo(dtype).eps, atol=1e-5)


def test_int_mm_fallback_without_the_kernel(monkeypatch):
    monkeypatch.setattr(cpu_linear, "available", lambda: False)
    x = outlier_activation(20, 64, torch.float32, outlier_cols=[3])
    weight = torch.randn(16, 64) * 0.1
    w_q, s_w = reference.quantize_weight(weight)
    y = linear.linear_on_cpu(x, w_q, s_w, None, 6.0)
    torch.testing.assert_close(y, reference.linear(x, w_q, s_w, None, 6.0), rtol=1e-6, atol=1e-6)


def test_reference_steps_compiled_on_a_decode_shaped_input(monkeypatch):
    # Inductor can view a [1, 1, K] activation as [1, K] with a zero row stride, and torch._int_mm on the CPU (2.13)
    # returns wrong sums for such a view (it made torchao's compiled decode wrong): the fallback must still be exact
    monkeypatch.setattr(cpu_linear, "available", lambda: False)
    x = outlier_activation(1, 2048, torch.float32, outlier_cols=[5]).reshape(1, 1, 2048)
    weight = torch.randn(512, 2048) * 0.05
    w_q, s_w = reference.quantize_weight(weight)
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False):
        compiled = torch.compile(lambda *args: torch.ops.llmint8.linear(*args), backend="inductor", fullgraph=True)
        y = compiled(x, w_q, s_w, None, 6.0)
    torch.testing.assert_close(y, reference.linear(x, w_q, s_w, None, 6.0), rtol=1e-6, atol=1e-5)
