"""Tensor-parallel int8 linears (docs/design.md §1c): the row-parallel bound on one process, then a Llama checkpoint
loaded by two gloo ranks on 127.0.0.1 with `int8pass.from_pretrained(path, tp_plan="auto")`, checked against the
one-process model: codes, every linear against its bound, compiled logits, greedy tokens, the saved checkpoint."""

import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import given, strategies as st

import int8pass
from int8pass import reference
from tests.helpers import outlier_activation

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402  (a transformers dependency)

WORLD_SIZE = 2
VOCAB = 1000
PROMPT = [[5, 17, 301, 42, 999, 7, 64, 128, 256, 3, 11, 500]]
NEW_TOKENS = 12
# the checkpoint's linears see 2-46% of their input columns as outliers at this threshold
THRESHOLD = 3.0
BLOCK_SIZE = 32
RANKS_TIMEOUT_S = 900


# ---- the row-parallel bound, one process ------------------------------------------------------------------------

def row_parallel_linear(x, weight, threshold, world_size):
    """What the ranks compute, on one process: each slice of W's columns quantized with the whole rows' s_w, each
    slice of x through reference.linear (its own s_x and outliers), partials summed in x's dtype."""
    s_w = weight.float().abs().amax(dim=1)
    y = None
    for start, stop in reference.shard_bounds(weight.shape[1], world_size):
        if start == stop:
            continue
        w_q, _ = reference.quantize_weight(weight[:, start:stop], row_absmax=s_w)
        part = reference.linear(x[..., start:stop], w_q, s_w, None, threshold)
        y = part if y is None else y + part
    return y


@given(m=st.integers(1, 6), n=st.integers(1, 24), k=st.integers(2, 80), world_size=st.sampled_from([2, 3, 4]),
       threshold=st.sampled_from([0.0, 2.0, 6.0]), seed=st.integers(0, 2**16))
def test_row_parallel_linear_within_its_bound(m, n, k, world_size, threshold, seed):
    x = outlier_activation(m, k, torch.bfloat16, outlier_cols=range(0, k, 7), magnitude=8.0, seed=seed)
    weight = (torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05).to(torch.bfloat16)
    y = row_parallel_linear(x, weight, threshold, world_size)
    exact = x.double() @ weight.double().t()
    bound = reference.row_parallel_error_bound(x, weight, None, threshold, world_size)
    assert ((y.double() - exact).abs() <= bound).all()


def test_row_parallel_slice_codes_are_the_whole_weights():
    weight = torch.randn(16, 70, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    w_q, s_w = reference.quantize_weight(weight)
    for start, stop in reference.shard_bounds(70, 3):
        codes, scale = reference.quantize_weight(weight[:, start:stop], row_absmax=s_w)
        assert torch.equal(codes, w_q[:, start:stop]) and torch.equal(scale, s_w)


def test_shard_bounds_are_dtensors():
    assert reference.shard_bounds(10, 4) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert reference.shard_bounds(5, 4) == [(0, 2), (2, 4), (4, 5), (5, 5)]


def _resident_bytes(file) -> int:
    """Rss of this process's mappings of `file` (smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:
            inside = len(fields) == 6 and fields[5] == str(file)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="Linux's smaps")
def test_released_checkpoint_pages_read_back_and_written_ones_stay(tmp_path):
    """What each rank does after reading a slice: its pages of the checkpoint files unmapped (the other ranks map them
    too), values read back from the file; a mapping holding a page written through it is left alone."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from int8pass import process_memory

    values = torch.randn(1 << 21, generator=torch.Generator().manual_seed(0))
    for name in ("read", "written"):
        save_file({"w": values}, tmp_path / f"{name}.safetensors")
    read = safe_open(tmp_path / "read.safetensors", "pt").get_tensor("w")
    written = safe_open(tmp_path / "written.safetensors", "pt").get_tensor("w")
    if _resident_bytes(tmp_path / "read.safetensors") == 0:
        pytest.skip("this safetensors copies tensors instead of mapping the file")
    written[5] = 42.0  # a private copy of that page
    assert float(read.sum()) == float(values.sum())
    process_memory.release_file_pages(".safetensors")
    assert _resident_bytes(tmp_path / "read.safetensors") == 0
    assert torch.equal(read, values)
    assert float(written[5]) == 42.0 and torch.equal(written[6:], values[6:])


# ---- two gloo ranks ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A bf16 Llama checkpoint, its projections' inputs wide enough to have outliers at THRESHOLD."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=256, intermediate_size=512,
                                      num_attention_heads=8, num_key_value_heads=4, vocab_size=VOCAB,
                                      max_position_embeddings=256, initializer_range=0.1)
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path, max_shard_size="1MB")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slices(model):
    """{linear: (dim, start, stop, codes, scales)} of a rank's int8 weights."""
    from int8pass import tensor_parallel

    slices = {}
    for name, module in model.named_modules():
        if isinstance(getattr(module, "weight", None), int8pass.Int8Weight):
            shard = tensor_parallel.shard_of(module)
            slices[name] = (shard.dim, shard.start, shard.stop, module.weight.codes.clone(), module.weight.scale.clone())
    return slices


def _rank_main(rank, port, checkpoint, out):
    """One rank: load with the plan, check each linear against its bound (eager), then compile, generate, save."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD_SIZE))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from int8pass import tensor_parallel

    # a floating-point model split by transformers: quantize_ refuses its DTensor weights by name
    split = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, tp_plan="auto", dtype=torch.bfloat16)
    results_error = "quantize_ accepted the DTensor weights"
    try:
        int8pass.quantize_(split)
    except ValueError as error:
        results_error = str(error)
    # and a compile leaves them in floating point, saying why
    split.forward = torch.compile(split.forward, backend="llmint8")
    with torch.no_grad():
        split(torch.tensor(PROMPT))
    split_reasons = [layer.reason for layer in int8pass.reports()[0].layers]
    int8pass.clear_reports()
    torch._dynamo.reset()
    del split

    # block mode: its row-parallel slices hold whole blocks (128 columns a rank)
    block = int8pass.from_pretrained(checkpoint, tp_plan="auto", block_size=BLOCK_SIZE)
    results = {"shards": {}, "bounds": {}, "block_shards": _slices(block), "quantize_error": results_error,
               "compile_reasons": split_reasons}
    int8pass.save_pretrained(block, out / "saved_block")
    del block

    model = int8pass.from_pretrained(checkpoint, tp_plan="auto", threshold=THRESHOLD)
    results["shards"] = _slices(model)
    full = {}
    for file in sorted(checkpoint.glob("*.safetensors")):
        full.update(load_file(file))
    captured = {}

    def capture(name):
        return lambda module, args, output: captured.__setitem__(name, (args[0].detach(), output.detach()))

    hooks = [model.get_submodule(name).register_forward_hook(capture(name)) for name in results["shards"]]
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        eager = model(ids).logits
    for hook in hooks:
        hook.remove()
    for name, (x, y) in captured.items():
        shard = tensor_parallel.shard_of(model.get_submodule(name))
        weight = full[name + ".weight"]
        if shard.dim == 1:  # row-parallel: x is this rank's slice; y the all-reduced sum
            parts = [torch.empty_like(x) for _ in range(WORLD_SIZE)]
            dist.all_gather(parts, x.contiguous())
            x = torch.cat(parts, dim=-1)
            bound = reference.row_parallel_error_bound(x, weight, None, THRESHOLD, WORLD_SIZE)
        else:  # column-parallel: the whole x, this rank's output features
            weight = weight[shard.start:shard.stop]
            bound = reference.error_bound(x, weight, None, THRESHOLD)
        err = (y.double() - x.reshape(-1, x.shape[-1]).double().matmul(weight.double().t()).reshape(y.shape)).abs()
        outliers = int(reference.outlier_columns(x.reshape(-1, x.shape[-1]), THRESHOLD).sum())
        results["bounds"][name] = (bool((err <= bound).all()), float((err / bound).max()), outliers)

    model.forward = torch.compile(model.forward, backend="llmint8")
    with torch.no_grad():
        results["compiled"] = model(ids).logits
        results["tokens"] = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    results["eager"] = eager
    results["rewritten"] = [layer.name for layer in int8pass.reports()[0].rewritten]
    int8pass.save_pretrained(model, out / "saved")
    torch.save(results, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def int8_weights(model):
    return {name: module.weight for name, module in model.named_modules()
            if isinstance(getattr(module, "weight", None), int8pass.Int8Weight)}


def same_slices(slices, weights):
    """Each rank's codes and scales are its rows or columns of the whole weights' (block scales: whole blocks)."""
    assert sorted(slices) == sorted(weights)
    for name, (dim, start, stop, codes, scale) in slices.items():
        whole = weights[name]
        assert torch.equal(codes, whole.codes.narrow(dim, start, stop - start)), name
        if dim == 0:
            expected = whole.scale[start:stop]
        elif whole.block_size:
            expected = whole.scale[:, start // whole.block_size:-(-stop // whole.block_size)]
        else:
            expected = whole.scale
        assert torch.equal(scale, expected), name


def tensors(folder):
    found = {}
    for file in folder.glob("*.safetensors"):
        found.update(load_file(file))
    return found


def same_greedy_tokens_but_ties(tokens, expected, model, tie):
    """The greedy tokens of `expected` (generated by `model`), or the same up to a step where `model` itself scores
    the token taken instead within `tie` of its own choice (random weights give near-ties that any rounding flips)."""
    diverged = (tokens != expected).nonzero()
    if not len(diverged):
        return
    step = int(diverged[0, 1])
    with torch.no_grad():
        logits = model(expected[:, :step]).logits[0, -1].float()
    gap = float(logits[expected[0, step]] - logits[tokens[0, step]])
    assert gap <= tie, f"greedy tokens diverge at {step}, by {gap:.3g} > {float(tie):.3g}"


def test_two_gloo_ranks_match_one_process(checkpoint, tmp_path):
    spawned = mp.spawn(_rank_main, args=(_free_port(), checkpoint, tmp_path), nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + RANKS_TIMEOUT_S
    while not spawned.join(timeout=5):  # raises if a rank failed
        if time.monotonic() > deadline:  # a collective one rank never reached: fail, do not hang CI
            for process in spawned.processes:
                process.kill()
            pytest.fail(f"the {WORLD_SIZE} ranks did not finish in {RANKS_TIMEOUT_S} s")
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]

    one = int8pass.from_pretrained(checkpoint, threshold=THRESHOLD)
    bf16 = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        bf16_logits = bf16(ids).logits
        one_eager_tokens = one.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        one.forward = torch.compile(one.forward, backend="llmint8")
        one_logits = one(ids).logits
        one_tokens = one.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)

    # each rank's codes and scales are its slice of the one-process model's: the bitsandbytes layout holds
    linears = int8_weights(one)
    one_block = int8pass.from_pretrained(checkpoint, block_size=BLOCK_SIZE)
    for rank in ranks:
        same_slices(rank["shards"], linears)
        same_slices(rank["block_shards"], int8_weights(one_block))
        # every linear within its bound (§1c for the row-parallel ones), outliers split in each one's input
        for name, (inside, worst, outliers) in rank["bounds"].items():
            assert inside, f"{name}: error {worst:.3g} x its bound"
            assert outliers > 0, name

    # the compiled model, every linear but the head in int8; logits as close to one process's as int8 is to bf16
    for rank in ranks:
        assert sorted(rank["rewritten"]) == sorted(linears), rank["rewritten"]
        quantization = (one_logits.float() - bf16_logits.float()).abs().max()
        assert (rank["compiled"].float() - one_logits.float()).abs().max() <= quantization
        assert torch.equal(rank["compiled"], ranks[0]["compiled"])
        assert torch.equal(rank["tokens"], ranks[0]["tokens"])
        same_greedy_tokens_but_ties(rank["tokens"], one_tokens, one, tie=quantization)

    assert "tensor-parallel DTensor" in ranks[0]["quantize_error"]
    assert len(ranks[0]["compile_reasons"]) == len(linears) + 1  # and the head
    assert all("tensor-parallel DTensor weight" in reason for reason in ranks[0]["compile_reasons"])

    # the sharded model saves one ordinary checkpoint: the one-process model's, tensor for tensor
    int8pass.save_pretrained(one, tmp_path / "one")
    int8pass.save_pretrained(one_block, tmp_path / "one_block")
    for saved, expected in (("saved", "one"), ("saved_block", "one_block")):
        saved, expected = tensors(tmp_path / saved), tensors(tmp_path / expected)
        assert sorted(saved) == sorted(expected)
        for key, value in expected.items():
            assert torch.equal(saved[key], value), key
    reloaded = int8pass.from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(reloaded.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False), one_eager_tokens)


def test_int8_checkpoints_are_refused_with_a_plan(tmp_path, checkpoint):
    int8pass.save_pretrained(int8pass.from_pretrained(checkpoint), tmp_path)
    with pytest.raises(ValueError, match="holds int8 weights.*floating-point checkpoint with tp_plan"):
        int8pass.from_pretrained(tmp_path, tp_plan="auto")
