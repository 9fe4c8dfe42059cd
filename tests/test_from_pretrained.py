"""The flows users run with Hugging Face checkpoints, end to end from files on disk: load (sharded safetensors, as
save_pretrained writes them), compile, generate, save, reload; and checkpoints moving both ways between int8pass and
bitsandbytes."""

import json
from pathlib import Path

import pytest
import torch

import int8pass
from int8pass import reference, rules
from int8pass.int8_weight import Int8Weight
from tests.helpers import outlier_activation, within_bound

transformers = pytest.importorskip("transformers")
from int8pass import hf  # noqa: E402  (needs transformers)

VOCAB = 1000


def llama():
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(config)


def gpt2():  # Conv1D weights stored [in, out], the output head tied to the embedding
    config = transformers.GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=VOCAB, n_positions=256)
    return transformers.GPT2LMHeadModel(config)


BUILDERS = {"llama": llama, "gpt2": gpt2}


@pytest.fixture(scope="module", params=list(BUILDERS))
def checkpoint(request, tmp_path_factory):
    """A bf16 checkpoint written by save_pretrained, in several safetensors shards."""
    torch.manual_seed(0)
    model = BUILDERS[request.param]().to(torch.bfloat16)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path, max_shard_size="300KB")
    assert len(list(path.glob("*.safetensors"))) > 1
    return path


def linear_weights(model):
    return {name: module.weight for name, module in model.named_modules()
            if rules.linear_weight_orientation(module) is not None}


def ids():
    return torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(1))


def compiled_generate_matches_eager(model, checkpoint):
    """Logits of `model` (an int8 model loaded from `checkpoint`), after checking that compiling its forward keeps the
    greedy tokens of eager, that every linear but the head is rewritten, and that the logits stay near bf16's."""
    with torch.no_grad():
        logits = model(ids()).logits
        eager = model.generate(ids(), max_new_tokens=6, do_sample=False)
        model.forward = torch.compile(model.forward, backend="llmint8")
        compiled = model.generate(ids(), max_new_tokens=6, do_sample=False)
    assert torch.equal(compiled, eager)
    assert all(layer.rewritten for report in int8pass.reports()[-2:] for layer in report.layers if layer.name != "lm_head")
    bf16 = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = bf16(ids()).logits.float()
    assert (logits.float() - expected).abs().max() < 0.05 * expected.abs().max()
    return logits


def saved_dtypes(path) -> dict[str, str]:
    """Each tensor's dtype in the safetensors files under `path`, as safetensors names it."""
    from safetensors import safe_open

    dtypes = {}
    for file in path.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            dtypes.update({key: f.get_slice(key).get_dtype() for key in f.keys()})
    return dtypes


def test_from_pretrained_compile_generate_save_reload(checkpoint, tmp_path):
    model = int8pass.from_pretrained(checkpoint, dtype=torch.bfloat16)
    weights = linear_weights(model)
    int8 = {name for name, weight in weights.items() if isinstance(weight, Int8Weight)}
    assert int8 == {name for name in weights if name != "lm_head"}, sorted(weights)
    logits = compiled_generate_matches_eager(model, checkpoint)
    assert sum(report.released_bytes for report in int8pass.reports()[-2:]) == 0  # int8 from the start

    saved = tmp_path / "int8"
    int8pass.save_pretrained(model, saved)
    config = json.loads((saved / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["load_in_8bit"] and config["llm_int8_threshold"] == 6.0
    dtypes = saved_dtypes(saved)
    some = sorted(int8)[0]
    assert (dtypes[f"{some}.weight"], dtypes[f"{some}.SCB"], dtypes[f"{some}.weight_format"]) == ("I8", "F32", "U8")
    reloaded = int8pass.from_pretrained(saved)
    for name, weight in linear_weights(reloaded).items():
        if name in int8:
            assert torch.equal(weight.codes, weights[name].codes) and torch.equal(weight.scale, weights[name].scale)
    with torch.no_grad():
        assert torch.equal(reloaded(ids()).logits, logits)


def test_an_output_head_tied_to_the_embedding_is_int8_when_asked(tmp_path):
    # GPT-2's checkpoint holds the embedding only, which the loader reads for the embedding (no linear): skip_modules=[]
    # must still give the tied head its Int8Weight, with the exact values kept for the embedding, as quantize_ does
    torch.manual_seed(0)
    gpt2().to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    bf16 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    model = int8pass.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16, skip_modules=[])
    head = model.lm_head.weight
    assert isinstance(head, Int8Weight) and head is model.transformer.wte.weight and head.original is not None
    with torch.no_grad():
        assert torch.equal(model.transformer.wte(ids()), bf16.transformer.wte(ids()))
        logits, expected = model(ids()).logits.float(), bf16(ids()).logits.float()
    assert (logits - expected).abs().max() < 0.05 * expected.abs().max()
    with torch.no_grad():  # the same weights as quantize_ gives the bf16 model
        assert torch.equal(int8pass.quantize_(bf16, skip_modules=[])(ids()).logits, model(ids()).logits)
    int8pass.save_pretrained(model, tmp_path / "int8")
    reloaded = int8pass.from_pretrained(tmp_path / "int8")
    assert isinstance(reloaded.lm_head.weight, Int8Weight)
    with torch.no_grad():
        assert torch.equal(reloaded(ids()).logits, model(ids()).logits)


@pytest.mark.parametrize("block_size", [32, 128])
def test_block_mode_from_pretrained_compile_generate_save_reload(checkpoint, tmp_path, block_size):
    model = int8pass.from_pretrained(checkpoint, dtype=torch.bfloat16, block_size=block_size)
    weights = linear_weights(model)
    int8 = {name for name, weight in weights.items() if isinstance(weight, Int8Weight)}
    assert int8 == {name for name in weights if name != "lm_head"}
    some = weights[sorted(int8)[0]]
    assert some.block_size == block_size and some.threshold == 0.0 and some.scale.dtype == torch.bfloat16
    logits = compiled_generate_matches_eager(model, checkpoint)

    saved = tmp_path / "blocks"
    int8pass.save_pretrained(model, saved)
    config = json.loads((saved / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "int8pass" and config["block_size"] == block_size and config["threshold"] == 0.0
    dtypes = saved_dtypes(saved)
    name = sorted(int8)[0]
    assert (dtypes[f"{name}.weight"], dtypes[f"{name}.weight_block_scale"]) == ("I8", "BF16")
    assert f"{name}.SCB" not in dtypes
    reloaded = int8pass.from_pretrained(saved)
    for name, weight in linear_weights(reloaded).items():
        if name in int8:
            assert weight.block_size == block_size
            assert torch.equal(weight.codes, weights[name].codes) and torch.equal(weight.scale, weights[name].scale)
    with torch.no_grad():
        assert torch.equal(reloaded(ids()).logits, logits)


def test_compiling_a_model_loaded_by_transformers(checkpoint, tmp_path):
    """bf16 weights mmap'd from the files: the backend turns them into int8 weights the model owns."""
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    with torch.no_grad():
        model.forward = torch.compile(model.forward, backend="llmint8")
        compiled = model.generate(ids(), max_new_tokens=6, do_sample=False)
        same_codes = int8pass.from_pretrained(checkpoint).generate(ids(), max_new_tokens=6, do_sample=False)
    assert torch.equal(compiled, same_codes)
    assert sum(isinstance(w, Int8Weight) for w in linear_weights(model).values()) == len(linear_weights(model)) - 1
    with torch.no_grad():
        eager = model._orig_mod(ids()) if hasattr(model, "_orig_mod") else type(model).forward(model, ids())
    assert torch.isfinite(eager.logits).all()
    int8pass.save_pretrained(model, tmp_path / "int8")
    with torch.no_grad():
        assert torch.equal(int8pass.from_pretrained(tmp_path / "int8").generate(ids(), max_new_tokens=6, do_sample=False),
                           compiled)


def test_transformers_quantization_config_convention(checkpoint):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=torch.bfloat16, quantization_config=hf.Int8PassConfig(threshold=5.0))
    int8 = [w for w in linear_weights(model).values() if isinstance(w, Int8Weight)]
    assert int8 and all(w.threshold == 5.0 for w in int8)


def test_bitsandbytes_linear8bitlt_state_dicts_load_both_ways():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    fp = torch.nn.Linear(96, 40).to(torch.bfloat16)
    x = outlier_activation(9, 96, torch.bfloat16, outlier_cols=[4, 50])
    theirs = bnb.nn.Linear8bitLt(96, 40, bias=True, has_fp16_weights=False, threshold=6.0)
    theirs.load_state_dict(fp.state_dict())
    theirs = theirs.to("cpu").eval()  # bitsandbytes quantizes here
    state = theirs.state_dict()
    assert {key: value.dtype for key, value in state.items() if key != "bias"} == {
        "weight": torch.int8, "SCB": torch.float32, "weight_format": torch.uint8}

    # theirs into ours
    ours = torch.nn.Linear(96, 40).to(torch.bfloat16)
    ours.weight = torch.nn.Parameter(Int8Weight.from_codes(state["weight"], state["SCB"], dtype=torch.bfloat16),
                                     requires_grad=False)
    ours.bias = torch.nn.Parameter(state["bias"].to(torch.bfloat16), requires_grad=False)
    with torch.no_grad():
        within_bound(ours(x), x, fp.weight, fp.bias, 6.0)
        within_bound(theirs(x).to(torch.bfloat16), x, fp.weight, fp.bias, 6.0)
    # bitsandbytes rounds W * (127 / SCB) where we round W / s * 127: codes at exact ties may differ by one
    assert (ours.weight.codes.int() - reference.quantize_weight(fp.weight.detach())[0].int()).abs().max() <= 1

    # ours into theirs: the layout hf.checkpoint_state_dict writes
    mine = torch.nn.Linear(96, 40).to(torch.bfloat16)
    mine.load_state_dict(fp.state_dict())
    int8pass.quantize_(mine, skip_modules=[])
    fresh = bnb.nn.Linear8bitLt(96, 40, bias=True, has_fp16_weights=False, threshold=6.0).to("cpu").eval()
    fresh.load_state_dict(hf.checkpoint_state_dict(mine))
    with torch.no_grad():
        within_bound(fresh(x).to(torch.bfloat16), x, fp.weight, fp.bias, 6.0)
        torch.testing.assert_close(fresh(x).float(), mine(x).float(), rtol=0.02, atol=0.02)


def test_bitsandbytes_checkpoints_move_both_ways(tmp_path):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("accelerate")  # transformers' bitsandbytes integration needs it
    torch.manual_seed(0)
    llama().to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    config = transformers.BitsAndBytesConfig(load_in_8bit=True)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16,
                                                               quantization_config=config, device_map="cpu")
    theirs.save_pretrained(tmp_path / "bnb")
    ours = int8pass.from_pretrained(tmp_path / "bnb")
    assert torch.equal(ours.model.layers[0].mlp.up_proj.weight.codes, theirs.model.layers[0].mlp.up_proj.weight.data)
    int8pass.save_pretrained(ours, tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", device_map="cpu")
    assert back.model.layers[0].mlp.up_proj.__class__.__name__ == "Linear8bitLt"
    with torch.no_grad():
        ours_logits, back_logits = ours(ids()).logits.float(), back(ids()).logits.float()
    assert (ours_logits - back_logits).abs().max() < 0.05 * back_logits.abs().max()
    assert Path(tmp_path / "ours" / "config.json").exists()
