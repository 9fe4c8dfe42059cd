"""Hugging Face transformers models, built from configs (no hub), compiled with llmint8 vs eager."""

import pytest
import torch

import int8pass

transformers = pytest.importorskip("transformers")

VOCAB = 1000


def gpt2():
    config = transformers.GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=VOCAB, n_positions=256)
    return transformers.GPT2LMHeadModel(config)


def opt():
    config = transformers.OPTConfig(num_hidden_layers=2, hidden_size=128, ffn_dim=256, num_attention_heads=4,
                                    vocab_size=VOCAB, max_position_embeddings=256, word_embed_proj_dim=128)
    return transformers.OPTForCausalLM(config)


def llama():
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(config)


def bert():
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                     vocab_size=VOCAB, max_position_embeddings=256)
    return transformers.BertModel(config)


# Without a GPU, "triton" runs the CUDA lowering (templates with fused epilogues) on CPU tensors, in
# Triton's interpreter (tests/conftest.py); with one, the models run on CUDA.
LOWERINGS = {"default": ("cpu", {}), "triton": ("cpu", {"cpu_backend": "triton"})}
if torch.cuda.is_available():
    LOWERINGS["triton"] = ("cuda", {})


# linears per model: 2 blocks x (attention + MLP) + the output head (GPT-2's is tied to the embedding)
@pytest.mark.parametrize("lowering", LOWERINGS)
@pytest.mark.parametrize("build, linears, heads", [(gpt2, 9, 1), (opt, 13, 1), (llama, 15, 1), (bert, 13, 0)])
def test_model_compiles_with_every_linear_but_the_head_rewritten(build, linears, heads, lowering):
    device, inductor = LOWERINGS[lowering]
    torch.manual_seed(0)
    model = build().eval().to(device, torch.bfloat16)
    ids = torch.randint(0, VOCAB, (2, 12), device=device)
    int8pass.clear_reports()
    options = {"keep_fp_weights": True, "inductor": inductor}
    with torch.no_grad():
        expected = model(ids)[0].float()
        got = torch.compile(model, backend="llmint8", options=options)(ids)[0].float()
    layers = [layer for report in int8pass.reports() for layer in report.layers]
    skipped = [layer for layer in layers if not layer.rewritten]
    assert len(layers) == linears and len(skipped) == heads, [(l.name, l.reason) for l in layers]
    assert all(layer.name == "lm_head" and layer.reason.startswith("output head") for layer in skipped)
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()


def test_gpt2_generate_with_tied_head_and_int8_weights():
    torch.manual_seed(0)
    model = gpt2().eval().to(torch.bfloat16)
    ids = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=6, do_sample=False)
        int8pass.clear_reports()
        model.forward = torch.compile(model.forward, backend="llmint8", options={"skip_modules": []})
        got = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert got.shape == expected.shape and torch.equal(got[:, :10], ids)
    head = [layer for report in int8pass.reports() for layer in report.layers if layer.name == "lm_head"]
    assert head and all(layer.rewritten for layer in head)
    # the tied embedding still reads the shared weight in fp: its int8 weight keeps the original; the others don't
    assert model.transformer.wte.weight is model.lm_head.weight and model.lm_head.weight.original is not None
    conv1d = model.transformer.h[0].mlp.c_fc.weight
    assert isinstance(conv1d, int8pass.Int8Weight) and conv1d.original is None and conv1d.shape == (128, 512)
    assert len(int8pass.reports()) <= 4  # prefill, then decode steps share dynamic graphs


def test_report_names_hf_layers_by_module_path():
    torch.manual_seed(0)
    with torch.no_grad():
        torch.compile(bert().eval(), backend="llmint8")(torch.randint(0, VOCAB, (1, 5)))
    names = [layer.name for layer in int8pass.last_report().layers]
    assert "encoder.layer.0.attention.self.query" in names and "encoder.layer.1.output.dense" in names


def test_lengths_1_to_2048_compile_a_handful_of_graphs():
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=2048)
    model = transformers.GPT2LMHeadModel(config).eval()
    compiled = torch.compile(model, backend="llmint8")
    int8pass.clear_reports()
    with torch.no_grad():
        for length in range(1, 2049):
            compiled(torch.randint(0, 100, (1, length)))
    # length 1 is specialized by Dynamo, the first other length compiles static, then one dynamic graph
    assert len(int8pass.reports()) <= 3, len(int8pass.reports())
