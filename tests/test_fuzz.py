"""Fuzzing: random module stacks compiled with llmint8 against the same stack run eagerly on the reference math.

CI runs 10 examples; FUZZ_EXAMPLES=500 runs a longer profile.
"""

import copy
import os

import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import int8pass
from int8pass import reference
from tests.helpers import Conv1D

WIDTHS = [8, 16, 24, 40, 64]


class Residual(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return x + self.inner(x)


class Attention(torch.nn.Module):
    def __init__(self, d, bias):
        super().__init__()
        self.qkv = torch.nn.Linear(d, 3 * d, bias=bias)
        self.out = torch.nn.Linear(d, d, bias=bias)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        return self.out(scores.softmax(-1) @ v)


def block(kind, d, bias):
    """A module taking and returning width d."""
    if kind == "linear":
        return torch.nn.Linear(d, d, bias=bias)
    if kind == "conv1d":
        return Conv1D(d, d)
    if kind == "mlp":
        return torch.nn.Sequential(torch.nn.Linear(d, 2 * d, bias=bias), torch.nn.GELU(), torch.nn.Linear(2 * d, d, bias=bias))
    if kind == "attention":
        return Attention(d, bias)
    if kind == "residual":
        return Residual(torch.nn.Sequential(torch.nn.LayerNorm(d), torch.nn.Linear(d, d, bias=bias)))
    if kind == "layernorm":
        return torch.nn.LayerNorm(d)
    raise ValueError(kind)


def reference_stack(model):
    """The model with every Linear and Conv1D computed by the reference math, eagerly."""

    def linear_forward(module, weight):
        def forward(x):
            w_q, s_w = reference.quantize_weight(weight)
            return reference.linear(x, w_q, s_w, module.bias, 6.0)

        return forward

    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.forward = linear_forward(module, module.weight)
        elif isinstance(module, Conv1D):
            module.forward = linear_forward(module, module.weight.t())
    return model


def linear_count(model):
    return sum(isinstance(m, (torch.nn.Linear, Conv1D)) for m in model.modules())


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 10)), phases=[Phase.explicit, Phase.generate, Phase.target])
@given(
    kinds=st.lists(st.sampled_from(["linear", "conv1d", "mlp", "attention", "residual", "layernorm"]), min_size=1, max_size=4),
    d=st.sampled_from(WIDTHS),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    bias=st.booleans(),
    batch=st.sampled_from([(1,), (5,), (2, 3)]),
    outlier_cols=st.lists(st.integers(0, 7), max_size=3, unique=True),
    magnitude=st.sampled_from([10.0, 60.0]),
    seed=st.integers(0, 2**16),
)
def test_random_stacks_match_the_reference(kinds, d, dtype, bias, batch, outlier_cols, magnitude, seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(*(block(kind, d, bias) for kind in kinds)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(std=d**-0.5)
    model = model.to(dtype)
    x = torch.randn(*batch, d)
    x[..., outlier_cols] *= magnitude
    x = x.to(dtype)

    torch._dynamo.reset()  # hypothesis examples share one test call
    int8pass.clear_reports()
    with torch.no_grad():
        expected = reference_stack(copy.deepcopy(model))(x)
        fp = model(x)
        y = torch.compile(model, backend="llmint8", fullgraph=True)(x)

    layers = [layer for report in int8pass.reports() for layer in report.layers]
    assert len(layers) == linear_count(model), [(layer.name, layer.reason) for layer in layers]
    assert all(layer.rewritten for layer in layers), [(layer.name, layer.reason) for layer in layers]
    # Same linear math as the reference, but Inductor runs softmax/GELU/LayerNorm in fp32 where eager rounds
    # each op to bf16/fp16: an ulp there can flip an int8 code downstream. Allow, per block, two code steps
    # and a few ulps; a wrong rewrite (transposed weight, lost bias, bad scale) is off by O(1).
    tolerance = len(kinds) * (2 / 127 + 4 * torch.finfo(dtype).eps)
    scale = expected.float().abs().max().item() + 1e-3
    assert (y.float() - expected.float()).abs().max().item() <= tolerance * scale
    assert torch.equal(torch.isfinite(y), torch.isfinite(fp))
