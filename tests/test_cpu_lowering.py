"""The CPU lowering: Inductor-generated quantization and the fused linear against the reference."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import int8pass  # noqa: F401
from int8pass import reference
from int8pass.lowering import avx2_linear, linear, onednn_int8_mm
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
@pytest.mark.parametrize("kernel", ["as_the_cpu_allows", "decomposed_for_onednn"])
def test_compiled_linear_matches_reference(dtype, m, kernel, monkeypatch):
    if kernel == "decomposed_for_onednn":  # what CPUs without the AVX2 kernel compile, checked on every CPU
        if not onednn_int8_mm.ONEDNN:
            pytest.skip("needs oneDNN")
        monkeypatch.setattr(avx2_linear, "available", lambda: False)
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


@pytest.mark.skipif(not onednn_int8_mm.ONEDNN, reason="needs oneDNN")
@pytest.mark.parametrize("gemm", ["as_the_cpu_allows", "split_rows"])
@pytest.mark.parametrize("m, outlier_cols", [(0, []), (1, []), (1, [0, 299]), (33, [5, 6, 100]), (4, range(0, 300, 2))])
def test_onednn_gemm_is_bit_exact(m, outlier_cols, gemm, monkeypatch):
    monkeypatch.setattr(onednn_int8_mm, "MAX_ONE_HOT_ROWS", 100)  # 150 outlier columns take the unpacking route
    if gemm == "split_rows":  # what CPUs without VNNI run, checked on every CPU
        monkeypatch.setattr(onednn_int8_mm, "EXACT_U8_GEMM", False)
    g = torch.Generator().manual_seed(0)
    x = outlier_activation(m, 300, torch.bfloat16, outlier_cols=list(outlier_cols))
    w_q = torch.randint(-127, 128, (70, 300), generator=g, dtype=torch.int8)
    # extreme codes against extreme activations (code 127 in columns 1 and 3): where int16 pairs saturate
    w_q[:, :4] = 127
    x[:, [1, 3]] = 5.0
    x_q, _, indices, count = reference.quantize_activation(x, 6.0)
    assert int(count) == len(outlier_cols)
    shifted = (x_q.to(torch.int16) + 128).to(torch.uint8)
    ones = torch.full((70,), reference.Q_MAX)  # s_w = 127 makes the reference's outlier scale exactly 1
    owner, handle = onednn_int8_mm.pack(w_q)  # the PackedWeight lives while `owner` does
    for weight_q, packed_handle in ((None, handle), (w_q, None)):  # packed codes, or a packed copy of dense ones
        torch.library.opcheck(torch.ops.llmint8.onednn_int8_mm.default,
                              (shifted, x, indices, count, weight_q, packed_handle, 70))
        for _ in range(2):  # the second call reads the outlier columns from the packed weight's column cache
            acc, outliers = torch.ops.llmint8.onednn_int8_mm(shifted, x, indices, count, weight_q, packed_handle, 70)
            assert torch.equal(acc, reference.exact_int_matmul(x_q, w_q).float())
            # an fp32 product: BLAS may sum it in another order for the other operand layout (one rounding a term)
            want = reference.outlier_matmul(x, indices, count, w_q, ones)
            magnitude = x[:, indices[: int(count)].long()].float().abs() @ w_q[:, indices[: int(count)].long()].float().abs().t()
            assert ((outliers - want).abs() <= int(count) * 2.0**-24 * magnitude).all()


def test_int_mm_fallback_without_onednn(monkeypatch):
    monkeypatch.setattr(onednn_int8_mm, "ONEDNN", False)
    x = outlier_activation(20, 64, torch.float32, outlier_cols=[3])
    weight = torch.randn(16, 64) * 0.1
    w_q, s_w = reference.quantize_weight(weight)
    y = linear.cpu_linear(x, w_q, s_w, None, 6.0)
    torch.testing.assert_close(y, reference.linear(x, w_q, s_w, None, 6.0), rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not onednn_int8_mm.ONEDNN, reason="needs oneDNN")
def test_packed_weight_runs_from_its_packed_codes_alone():
    x = outlier_activation(5, 64, torch.bfloat16, outlier_cols=[9])
    weight = (torch.randn(16, 64) * 0.1).to(torch.bfloat16)
    w_q, s_w = reference.quantize_weight(weight)
    expected = reference.linear(x, w_q, s_w, None, 6.0)
    packed = int8pass.Int8Weight.from_codes(w_q, s_w, dtype=torch.bfloat16, packed=True)
    assert packed.packed and torch.equal(packed.codes, w_q)  # unpacked on demand, bit for bit
    y = torch.ops.llmint8.linear(x, None, s_w, None, 6.0, None, packed.packed_handle)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    torch.library.opcheck(torch.ops.llmint8.onednn_unpack.default, (packed.packed_handle, 16, 64))
    torch.library.opcheck(torch.ops.llmint8.linear.default, (x, None, s_w, None, 6.0, None, packed.packed_handle))
    handle = packed.packed_handle.clone()
    del packed
    with pytest.raises(RuntimeError, match="the weight that owned it was freed"):
        torch.ops.llmint8.linear(x, None, s_w, None, 6.0, None, handle)


@pytest.mark.skipif(not onednn_int8_mm.ONEDNN, reason="needs oneDNN")
def test_dense_weight_on_the_cpu_gemm_gets_a_packed_copy_once(caplog, monkeypatch):
    monkeypatch.setattr(avx2_linear, "available", lambda: False)  # no AVX2 kernel: oneDNN runs the dense codes
    x = outlier_activation(5, 64, torch.float32, outlier_cols=[9])
    w_q, s_w = reference.quantize_weight(torch.randn(16, 64) * 0.1)
    dense = int8pass.Int8Weight.from_codes(w_q, s_w, dtype=torch.float32, packed=False)
    with caplog.at_level("WARNING", logger="int8pass"):
        for _ in range(2):
            y = torch.ops.llmint8.linear(x, dense.codes, dense.scale, None, 6.0)
    assert sum("keeping a oneDNN-packed copy" in r.message for r in caplog.records) == 1
    torch.testing.assert_close(y, reference.linear(x, w_q, s_w, None, 6.0), rtol=0, atol=0)
