"""Decode and prefill on a real pretrained LM, block mode against the default: Gemma 3 270M (examples/gemma3.py,
d=640, 18 layers, vocabulary 262144) in bf16, `model.forward` compiled with backend="llmint8", greedy generate()
of NEW tokens after a PROMPT-token prompt of real text, batch 1. Variants: the default (threshold 6) and block mode
(block_size 32), each with the output head in floating point (the default) and int8 (skip_modules=[]). Decode
tokens/s = (NEW - 1) / (time of generate(NEW) - time of generate(1)), best of 3 after a first generate that
compiles; the variants take turns. Prints a table and writes benchmarks/results/<name>.json (gemma_decode unless --name
says).

    .venv/bin/python benchmarks/gemma_decode.py [--name gemma_decode_amx]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples import gemma3  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe, summary  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PROMPT, NEW = 64, 33
VARIANTS = {
    "default (threshold 6)": {},
    "default, int8 head": {"skip_modules": []},
    "block mode 32": {"block_size": 32},
    "block mode 32, int8 head": {"block_size": 32, "skip_modules": []},
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="gemma_decode", help="the result file's name in benchmarks/results")
    results = RESULTS / f"{parser.parse_args().name}.json"
    if not gemma3.available():
        raise SystemExit(gemma3.PACKAGES)
    # four models share Gemma's forward: each keeps its own compiled prefill and decode graphs
    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 64)
    model, tokenizer = gemma3.load(torch.bfloat16)
    prompt = tokenizer(gemma3.terms_of_use(), return_tensors="pt")["input_ids"][:, :PROMPT]
    models = {}
    for name, options in VARIANTS.items():
        variant = copy.deepcopy(model)
        variant.forward = torch.compile(variant.forward, backend="llmint8", options=options)
        models[name] = variant

    def generate(variant, new):
        start = time.perf_counter()
        with torch.no_grad():
            tokens = variant.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        return time.perf_counter() - start, tokens

    first, outputs = {}, {}
    for name, variant in models.items():
        first[name], outputs[name] = generate(variant, NEW)
        generate(variant, 1)
    times = {name: {"prefill": [], "all": []} for name in models}
    for _ in range(3):
        for name, variant in models.items():
            times[name]["prefill"].append(generate(variant, 1)[0])
            times[name]["all"].append(generate(variant, NEW)[0])
    machine = describe()
    print(f"Gemma 3 270M, bf16, {PROMPT}-token prompt, {NEW} new tokens, batch 1. {summary(machine)}\n")
    print(f"  {'variant':<28} {'prefill tok/s':>14} {'decode tok/s':>13} {'first generate s':>17} {'same tokens as default':>23}")
    rows = {}
    for name in models:
        prefill, total = min(times[name]["prefill"]), min(times[name]["all"])
        rows[name] = {"prefill_tokens_per_s": round(PROMPT / prefill, 1),
                      "decode_tokens_per_s": round((NEW - 1) / (total - prefill), 2),
                      "first_generate_s": round(first[name], 1),
                      "same_tokens_as_default": bool(torch.equal(outputs[name], outputs["default (threshold 6)"]))}
        row = rows[name]
        print(f"  {name:<28} {row['prefill_tokens_per_s']:>14} {row['decode_tokens_per_s']:>13} "
              f"{row['first_generate_s']:>17} {str(row['same_tokens_as_default']):>23}", flush=True)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"machine": machine, "prompt": PROMPT, "new_tokens": NEW, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {results}")


if __name__ == "__main__":
    main()
