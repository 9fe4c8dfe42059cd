"""int8pass.quantize_ for plain modules: in memory, or from a state dict into a model built on the meta device."""

import pytest
import torch

import int8pass
from int8pass import reference
from int8pass.int8_weight import Int8Weight
from tests.helpers import outlier_activation


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=50, d=32):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.up, self.down = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)
        self.lm_head = torch.nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.embed.weight  # tied, as many language models are
        self.register_buffer("scale", torch.ones(d), persistent=True)

    def forward(self, ids):
        h = self.embed(ids) * self.scale
        return self.lm_head(h + self.down(torch.relu(self.up(h))))


def test_in_memory_model_gets_int8_weights_and_compiles_as_is():
    torch.manual_seed(0)
    model = TinyLM().eval().to(torch.bfloat16)
    up = model.up.weight.detach().clone()
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        expected = model(ids)
        int8pass.quantize_(model)
    assert isinstance(model.up.weight, Int8Weight) and isinstance(model.down.weight, Int8Weight)
    assert torch.equal(model.up.weight.codes, reference.quantize_weight(up)[0])
    assert type(model.embed.weight) is torch.nn.Parameter  # the output head is skipped by default, and tied to it
    with torch.no_grad():
        eager = model(ids)
        compiled = torch.compile(model, backend="llmint8")(ids)
    report = int8pass.last_report()
    assert [layer.rewritten for layer in report.layers] == [True, True, False] and report.released_bytes == 0
    torch.testing.assert_close(compiled, eager, rtol=0.02, atol=0.02)
    assert (eager.float() - expected.float()).abs().max() < 0.05 * expected.float().abs().max()


def test_tied_head_keeps_the_exact_embedding():
    torch.manual_seed(0)
    model = TinyLM().eval()
    table = model.embed.weight.detach().clone()
    int8pass.quantize_(model, skip_modules=[])
    assert model.lm_head.weight is model.embed.weight and model.embed.weight.original is not None
    assert torch.equal(model.embed(torch.tensor([3])), table[[3]])


def test_meta_model_loads_straight_from_a_state_dict(tmp_path):
    torch.manual_seed(0)
    source = TinyLM().eval().to(torch.bfloat16)
    torch.save(source.state_dict(), tmp_path / "model.pt")
    state = torch.load(tmp_path / "model.pt", mmap=True)  # file-backed, not read into memory
    with torch.device("meta"):
        model = TinyLM().eval().to(torch.bfloat16)
    int8pass.quantize_(model, state)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert model.lm_head.weight is model.embed.weight  # still tied
    assert torch.equal(model.up.weight.codes, reference.quantize_weight(source.up.weight.detach())[0])
    x = torch.randint(0, 50, (1, 5))
    with torch.no_grad():
        reference_model = int8pass.quantize_(source)
        assert torch.equal(model(x), reference_model(x))


def test_meta_model_with_missing_tensors_raises():
    state = TinyLM().state_dict()
    del state["scale"]
    with torch.device("meta"):
        model = TinyLM()
    with pytest.raises(ValueError, match="no value for 1 tensors left on the meta device: scale"):
        int8pass.quantize_(model, state)


def test_compile_only_options_are_refused():
    with pytest.raises(ValueError, match="'stats' applies to torch.compile"):
        int8pass.quantize_(torch.nn.Linear(8, 8), stats=True)


def test_skipped_layers_and_options():
    model = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.Linear(8, 64))
    int8pass.quantize_(model, min_features=16, threshold=3.0)
    assert [type(m.weight).__name__ for m in model] == ["Parameter", "Parameter"]
    int8pass.quantize_(model, threshold=3.0)
    assert all(m.weight.threshold == 3.0 for m in model)
    x = outlier_activation(4, 64)
    torch.testing.assert_close(model[0](x), reference.linear(x, model[0].weight.codes, model[0].weight.scale,
                                                              model[0].bias, 3.0))
