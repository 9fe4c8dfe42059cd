"""Layer names are paths in the compiled module's tree (named_modules()), whatever form Dynamo saw, and skip_modules
skips exactly the layers it names."""

import pytest
import torch
import torch.nn.functional as F

import int8pass
from tests.helpers import tiny_llama

transformers = pytest.importorskip("transformers")

VOCAB = 256


class Wrapper(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, ids):
        return self.inner(ids).logits


def compiled_module(model, options):
    return torch.compile(model, backend="llmint8", options=options), model


def compiled_forward(model, options):
    model.forward = torch.compile(model.forward, backend="llmint8", options=options)
    return model, model


def compiled_wrapper(model, options):
    wrapper = Wrapper(model)
    return torch.compile(wrapper, backend="llmint8", options=options), wrapper


FORMS = {"torch.compile(model)": compiled_module, "torch.compile(model.forward)": compiled_forward,
         "wrapper module": compiled_wrapper}


def run(form, options):
    """The layers the compile reported, and {name: module} of the module whose tree names them."""
    int8pass.clear_reports()
    callable_, root = FORMS[form](tiny_llama(VOCAB), options)
    with torch.no_grad():
        callable_(torch.randint(0, VOCAB, (1, 6)))
    layers = [layer for report in int8pass.reports() for layer in report.layers]
    return layers, dict(root.named_modules())


@pytest.mark.parametrize("form", FORMS)
def test_names_are_module_paths(form):
    layers, modules = run(form, {})
    linears = [name for name, module in modules.items() if isinstance(module, torch.nn.Linear)]
    assert [layer.name for layer in layers] == linears
    assert all(layer.weight == f"{layer.name}.weight" for layer in layers)
    head = [layer for layer in layers if not layer.rewritten]
    assert [layer.name for layer in head] == [name for name in linears if name.endswith("lm_head")]


PREFIX = {"torch.compile(model)": "", "torch.compile(model.forward)": "", "wrapper module": "inner."}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", ["exact", "prefix", "pattern"])
def test_skip_modules_skips_exactly_the_named_layers(form, kind):
    prefix = PREFIX[form]
    rule = {"exact": f"{prefix}model.layers.0.mlp.down_proj", "prefix": f"{prefix}model.layers.1.",
            "pattern": "*.self_attn.[qk]_proj"}[kind]
    layers, modules = run(form, {"skip_modules": [rule]})
    linears = [name for name, module in modules.items() if isinstance(module, torch.nn.Linear)]
    expected = {
        "exact": {f"{prefix}model.layers.0.mlp.down_proj"},
        "prefix": {name for name in linears if name.startswith(f"{prefix}model.layers.1.")},
        "pattern": {name for name in linears if name.endswith(("self_attn.q_proj", "self_attn.k_proj"))},
    }[kind]
    assert len(expected) == {"exact": 1, "prefix": 7, "pattern": 4}[kind]
    assert {layer.name for layer in layers if not layer.rewritten} == expected
    # and the model itself: int8 weights exactly where the report says
    int8 = {name for name in linears if isinstance(modules[name].weight, int8pass.Int8Weight)}
    assert int8 == set(linears) - expected


def test_tied_head_is_named_by_the_linear_that_applies_it():
    config = transformers.GPT2Config(n_layer=1, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64)
    model = transformers.GPT2LMHeadModel(config).eval()
    int8pass.clear_reports()
    with torch.no_grad():
        torch.compile(model, backend="llmint8", options={"skip_modules": []})(torch.randint(0, VOCAB, (1, 5)))
    head = next(layer for layer in int8pass.last_report().layers if layer.name == "lm_head")
    assert head.rewritten and head.weight == "transformer.wte.weight"
    assert [layer.name for layer in int8pass.last_report().layers][:2] == ["transformer.h.0.attn.c_attn",
                                                                          "transformer.h.0.attn.c_proj"]


class TwoWeights(torch.nn.Module):
    """Parameters applied by F.linear in the module that holds them: each layer is named by its parameter."""

    def __init__(self):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(32, 16))
        self.w2 = torch.nn.Parameter(torch.randn(16, 32))

    def forward(self, x):
        return F.linear(F.relu(F.linear(x, self.w1)), self.w2)


def test_parameters_applied_directly_are_named_by_their_path():
    model = torch.nn.Sequential(TwoWeights()).eval()
    with torch.no_grad():
        torch.compile(model, backend="llmint8", options={"skip_modules": ["0.w2"]})(torch.randn(3, 16))
    layers = int8pass.last_report().layers
    assert [(layer.name, layer.rewritten) for layer in layers] == [("0.w1", True), ("0.w2", False)]


GLOBAL_WEIGHT = torch.nn.Parameter(torch.randn(8, 16), requires_grad=False)


def test_a_weight_no_module_holds_is_reported_without_a_name():
    def f(x):
        return F.linear(x, GLOBAL_WEIGHT)

    with torch.no_grad():
        torch.compile(f, backend="llmint8")(torch.randn(2, 16))
    (layer,) = int8pass.last_report().layers
    assert layer.name == "" and "GLOBAL_WEIGHT" in layer.weight
    assert "(no module path)" in int8pass.last_report().table()
