"""A Hugging Face causal LM (GPT-2 architecture, built from a config: no model hub) compiled with llmint8,
then `model.generate()`: what was rewritten, how many graphs the growing sequence compiled, and the text
agreement with the bf16 model.

    .venv/bin/python examples/hf_generate.py      (after bash tools/dev.sh demo has set up .venv)
"""

import copy

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import int8pass


def main():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_embd=512, n_head=8, vocab_size=8000, n_positions=1024)
    model = GPT2LMHeadModel(config).eval().to(torch.bfloat16)
    reference = copy.deepcopy(model)
    prompt = torch.randint(0, 8000, (1, 16))

    # lm_head (tied to the embedding) stays bf16 by default, as in bitsandbytes; skip_modules=[] rewrites it
    model.forward = torch.compile(model.forward, backend="llmint8")
    int8pass.clear_reports()
    with torch.no_grad():
        tokens = model.generate(prompt, max_new_tokens=32, do_sample=False)
        expected = reference.generate(prompt, max_new_tokens=32, do_sample=False)

    print(int8pass.reports()[0].table())
    print(f"\ngraphs compiled while generating 32 tokens: {len(int8pass.reports())}")
    same = (tokens[0, 16:] == expected[0, 16:]).float().mean().item()
    print(f"greedy tokens identical to the bf16 model's: {same:.0%} "
          "(with random weights greedy choices can be near-ties: a divergence would not by itself be an error)")


if __name__ == "__main__":
    main()
