"""Edge inputs, stale weights, graph shapes and threads through the compiled model: nothing wrong, nothing silent."""

import math
import threading

import pytest
import torch
import torch.nn.functional as F

import int8pass
from int8pass import reference
from tests.helpers import outlier_activation, within_bound


def compiled_linear(n=24, k=40, dtype=torch.float32, bias=True, options=None, **compile_kwargs):
    torch.manual_seed(0)
    linear = torch.nn.Linear(k, n, bias=bias).eval().to(dtype)
    weight = linear.weight.detach().clone()
    b = linear.bias.detach().clone() if bias else None
    return torch.compile(linear, backend="llmint8", options=options, **compile_kwargs), weight, b


def reference_output(x, weight, bias, threshold=6.0):
    w_q, s_w = reference.quantize_weight(weight)
    return reference.linear(x, w_q, s_w, bias, threshold)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "case",
    ["empty", "one_row", "zero_row", "all_outliers", "no_outliers", "beyond_fp16", "k_ragged", "noncontiguous", "transposed"],
)
def test_edge_inputs_follow_the_reference(dtype, case):
    k = 37 if case == "k_ragged" else 40
    model, weight, bias = compiled_linear(k=k, dtype=dtype)
    x = outlier_activation(6, k, dtype, outlier_cols=[3])
    if case == "empty":
        x = x[:0]
    elif case == "one_row":
        x = x[:1]
    elif case == "zero_row":
        x[2] = 0
    elif case == "all_outliers":
        x = (x.float() * 50).to(dtype)
    elif case == "no_outliers":
        x = (x.float().clamp(-1, 1)).to(dtype)
    elif case == "beyond_fp16":
        if dtype == torch.float16:
            pytest.skip("fp16 cannot hold values beyond its range")
        x[:, 5] = 1e6
        x[1, 7] = -3e38
    elif case == "noncontiguous":
        x = outlier_activation(6, 2 * k, dtype, outlier_cols=[8])[:, ::2]
    elif case == "transposed":
        x = outlier_activation(k, 6, dtype, outlier_cols=[]).t()
    with torch.no_grad():
        y = model(x)
    assert y.shape == (x.shape[0], 24) and y.dtype == dtype
    # same math as the reference; fp32 sums over many outlier columns may associate differently
    torch.testing.assert_close(y, reference_output(x, weight, bias), rtol=max(2 * torch.finfo(dtype).eps, 1e-5), atol=1e-5)
    if case != "beyond_fp16":
        within_bound(y, x, weight, bias, 6.0)
    assert all(layer.rewritten for layer in int8pass.last_report().layers)


@pytest.mark.parametrize("threshold", [-1.0, 0.0, 1e30, math.inf])
def test_thresholds_off_and_huge(threshold):
    model, weight, bias = compiled_linear(options={"threshold": threshold})
    x = outlier_activation(5, 40, outlier_cols=[1, 2])
    with torch.no_grad():
        y = model(x)
    torch.testing.assert_close(y, reference_output(x, weight, bias, threshold), rtol=1e-5, atol=1e-5)
    within_bound(y, x, weight, bias, threshold)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_non_finite_activations_propagate_like_fp16(bad, threshold):
    model, weight, bias = compiled_linear(dtype=torch.float16, options={"threshold": threshold})
    x = outlier_activation(5, 40, torch.float16)
    x[2, 11] = bad
    with torch.no_grad():
        y = model(x)
        fp16 = F.linear(x, weight, bias)
    assert torch.equal(torch.isfinite(y), torch.isfinite(fp16)), (y, fp16)
    assert torch.isfinite(y[[0, 1, 3, 4]]).all()


def test_channels_last_4d_input():
    model, weight, bias = compiled_linear(k=8)
    x = torch.randn(2, 8, 5, 8).to(memory_format=torch.channels_last)  # linear over the last dim of a 4-D map
    with torch.no_grad():
        y = model(x)
    torch.testing.assert_close(y, reference_output(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_k_beyond_the_int32_range_stays_fp():
    k = reference.MAX_EXACT_K + 1
    model, weight, bias = compiled_linear(n=2, k=k)
    x = torch.randn(1, k)
    with torch.no_grad():
        y = model(x)
    layer = int8pass.last_report().layers[0]
    assert not layer.rewritten and "overflow the int32 accumulator" in layer.reason
    torch.testing.assert_close(y, F.linear(x, weight, bias))


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64])
def test_other_dtypes_stay_in_their_dtype_and_are_reported(dtype):
    class IntLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("weight", torch.randint(-3, 4, (4, 6)).to(dtype))

        def forward(self, x):
            return x @ self.weight.t()

    model = IntLinear()
    x = torch.randint(-3, 4, (3, 6)).to(dtype)
    with torch.no_grad():
        y = torch.compile(model, backend="llmint8")(x)
    assert torch.equal(y, x @ model.weight.t())
    layer = int8pass.last_report().layers[0]
    assert not layer.rewritten and "not in option dtypes" in layer.reason


@pytest.mark.parametrize("how", ["in_place", "assign_data"])
def test_weight_changed_after_compiling_is_requantized(how):
    model, _, bias = compiled_linear(options={"keep_fp_weights": True})
    linear = model._orig_mod
    x = outlier_activation(5, 40, outlier_cols=[9])
    with torch.no_grad():
        model(x)
        if how == "in_place":
            linear.weight.mul_(-2)
        else:
            linear.weight.data = torch.randn(24, 40)
        y = model(x)
    torch.testing.assert_close(y, reference_output(x, linear.weight.detach(), bias), rtol=1e-5, atol=1e-5)


def test_weight_shared_by_several_linears_is_quantized_once():
    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(32, 32)
            self.b = torch.nn.Linear(32, 32)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    model = Shared().eval()
    x = torch.randn(4, 32)
    with torch.no_grad():
        expected = model(x)
        y = torch.compile(model, backend="llmint8")(x)
    report = int8pass.last_report()
    assert [layer.rewritten for layer in report.layers] == [True, True]
    assert report.layers[1].weight_bytes_before == 0  # counted once
    assert report.released_bytes == 32 * 32 * 4
    assert (y - expected).abs().max() < 0.02 * expected.abs().max()


def test_linear_in_a_loop_and_around_graph_breaks():
    class Loop(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.step = torch.nn.Linear(16, 16)

        def forward(self, x):
            for _ in range(2):  # unrolled by Dynamo: one weight, two rewritten uses
                x = torch.tanh(self.step(x))
            torch._dynamo.graph_break()  # (a break inside the loop would make Dynamo skip the frame)
            return torch.tanh(self.step(x))

    model = Loop().eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = model(x)
        int8pass.clear_reports()
        y = torch.compile(model, backend="llmint8", options={"keep_fp_weights": True})(x)
    assert len(int8pass.reports()) == 2  # one graph each side of the break
    assert [len(r.layers) for r in int8pass.reports()] == [2, 1] and all(
        layer.rewritten for r in int8pass.reports() for layer in r.layers
    )
    assert (y - expected).abs().max() < 0.02


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_no_grad_and_inference_mode(context):
    model, weight, bias = compiled_linear()
    x = outlier_activation(5, 40, outlier_cols=[1])
    with context():
        y = model(x)
    assert int8pass.last_report().layers[0].rewritten
    torch.testing.assert_close(y, reference_output(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_dtype_change_recompiles():
    model, _, _ = compiled_linear(options={"keep_fp_weights": True})
    linear = model._orig_mod
    with torch.no_grad():
        model(torch.randn(3, 40))
        linear.to(torch.bfloat16)
        x = torch.randn(3, 40, dtype=torch.bfloat16)
        y = model(x)
    assert y.dtype == torch.bfloat16
    assert int8pass.last_report().layers[0].dtype == "bfloat16"
    torch.testing.assert_close(y, reference_output(x, linear.weight.detach(), linear.bias.detach()), rtol=0.01, atol=0.01)


def test_threads_get_the_sequential_results():
    model, _, _ = compiled_linear(n=64, k=96)
    inputs = [outlier_activation(9, 96, outlier_cols=[i, 50 + i], seed=i) for i in range(8)]
    with torch.no_grad():
        sequential = [model(x) for x in inputs]
        results = [None] * len(inputs)

        def work(i):
            with torch.no_grad():
                for _ in range(5):
                    results[i] = model(inputs[i])

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    for got, want in zip(results, sequential):
        assert torch.equal(got, want)


def test_varying_lengths_do_not_recompile_per_length():
    model, weight, bias = compiled_linear()
    int8pass.clear_reports()
    with torch.no_grad():
        for length in [3, 5, 7, 64, 1, 2, 200]:
            x = outlier_activation(length, 40, outlier_cols=[length % 40]).view(1, length, 40)
            y = model(x)
            torch.testing.assert_close(y, reference_output(x, weight, bias), rtol=1e-5, atol=1e-5)
    # a static graph, then a dynamic one; Dynamo specializes length 1 on its own
    assert len(int8pass.reports()) <= 3
