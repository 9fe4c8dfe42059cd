"""A Hugging Face causal LM from a checkpoint on disk, the way it is used: int8pass.from_pretrained (int8 weights as
each one is read), torch.compile with the llmint8 backend, generate(), int8pass.save_pretrained in the bitsandbytes
LLM.int8() layout, and a reload. The checkpoint is a random-weight GPT-2 written by save_pretrained (no model hub).

    .venv/bin/python examples/hf_generate.py      (after bash tools/dev.sh demo has set up .venv)
"""

import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import int8pass


def main():
    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp())
    config = GPT2Config(n_layer=4, n_embd=512, n_head=8, vocab_size=8000, n_positions=1024)
    GPT2LMHeadModel(config).to(torch.bfloat16).save_pretrained(folder / "bf16", max_shard_size="20MB")
    prompt = torch.randint(0, 8000, (1, 16))

    # lm_head (tied to the embedding) stays bf16 by default, as in bitsandbytes; skip_modules=[] quantizes it
    model = int8pass.from_pretrained(folder / "bf16", dtype=torch.bfloat16)
    model.forward = torch.compile(model.forward, backend="llmint8")
    int8pass.clear_reports()
    with torch.no_grad():
        tokens = model.generate(prompt, max_new_tokens=32, do_sample=False)
        bf16 = AutoModelForCausalLM.from_pretrained(folder / "bf16", dtype=torch.bfloat16)
        expected = bf16.generate(prompt, max_new_tokens=32, do_sample=False)

    print(int8pass.reports()[0].table())
    print(f"\ngraphs compiled while generating 32 tokens: {len(int8pass.reports())}")
    same = (tokens[0, 16:] == expected[0, 16:]).float().mean().item()
    print(f"greedy tokens identical to the bf16 model's: {same:.0%} "
          "(with random weights greedy choices can be near-ties: a divergence would not by itself be an error)")

    int8pass.save_pretrained(model, folder / "int8")  # transformers + bitsandbytes load this too (load_in_8bit)
    files = sorted(path.name for path in (folder / "int8").iterdir())
    reloaded = int8pass.from_pretrained(folder / "int8")
    with torch.no_grad():
        again = reloaded.generate(prompt, max_new_tokens=32, do_sample=False)
    print(f"\nsaved in the bitsandbytes layout: {', '.join(files)}")
    print(f"reloaded (eager) generates the same tokens as the compiled model: {torch.equal(again, tokens)}")


if __name__ == "__main__":
    main()
