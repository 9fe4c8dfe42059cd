"""The compiled CUDA path end to end. Needs a GPU: skipped without one (CI has none)."""

import pytest
import torch

import int8pass
from int8pass import reference
from tests.helpers import outlier_activation, within_bound

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def cuda_mlp(dtype=torch.bfloat16):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256)).eval().to("cuda", dtype)


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
@pytest.mark.parametrize("m", [1, 16, 200])
def test_compiled_cuda_linear_within_bound(mode, m):
    linear = torch.nn.Linear(256, 128).eval().to("cuda", torch.bfloat16)
    weight, bias = linear.weight.detach().clone(), linear.bias.detach().clone()
    compiled = torch.compile(linear, backend="llmint8", fullgraph=True, mode=mode)
    with torch.no_grad():
        for seed in range(3):  # several calls: CUDA graphs replay with new outlier sets
            x = outlier_activation(m, 256, torch.bfloat16, outlier_cols=[seed, 100 + seed], seed=seed).cuda()
            y = compiled(x)
            within_bound(y.cpu(), x.cpu(), weight.cpu(), bias.cpu(), 6.0)
    assert int8pass.last_report().layers[0].rewritten


def test_compiled_cuda_mlp_matches_reference():
    model = cuda_mlp()
    x = outlier_activation(64, 256, torch.bfloat16, outlier_cols=[3, 200]).cuda()
    with torch.no_grad():
        w1, b1 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
        w2, b2 = model[2].weight.detach().clone(), model[2].bias.detach().clone()
        w1_q, s1 = reference.quantize_weight(w1)
        w2_q, s2 = reference.quantize_weight(w2)
        hidden = torch.nn.functional.gelu(reference.linear(x, w1_q, s1, b1, 6.0))
        expected = reference.linear(hidden, w2_q, s2, b2, 6.0)
        y = torch.compile(model, backend="llmint8", fullgraph=True)(x)
    assert all(layer.rewritten for layer in int8pass.last_report().layers)
    torch.testing.assert_close(y, expected, rtol=0.02, atol=0.02)


def test_cuda_linear_and_following_pointwise_ops_are_one_template_kernel():
    from torch._inductor.utils import run_and_get_code

    model = cuda_mlp()
    x = outlier_activation(32, 256, torch.bfloat16, outlier_cols=[3]).cuda()
    with torch.no_grad():
        _, (code,) = run_and_get_code(torch.compile(model, backend="llmint8", fullgraph=True), x)
    kernels = [line.split("def ")[1].split("(")[0] for line in code.splitlines() if line.startswith("def triton_")]
    templates = [name for name in kernels if name.startswith("triton_tem_")]
    assert len(templates) == 2 and "gelu" in templates[0], kernels  # GELU fused into the first GEMM
    assert not [name for name in kernels if name.startswith("triton_poi_")], kernels


@pytest.mark.parametrize("outlier_weights", ["dequantized", "original"])
def test_cuda_graph_replays_with_new_outlier_sets(outlier_weights):
    linear = torch.nn.Linear(256, 64).eval().to("cuda", torch.bfloat16)
    weight, bias = linear.weight.detach().clone(), linear.bias.detach().clone()
    compiled = torch.compile(linear, backend="llmint8", mode="reduce-overhead", fullgraph=True,
                             options={"outlier_weights": outlier_weights, "keep_fp_weights": True})
    w_q, s_w = reference.quantize_weight(weight)
    original = weight if outlier_weights == "original" else None
    with torch.no_grad():
        for seed in range(4):
            x = outlier_activation(8, 256, torch.bfloat16, outlier_cols=range(seed), seed=seed).cuda()
            y = compiled(x).clone()
            want = reference.linear(x, w_q, s_w, bias, 6.0, original)
            torch.testing.assert_close(y, want, rtol=2 * torch.finfo(torch.bfloat16).eps, atol=1e-3)
