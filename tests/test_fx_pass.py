"""The FX pass: every linear form is found, everything else is left as it was, and each skip says why."""

import pytest
import torch
import torch.nn.functional as F

import int8pass
from int8pass import fx_pass
from int8pass.lowering import inductor_api
from int8pass.options import Options
from int8pass.report import CompileReport
from tests.helpers import Conv1D, outlier_activation, within_bound


class Forms(torch.nn.Module):
    def __init__(self, form, k=48, n=24, bias=True):
        super().__init__()
        self.form = form
        self.proj = torch.nn.Linear(k, n, bias=bias)
        self.conv = Conv1D(k, n)

    def forward(self, x):
        w, b = self.proj.weight, self.proj.bias
        x2d = x.reshape(-1, x.shape[-1])
        if self.form == "module":
            return self.proj(x)
        if self.form == "functional":
            return F.linear(x, w, b)
        if self.form == "matmul_T":
            return x @ w.T
        if self.form == "matmul_t_bias":
            return torch.matmul(x, w.t()) + b
        if self.form == "transpose":
            return x.matmul(w.transpose(0, 1))
        if self.form == "mm_permute":
            return torch.mm(x2d, w.permute(1, 0))
        if self.form == "addmm_t":
            return torch.addmm(b, x2d, w.t())
        if self.form == "aten_addmm":
            return torch.ops.aten.addmm.default(b, x2d, torch.ops.aten.t.default(w))
        if self.form == "conv1d":
            return self.conv(x)
        raise ValueError(self.form)


def rewrite(model, *inputs, options=None):
    """Run the pass on Dynamo's graph of `model`, as our backend does: (graph, example inputs, report, code before)."""
    captured = {}

    def backend(gm, example_inputs):
        captured["before"] = gm.code
        captured["report"] = CompileReport(graph_id=0)
        fx_pass.rewrite_linears(gm, example_inputs, Options.parse(options or {}), captured["report"])
        captured["gm"], captured["inputs"] = gm, example_inputs
        return gm.forward

    torch.compile(model, backend=backend, fullgraph=True)(*inputs)
    return captured["gm"], captured["inputs"], captured["report"], captured["before"]


FORMS = ["module", "functional", "matmul_T", "matmul_t_bias", "transpose", "mm_permute", "addmm_t", "aten_addmm", "conv1d"]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", [(5, 48), (2, 3, 48)])
def test_every_linear_form_is_rewritten(form, shape):
    if form in ("mm_permute", "addmm_t", "aten_addmm") and len(shape) == 3:
        shape = (6, 48)
    model = Forms(form).eval()
    x = outlier_activation(shape[0] * (shape[1] if len(shape) == 3 else 1), 48, outlier_cols=[7]).reshape(shape)
    with torch.no_grad():
        expected_weight = model.conv.weight.t() if form == "conv1d" else model.proj.weight
        expected_bias = model.conv.bias if form == "conv1d" else (model.proj.bias if form in ("module", "functional", "matmul_t_bias", "addmm_t", "aten_addmm") else None)
        gm, inputs, report, _ = rewrite(model, x, options={"keep_fp_weights": True})
        assert [layer.rewritten for layer in report.layers] == [True], report.table()
        assert sum(n.target is torch.ops.llmint8.linear.default for n in gm.graph.nodes) == 1
        assert report.layers[0].name == ("conv" if form == "conv1d" else "proj")
        assert (report.layers[0].out_features, report.layers[0].in_features) == (24, 48)
        y = gm(*inputs)[0]
        within_bound(y, x, expected_weight, expected_bias, 6.0)


def test_tied_weight_is_quantized_once_and_kept_for_the_embedding():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(50, 32)
            self.head = torch.nn.Linear(32, 50, bias=False)
            self.head.weight = self.embed.weight
            self.other = torch.nn.Linear(32, 32)

        def forward(self, ids):
            h = self.embed(ids)
            return self.head(self.other(h)) + F.linear(h, self.embed.weight)

    model = Tied().eval()
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        expected = model(ids)
        compiled = torch.compile(model, backend="llmint8")
        y = compiled(ids)
    report = int8pass.last_report()
    assert [layer.rewritten for layer in report.layers] == [True, True, True], report.table()
    # one int8 weight for the tied pair, which keeps its fp original: the embedding still reads it, exactly
    assert model.head.weight is model.embed.weight and isinstance(model.embed.weight, int8pass.Int8Weight)
    assert model.embed.weight.original is not None
    assert report.layers[2].weight_bytes_before == 0 and report.layers[2].weight_bytes_after == 0
    assert (y - expected).abs().max() < 0.01 * expected.abs().max()


def test_unrewritten_graph_is_left_byte_for_byte():
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).double()
    with torch.no_grad():
        gm, _, report, before = rewrite(model, torch.randn(3, 16, dtype=torch.double))
    assert gm.code == before
    assert [layer.reason for layer in report.layers] == ["weight dtype float64 not in option dtypes"] * 2


@pytest.mark.parametrize(
    "options, grad, reason",
    [
        ({}, True, "weight requires grad and grad mode is on"),
        ({"skip_modules": ["proj"]}, False, "skipped by option skip_modules"),
        ({"skip_modules": [lambda name: name.startswith("pr")]}, False, "skipped by option skip_modules"),
        ({"min_features": 32}, False, "too small: min(N, K) = 24 < min_features = 32"),
        ({"dtypes": ["bfloat16"]}, False, "weight dtype float32 not in option dtypes"),
    ],
)
def test_skip_reasons(options, grad, reason):
    model = Forms("module").eval()
    x = torch.randn(4, 48)
    with torch.set_grad_enabled(grad):
        expected = model(x)
        y = torch.compile(model, backend="llmint8", options=options)(x)
    layer = int8pass.last_report().layers[0]
    assert not layer.rewritten and layer.reason.startswith(reason)
    assert torch.equal(y, expected) or torch.allclose(y, expected, atol=1e-6)
    assert type(model.proj.weight) is torch.nn.Parameter  # a skipped weight is left as it is


def test_weight_passed_as_input_is_not_a_constant():
    def f(x, w):
        return F.linear(x, w)

    x, w = torch.randn(3, 8), torch.randn(5, 8)
    with torch.no_grad():
        y = torch.compile(f, backend="llmint8")(x, w)
    layer = int8pass.last_report().layers[0]
    assert not layer.rewritten and "not a constant" in layer.reason
    assert torch.allclose(y, F.linear(x, w))


def test_attention_products_are_not_reported_as_linears():
    class Attention(torch.nn.Module):
        def __init__(self, d=32):
            super().__init__()
            self.qkv = torch.nn.Linear(d, 3 * d)
            self.out = torch.nn.Linear(d, d)

        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            scores = (q @ k.transpose(-1, -2)) / 32**0.5
            return self.out(scores.softmax(-1) @ v)

    with torch.no_grad():
        torch.compile(Attention().eval(), backend="llmint8")(torch.randn(2, 5, 32))
    report = int8pass.last_report()
    assert [layer.name for layer in report.layers] == ["qkv", "out"]
    assert all(layer.rewritten for layer in report.layers)


class SharedInput(torch.nn.Module):
    """Linears reading one input: q, k and v without bias, gate and up with bias, and `late`, whose bias is computed
    after the first of them."""

    def __init__(self, d=64):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(d, n, bias=False) for n in (d, 16, 16))
        self.gate, self.up = torch.nn.Linear(d, 96), torch.nn.Linear(d, 96)
        self.late = torch.nn.Linear(d, 8)
        self.out = torch.nn.Linear(d, 8)

    def forward(self, x):
        q = self.q(x)
        gate = self.gate(x)
        shifted = self.late.bias * 2  # computed after gate's linear: `late` cannot join the group formed there
        late = F.linear(x, self.late.weight, shifted)
        return (self.out(q), self.k(x), self.v(x), F.silu(gate) * self.up(x), late)


@pytest.mark.parametrize("block_size", [0, 32])
def test_linears_sharing_an_input_become_one_group(block_size):
    model = SharedInput().eval().to(torch.bfloat16)
    x = outlier_activation(6, 64, torch.bfloat16, outlier_cols=[5, 40])
    eager = SharedInput().eval().to(torch.bfloat16)
    eager.load_state_dict(model.state_dict())
    int8pass.quantize_(eager, block_size=block_size)  # the same codes, each linear called alone
    group_op, linear_op = ((torch.ops.llmint8.block_linear_group.default, torch.ops.llmint8.block_linear.default)
                           if block_size else (torch.ops.llmint8.linear_group.default, torch.ops.llmint8.linear.default))
    with torch.no_grad():
        want = eager(x)
        gm, inputs, report, _ = rewrite(model, x, options={"block_size": block_size})
        got = gm(*inputs)
        assert report.linear_groups == [["q", "k", "v"], ["gate", "up"]]
        assert sum(n.target is group_op for n in gm.graph.nodes) == 2
        assert sum(n.target is linear_op for n in gm.graph.nodes) == 2  # late, out
        for a, b in zip(got, want):
            assert torch.equal(a, b)  # a group computes each member exactly as its own call does
        compiled = torch.compile(model, backend="llmint8", options={"block_size": block_size})(x)  # and through
        # Inductor: one kernel call per group
        for a, b in zip(compiled, want):
            torch.testing.assert_close(a, b, rtol=2 * torch.finfo(torch.bfloat16).eps, atol=1e-5)
        assert int8pass.last_report().linear_groups == [["q", "k", "v"], ["gate", "up"]]


def test_linears_are_not_grouped_under_inductors_cpp_wrapper():
    # there a group's op (its result a list) would be called back through Python; each linear goes through the
    # dispatcher
    model = SharedInput().eval().to(torch.bfloat16)
    x = outlier_activation(2, 64, torch.bfloat16, outlier_cols=[5])
    with torch.no_grad():
        with inductor_api.config.patch(cpp_wrapper=True):
            gm, inputs, report, _ = rewrite(model, x)
        assert report.linear_groups == [] and all(layer.rewritten for layer in report.layers)
        assert sum(n.target is torch.ops.llmint8.linear.default for n in gm.graph.nodes) == 7
        # compiled: the same values as with the Python wrapper and its groups
        in_cpp = torch.compile(model, backend="llmint8", options={"inductor": {"cpp_wrapper": True}})(x)
        assert int8pass.last_report().linear_groups == []
        in_python = torch.compile(model, backend="llmint8")(x)
        assert int8pass.last_report().linear_groups == [["q", "k", "v"], ["gate", "up"]]
    for a, b in zip(in_cpp, in_python):
        assert torch.equal(a, b)


def test_linears_a_gradient_flows_through_are_not_grouped():
    model = SharedInput().eval()
    x = torch.randn(4, 64, requires_grad=True)
    model.requires_grad_(False)
    gm, inputs, report, _ = rewrite(model, x)
    assert report.linear_groups == [] and all(layer.rewritten for layer in report.layers)
    y = torch.compile(model, backend="llmint8")(x)
    sum(t.float().sum() for t in y).backward()
    assert x.grad is not None and x.grad.isfinite().all()
