"""The Inductor template lowerings of llmint8::int8_mm_dequant and llmint8::fused_linear (lowering/int8_mm_dequant.py,
lowering/fused_linear.py).

Without a GPU, Inductor generates Triton for CPU tensors (cpu_backend="triton") and runs it in Triton's
interpreter (conftest.py): the generated template code, its fused epilogues, dynamic shapes and autotuning
all run in CI. Y matches reference.linear up to the fp32 order of the outlier columns.
"""

import re

import pytest
import torch

pytest.importorskip("triton")

from torch._inductor.utils import run_and_get_code  # noqa: E402

import int8pass  # noqa: E402
from int8pass import reference, stats  # noqa: E402
from tests.helpers import assert_close_to_reference, outlier_activation, within_bound  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = {"inductor": {"cpu_backend": "triton"}} if DEVICE == "cpu" else {}


def compile_llmint8(model, **options):
    return torch.compile(model, backend="llmint8", fullgraph=True, options={**TRITON, **options})


def make_linear(k, n, dtype, bias=True, seed=0):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(k, n, bias=bias).eval().to(DEVICE, dtype)
    weight = linear.weight.detach().clone()
    b = linear.bias.detach().clone() if bias else None
    return linear, weight, b


def template_kernels(code: str) -> list[str]:
    return [line.split("def ")[1].split("(")[0] for line in code.splitlines() if line.startswith("def triton_")]


def extern_calls(code: str) -> list[str]:
    """The llmint8 ops the generated code calls as extern kernels."""
    return re.findall(r"= (torch\.ops\.llmint8\.\w+\.default)\(", code)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m, k, n, bias", [(1, 64, 48, True), (7, 100, 33, False), (37, 129, 70, True)])
def test_template_matches_reference(dtype, m, k, n, bias):
    linear, weight, b = make_linear(k, n, dtype, bias)
    x = outlier_activation(m, k, dtype, outlier_cols=[3, k - 1], seed=m).to(DEVICE)
    with torch.no_grad():
        y, (code,) = run_and_get_code(compile_llmint8(linear), x)
    w_q, s_w = reference.quantize_weight(weight)
    assert_close_to_reference(y, x, w_q, s_w, b, 6.0)
    within_bound(y, x, weight, b, 6.0)
    # up to 16 rows: one kernel (quantization included); more: the quantization op, then the GEMM template
    assert len(template_kernels(code)) == 1 and "triton_tem_" in template_kernels(code)[0]
    assert extern_calls(code) == (
        [] if m <= 16 else ["torch.ops.llmint8.quantize_activation.default"])


@pytest.mark.parametrize("batch", [1, 2])  # 1 x 9 rows: one kernel in all; 2 x 9: quantization, then one
def test_pointwise_ops_after_the_linear_fuse_into_the_template(batch):
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up = torch.nn.Linear(64, 48)

        def forward(self, x, residual):
            return torch.relu(self.up(x)) * 2 + residual

    block = Block().eval().to(DEVICE)
    x = outlier_activation(batch * 9, 64, outlier_cols=[5]).view(batch, 9, 64).to(DEVICE)
    residual = torch.randn(batch, 9, 48, device=DEVICE)
    w_q, s_w = reference.quantize_weight(block.up.weight.detach())
    bias = block.up.bias.detach().clone()
    with torch.no_grad():
        y, (code,) = run_and_get_code(compile_llmint8(block), x, residual)
    want = torch.relu(reference.linear(x, w_q, s_w, bias, 6.0)) * 2 + residual
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-5)
    # One generated kernel holds the GEMM, ReLU, scale and residual add; no pointwise kernel remains.
    kernels = template_kernels(code)
    assert len(kernels) == 1 and kernels[0].startswith("triton_tem_fused"), kernels
    assert "relu" in kernels[0] and "add" in kernels[0] and "mul" in kernels[0]
    assert len(extern_calls(code)) == (0 if batch == 1 else 1), extern_calls(code)


@pytest.mark.parametrize("m", [5, 30])
def test_strided_activation(m):
    # X is every other column of a wider tensor: the templates read it through its strides.
    linear, weight, b = make_linear(48, 20, torch.float16)
    wide = outlier_activation(m, 96, torch.float16, outlier_cols=[10]).to(DEVICE)
    with torch.no_grad():
        y = compile_llmint8(lambda t: linear(t[:, ::2]))(wide)
    w_q, s_w = reference.quantize_weight(weight)
    assert_close_to_reference(y, wide[:, ::2], w_q, s_w, b, 6.0)


@pytest.mark.parametrize("m", [12, 40])  # the single-kernel and the two-step template
def test_original_outlier_weights_in_the_template(m):
    linear, weight, b = make_linear(80, 24, torch.bfloat16)
    x = outlier_activation(m, 80, torch.bfloat16, outlier_cols=[0, 41]).to(DEVICE)
    with torch.no_grad():
        y = compile_llmint8(linear, outlier_weights="original", keep_fp_weights=True)(x)
    w_q, s_w = reference.quantize_weight(weight)
    assert_close_to_reference(y, x, w_q, s_w, b, 6.0, outlier_weight=weight)


def test_dynamic_token_count_is_one_kernel_for_all_lengths():
    linear, weight, b = make_linear(64, 40, torch.float32)
    int8pass.clear_reports()
    compiled = torch.compile(linear, backend="llmint8", options=TRITON, dynamic=True)
    w_q, s_w = reference.quantize_weight(weight)
    with torch.no_grad():
        for m in (3, 17, 40):
            x = outlier_activation(m, 64, outlier_cols=[m % 64], seed=m).to(DEVICE)
            assert_close_to_reference(compiled(x), x, w_q, s_w, b, 6.0)
    assert len(int8pass.reports()) == 1


@pytest.mark.parametrize("m", [4, 40])
def test_max_autotune_selects_among_tile_configs(m):
    linear, weight, b = make_linear(64, 40, torch.float32)
    x = outlier_activation(m, 64, outlier_cols=[9]).to(DEVICE)
    options = {"inductor": {**TRITON.get("inductor", {}), "max_autotune": True, "benchmark_epilogue_fusion": False}}
    with torch.no_grad():
        y = torch.compile(linear, backend="llmint8", options=options)(x)
    w_q, s_w = reference.quantize_weight(weight)
    assert_close_to_reference(y, x, w_q, s_w, b, 6.0)


def test_a_changed_lowering_is_not_served_from_inductor_caches(monkeypatch, tmp_path):
    # Inductor's graph caches do not key on our lowerings (torch 2.11 served a stale graph here).
    from int8pass.lowering import triton_gemm

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    linear, _, _ = make_linear(64, 40, torch.float32)
    x = torch.randn(3, 64, device=DEVICE)
    calls = []
    for fused_max_m in (0, triton_gemm.FUSED_MAX_M):
        monkeypatch.setattr(triton_gemm, "FUSED_MAX_M", fused_max_m)
        torch._dynamo.reset()
        with torch.no_grad():
            _, (code,) = run_and_get_code(compile_llmint8(linear), x)
        calls.append(extern_calls(code))
    assert calls == [["torch.ops.llmint8.quantize_activation.default"], []]


def test_stats_are_recorded_on_the_template_path():
    stats.reset_stats()
    linear, _, _ = make_linear(64, 16, torch.float32)
    compiled = compile_llmint8(linear, stats=True)
    with torch.no_grad():
        compiled(outlier_activation(5, 64, outlier_cols=[2, 30]).to(DEVICE))
    assert stats.outlier_stats()[0].counts == [2]
    assert stats.outlier_stats()[0].column_calls == {2: 1, 30: 1}
