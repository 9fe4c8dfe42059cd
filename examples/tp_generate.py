"""Tensor-parallel int8 generation on CPU: a Llama checkpoint split over ranks by transformers' plan, each rank
reading and quantizing only its slice of every linear, compiled with the llmint8 backend, then saved as one ordinary
checkpoint (docs/design.md §1c).

    .venv/bin/torchrun --nproc-per-node 2 examples/tp_generate.py [CHECKPOINT]

Without CHECKPOINT, rank 0 writes a small random-weight bf16 Llama checkpoint to a temporary folder first. Rank 0
also loads the checkpoint in bf16 and as the one-process int8 model, and compares them with the split model on the
same tokens (bf16's greedy continuation, fed to every model: next-token agreement and logits).
"""

import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

import int8pass

NEW_TOKENS = 32


def write_checkpoint() -> Path:
    """Rank 0 writes a bf16 Llama checkpoint; every rank gets its path."""
    import transformers

    folder = [None]
    if dist.get_rank() == 0:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(num_hidden_layers=4, hidden_size=512, intermediate_size=1536,
                                          num_attention_heads=8, num_key_value_heads=4, vocab_size=8000,
                                          max_position_embeddings=1024, initializer_range=0.05)
        folder = [tempfile.mkdtemp(prefix="int8pass-tp-")]
        transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder[0], max_shard_size="20MB")
    dist.broadcast_object_list(folder, src=0)
    return Path(folder[0])


def main():
    import transformers

    dist.init_process_group("gloo")  # from torchrun's environment (one thread a rank); transformers uses this group
    rank, world = dist.get_rank(), dist.get_world_size()
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else write_checkpoint()
    saved = path.with_name(path.name + "-int8")
    prompt = torch.randint(0, 8000, (1, 16), generator=torch.Generator().manual_seed(1))

    model = int8pass.from_pretrained(path, tp_plan="auto")
    model.forward = torch.compile(model.forward, backend="llmint8")
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    rss = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])
    print(f"rank {rank}/{world}: generated {NEW_TOKENS} tokens; RSS {rss / 1024:.0f} MiB")

    # the same tokens for every model: bf16's greedy continuation (rank 0 makes it, every rank runs the split model)
    sequence = [None]
    if rank == 0:
        bf16 = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        with torch.no_grad():
            sequence = [bf16.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)]
            bf16_logits = bf16(sequence[0]).logits[0, 15:-1].float()
        del bf16
    dist.broadcast_object_list(sequence, src=0)
    with torch.no_grad():
        split_logits = model(sequence[0]).logits[0, 15:-1].float()
    int8pass.save_pretrained(model, saved)  # every rank: the weights are gathered, rank 0 writes

    if rank == 0:
        print(int8pass.reports()[0].table())
        one = int8pass.from_pretrained(path)  # the same checkpoint in this one process
        one.forward = torch.compile(one.forward, backend="llmint8")
        with torch.no_grad():
            one_logits = one(sequence[0]).logits[0, 15:-1].float()
        chosen = sequence[0][0, 16:]
        for name, logits in ((f"{world} ranks", split_logits), ("one process", one_logits)):
            agree = (logits.argmax(-1) == chosen).float().mean().item()
            print(f"int8, {name}: next token = bf16's at {agree:.0%} of the {NEW_TOKENS} steps; largest logit "
                  f"difference from bf16 {(logits - bf16_logits).abs().max():.3f}")
        print(f"largest logit difference between {world} ranks and one process: "
              f"{(split_logits - one_logits).abs().max():.3f} (random weights give near-ties, which any rounding "
              "can flip)")
        reloaded = int8pass.from_pretrained(saved)
        same = all(torch.equal(reloaded.get_parameter(name).codes, weight.codes) and
                   torch.equal(reloaded.get_parameter(name).scale, weight.scale)
                   for name, weight in one.named_parameters() if isinstance(weight, int8pass.Int8Weight))
        print(f"saved from {world} ranks as one checkpoint in the bitsandbytes layout "
              f"({', '.join(sorted(p.name for p in saved.iterdir()))}); its int8 weights are the one-process "
              f"model's: {same}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
