"""The three ways to int8 weights (torch.compile, quantize_, from_pretrained) apply the same rules (int8pass/rules.py):
the same layers end up int8, with the same codes, threshold and kept originals."""

import pytest
import torch

import int8pass
from int8pass.int8_weight import Int8Weight
from tests.helpers import tiny_llama

transformers = pytest.importorskip("transformers")

VOCAB = 128


def checkpoint_model():
    """A Llama whose layers exercise every rule: a NaN weight, the output head, and the option-driven ones."""
    model = tiny_llama(VOCAB, ffn=96).to(torch.bfloat16)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[3, 5] = float("nan")
    return model


def linear_state(model):
    """{layer: (int8?, codes or None, threshold, original kept)} for every linear layer."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            weight = module.weight
            if isinstance(weight, Int8Weight):
                state[name] = (True, weight.codes.clone(), weight.threshold, weight.original is not None)
            else:
                state[name] = (False, None, None, False)
    return state


OPTIONS = [
    {},
    {"skip_modules": ["model.layers.1.mlp."], "threshold": 4.0},
    {"min_features": 48, "keep_fp_weights": True},
    {"dtypes": ["float16"]},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda options: ",".join(options) or "defaults")
def test_compile_quantize_and_from_pretrained_agree(options, tmp_path):
    checkpoint_model().save_pretrained(tmp_path)
    ids = torch.randint(0, VOCAB, (1, 5))

    compiled = checkpoint_model()
    with torch.no_grad():
        torch.compile(compiled, backend="llmint8", options=options)(ids)
    quantized = int8pass.quantize_(checkpoint_model(), **options)
    loaded = int8pass.from_pretrained(tmp_path, dtype=torch.bfloat16, **options)

    want = linear_state(compiled)
    assert not want["model.layers.0.self_attn.o_proj"][0]  # NaN: floating point everywhere
    for other in (quantized, loaded):
        got = linear_state(other)
        assert got.keys() == want.keys()
        for name in want:
            assert got[name][0] == want[name][0], name
            if want[name][0]:
                assert torch.equal(got[name][1], want[name][1]) and got[name][2:] == want[name][2:], name
    assert any(state[0] for state in want.values()) == (options != {"dtypes": ["float16"]})


def test_outlier_weights_original_needs_the_floating_point_weight():
    model = int8pass.quantize_(checkpoint_model())
    with torch.no_grad(), pytest.raises(Exception, match="outlier_weights='original'.*keep_fp_weights=True"):
        torch.compile(model, backend="llmint8", options={"outlier_weights": "original"})(torch.randint(0, VOCAB, (1, 4)))


def test_outlier_weights_original_from_quantize_uses_the_kept_weight():
    model = int8pass.quantize_(checkpoint_model(), outlier_weights="original")
    assert model.model.layers[0].mlp.up_proj.weight.original is not None
    with torch.no_grad():
        torch.compile(model, backend="llmint8", options={"outlier_weights": "original"})(torch.randint(0, VOCAB, (1, 4)))
    assert all(layer.rewritten for layer in int8pass.last_report().layers
               if layer.name not in ("lm_head", "model.layers.0.self_attn.o_proj"))


def test_conv1d_outlier_weights_original_without_it_raises():
    config = transformers.GPT2Config(n_layer=1, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64)
    model = int8pass.quantize_(transformers.GPT2LMHeadModel(config).eval())
    with torch.no_grad(), pytest.raises(Exception, match="outlier_weights='original'"):
        torch.compile(model, backend="llmint8", options={"outlier_weights": "original"})(torch.randint(0, VOCAB, (1, 4)))
