"""The llmint8 backend end to end: registration, options, int8 weights, models compiled vs eager."""

import subprocess
import sys

import pytest
import torch

import int8pass
from int8pass import reference
from tests.helpers import AttentionBlock, outlier_activation, within_bound


def mlp(k=256, hidden=512, dtype=torch.bfloat16, activation=torch.nn.GELU):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(k, hidden), activation(), torch.nn.Linear(hidden, k)).eval().to(dtype)


def llmint8_eager(model):
    """The model with every Linear computed by the reference math: what the compiled model must reproduce."""

    def forward(linear, x):
        w_q, s_w = reference.quantize_weight(linear.weight)
        return reference.linear(x, w_q, s_w, linear.bias, 6.0)

    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.forward = forward.__get__(module)
    return model


def test_backend_resolves_without_importing_int8pass():
    code = (
        "import torch\n"
        "m = torch.nn.Linear(32, 16).eval()\n"
        "with torch.no_grad():\n"
        "    y = torch.compile(m, backend='llmint8', fullgraph=True)(torch.randn(4, 32))\n"
        "import sys; print('int8pass' in sys.modules, tuple(y.shape))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("True (4, 16)")


def test_a_users_lowering_module_does_not_shadow_ours(tmp_path):
    """The lowerings are int8pass.lowering: a lowering.py in the user's working directory is not ours."""
    (tmp_path / "lowering.py").write_text("raise ImportError('the user module named lowering was imported')\n")
    code = (
        "import sys, torch, int8pass\n"
        "m = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)).eval()\n"
        "with torch.no_grad():\n"
        "    y = torch.compile(m, backend='llmint8')(torch.randn(4, 32))\n"
        "print('lowering' in sys.modules, len(int8pass.last_report().rewritten), tuple(y.shape))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("False 2 (4, 16)")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_single_linear_within_bound(dtype):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40).eval().to(dtype)
    weight, bias = linear.weight.detach().clone(), linear.bias.detach().clone()
    x = outlier_activation(9, 96, dtype, outlier_cols=[4, 50])
    with torch.no_grad():
        y = torch.compile(linear, backend="llmint8", fullgraph=True)(x)
    within_bound(y, x, weight, bias, 6.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mlp_and_attention_block_match_reference_model(dtype):
    cases = [(mlp(dtype=dtype), outlier_activation(33, 256, dtype, outlier_cols=[3, 200]))]
    if dtype == torch.float32:
        # Inductor's vectorized fp32 GELU may differ from eager's by an ulp (seen on AVX2), which can move an
        # activation code of the next linear by one: a ReLU keeps the comparison bit-tight
        cases = [(mlp(dtype=dtype, activation=torch.nn.ReLU), cases[0][1])]
    else:
        cases.append((AttentionBlock(128, 4).eval().to(dtype), outlier_activation(2 * 17, 128, dtype, outlier_cols=[9]).view(2, 17, 128)))
    for model, x in cases:
        torch._dynamo.reset()
        with torch.no_grad():
            expected = llmint8_eager(_copy(model))(x)
            fp = model(x)
            y = torch.compile(model, backend="llmint8", fullgraph=True)(x)
        report = int8pass.last_report()
        assert report.layers and all(layer.rewritten for layer in report.layers), report.table()
        tol = 4 * torch.finfo(dtype).eps * expected.abs().max().item()
        torch.testing.assert_close(y, expected, rtol=0, atol=max(tol, 1e-5))
        assert (y.float() - fp.float()).abs().max() < 0.05 * fp.float().abs().max()


def _copy(model):
    import copy

    return copy.deepcopy(model)


def test_fp_weights_become_int8_weights_the_model_owns():
    model = mlp()
    weights = [model[0].weight, model[2].weight]  # references taken before compiling see what the model holds
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        compiled = torch.compile(model, backend="llmint8")
        y = compiled(x)
        report = int8pass.last_report()
        assert report.released_bytes == (256 * 512 + 512 * 256) * 2
        assert all(isinstance(w, int8pass.Int8Weight) and w.original is None for w in weights)
        assert weights[0] is model[0].weight and model[0].weight.shape == (512, 256)
        # per row: K int8 codes, an fp32 scale and an int32 code sum (half of bf16 plus 8 bytes a row)
        assert sum(layer.weight_bytes_after for layer in report.layers) == 512 * (256 + 8) + 256 * (512 + 8)
        # a new shape recompiles from the int8 weights
        assert compiled(torch.randn(7, 3, 256, dtype=torch.bfloat16)).shape == (7, 3, 256)
        # the eager module runs the same llmint8 math
        torch.testing.assert_close(model(x), y, rtol=0.02, atol=0.02)


def test_keep_fp_weights_keeps_the_originals_inside_the_int8_weights():
    model = mlp()
    before = model[0].weight.detach().clone()
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.compile(model, backend="llmint8", options={"keep_fp_weights": True})(x)
        assert int8pass.last_report().released_bytes == 0
        assert torch.equal(model[0].weight.original, before)
        assert torch.equal(model[0].weight.sum(), before.sum())  # reads see the exact values
        assert torch.isfinite(model(x)).all()


def test_training_mode_keeps_autograd_working():
    model = mlp(dtype=torch.float32).train()
    x = torch.randn(4, 256)
    y = torch.compile(model, backend="llmint8")(x)
    y.sum().backward()
    assert model[0].weight.grad is not None
    assert all("requires grad" in layer.reason for layer in int8pass.last_report().layers)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"treshold": 6.0}, "unknown option 'treshold'"),
        ({"threshold": "6"}, "'threshold' must be a number"),
        ({"threshold": float("nan")}, "'threshold' must be a number"),
        ({"min_features": -1}, "'min_features' must be an int >= 0"),
        ({"dtypes": ["int8"]}, "'dtypes' accepts"),
        ({"outlier_weights": "fp16"}, "'outlier_weights' must be one of"),
        ({"keep_fp_weights": 1}, "'keep_fp_weights' must be True or False"),
        ({"skip_modules": [3]}, "'skip_modules' must be"),
        ({"cpu_attention": "fp32"}, "'cpu_attention' must be one of 'auto', 'float32', 'native'"),
        ({"cpu_fp_linears": "fast"}, "'cpu_fp_linears' must be one of 'auto', 'aten'"),
        ({"inductor": {"no_such_knob": 1}}, "unknown Inductor config key 'no_such_knob'"),
    ],
)
def test_bad_options_raise_one_line_value_errors(options, message):
    compiled = torch.compile(torch.nn.Linear(8, 8), backend="llmint8", options=options)
    with pytest.raises(Exception) as info:
        compiled(torch.randn(2, 8))
    error = getattr(info.value, "inner_exception", info.value)  # Dynamo wraps backend errors
    assert isinstance(error, ValueError) and message in str(error) and "\n" not in str(error)


def test_outlier_weights_original_uses_the_fp_weight():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32).eval()
    x = outlier_activation(5, 64, outlier_cols=[1, 2])
    with torch.no_grad():
        weight = linear.weight.detach().clone()
        w_q, s_w = reference.quantize_weight(weight)
        y = torch.compile(linear, backend="llmint8", options={"outlier_weights": "original"})(x)
        expected = reference.linear(x, w_q, s_w, linear.bias, 6.0, outlier_weight=weight)
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-5)
    assert torch.equal(linear.weight.original, weight)
