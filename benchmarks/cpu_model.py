"""Model-level CPU benchmark: a Llama-architecture model (HF transformers, built from a config, random weights
with emergent features in 3 hidden dims) — prefill tokens/s, decode tokens/s, compile time and peak memory.

Two outlier regimes: "few" (large RMSNorm gains in 3 dims, compensated in the weights that read them: the q/k/v and
gate/up inputs carry 3 outlier columns, as in real models) and "many" (the same gains, uncompensated: they flood the
down projections' inputs with hundreds of outlier columns, the worst case for the outlier product).
Compile time is the first generate (prefill, then decode, which Dynamo recompiles with a dynamic length) minus a
warm one; "new length" is the extra time of the first prefill at another prompt length. Each variant runs in a
fresh Inductor cache, so its compiles are cold.

Variants: bf16 eager, bf16 torch.compile, llmint8, bitsandbytes Linear8bitLt (threshold 6), torchao int8
dynamic + torch.compile; output heads stay bf16 in every int8 variant. Each variant runs in its own process
so that its memory is its own: steady RSS (held after the runs, freed heap returned) and peak RSS (which
for the int8 variants includes the transient of quantizing while the bf16 weights still exist). Each variant's
last-token logits (a 32-token prefill and 2 decode steps) are compared with bf16 eager's on the same model: a variant
that computes something else shows a large error there, and its speed is not a valid comparison.
Prints a markdown table, writes benchmarks/results/cpu_model.{json,md}.

    bash tools/dev.sh bench-model
"""

from __future__ import annotations

import argparse
import json
import resource
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_mlp import rss_mib  # noqa: E402
from machine import describe, summary  # noqa: E402

VARIANTS = ["bf16 eager", "bf16 compile", "llmint8", "bitsandbytes int8 (t=6)", "torchao int8 dyn + compile"]
RESULTS = Path(__file__).parent / "results"
OUTLIER_DIMS = [17, 300, 1111]


def build_model(layers: int, outliers: str = "few"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=16,
                         num_key_value_heads=4, vocab_size=8000, max_position_embeddings=2048)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # emergent features: large norm gains in a few dims, small reading weights
            for norm, readers in ((layer.input_layernorm, (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)),
                                  (layer.post_attention_layernorm, (layer.mlp.gate_proj, layer.mlp.up_proj))):
                norm.weight[OUTLIER_DIMS] = 40.0 if outliers == "few" else 25.0
                for reader in readers if outliers == "few" else ():
                    reader.weight[:, OUTLIER_DIMS] /= 40.0
    return model.to(torch.bfloat16)


def bitsandbytes_int8(model, names: list[str], threshold: float = 6.0):
    """`model` with its linears `names` replaced by bitsandbytes' Linear8bitLt (LLM.int8(), eval) of their weights."""
    import logging

    import bitsandbytes as bnb

    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)  # its cast warning, once a call
    for name in names:
        linear = model.get_submodule(name)
        replacement = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                          has_fp16_weights=False, threshold=threshold)
        replacement.load_state_dict(linear.state_dict())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, replacement.eval())
    return model


def prepare(model, variant: str):
    """The model as the variant runs it (the forward to call)."""
    int8_linears = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    if variant == "bf16 eager":
        return model
    if variant == "bf16 compile":
        return torch.compile(model)
    if variant == "llmint8":
        return torch.compile(model, backend="llmint8")
    if variant == "bitsandbytes int8 (t=6)":
        return bitsandbytes_int8(model, [name for name, _ in int8_linears])
    if variant == "torchao int8 dyn + compile":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        quantize_(model, Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda m, name: name != "lm_head" and isinstance(m, torch.nn.Linear))
        return torch.compile(model)
    raise ValueError(variant)


def checked_logits(forward, prompt: int = 32, steps: int = 2):
    """Last-token logits of a prefill and of `steps` decode steps after it (fp32): what every variant must compute."""
    from transformers import DynamicCache

    ids = torch.randint(0, 8000, (1, prompt), generator=torch.Generator().manual_seed(1))
    cache = DynamicCache()
    logits = [forward(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1].float()]
    for step in range(steps):
        token = torch.tensor([[7 + step]])
        logits.append(forward(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1].float())
    return torch.cat(logits)


def run_variant(variant: str, layers: int, prompt: int, steps: int, outliers: str) -> dict:
    from transformers import DynamicCache

    model = build_model(layers, outliers)
    with torch.no_grad():
        expected = checked_logits(model)  # bf16 eager's, before the variant changes the model
    forward = prepare(model, variant)

    def generate(length=prompt):
        ids = torch.randint(0, 8000, (1, length), generator=torch.Generator().manual_seed(0))
        cache = DynamicCache()
        start = time.perf_counter()
        logits = forward(input_ids=ids, past_key_values=cache, use_cache=True).logits
        prefill = time.perf_counter() - start
        token = logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            token = forward(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        return prefill, time.perf_counter() - start

    with torch.no_grad():
        first = sum(generate())  # compiles (prefill, first decode shapes, dynamic decode)
        generate()
        runs = [generate() for _ in range(3)]
        new_length = generate(prompt + 7)[0]
        new_length_warm = min(generate(prompt + 7)[0] for _ in range(2))
        got = checked_logits(forward)
    prefill, decode = min(run[0] for run in runs), min(run[1] for run in runs)
    return {
        "variant": variant,
        "outliers": outliers,
        "prefill_tokens_per_s": round(prompt / prefill, 1),
        "decode_tokens_per_s": round(steps / decode, 2),
        "prefill_s": {"min": round(prefill, 4), "median": round(sorted(r[0] for r in runs)[1], 4), "max": round(max(r[0] for r in runs), 4)},
        "decode_s": {"min": round(decode, 4), "median": round(sorted(r[1] for r in runs)[1], 4), "max": round(max(r[1] for r in runs), 4)},
        # a variant whose compiled model computes something else is not a speed to compare
        "logits_rel_error_vs_bf16": round(((got - expected).norm() / expected.norm()).item(), 4),
        "compile_s": round(first - prefill - decode, 2),
        "new_length_compile_s": round(new_length - new_length_warm, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "steady_rss_mib": round(rss_mib(), 1),  # after the runs: what the process holds while serving
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant in this process and print its JSON")
    parser.add_argument("--outliers", choices=["few", "many"], default="few")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.layers, args.prompt, args.steps, args.outliers)))
        return
    runs = [(variant, "few") for variant in VARIANTS] + [(variant, "many") for variant in VARIANTS[:3]]
    rows = []
    for variant, outliers in runs:
        with tempfile.TemporaryDirectory() as cache:  # compiles are cold: a fresh Inductor cache per variant
            out = subprocess.run([sys.executable, __file__, "--variant", variant, "--outliers", outliers,
                                  "--layers", str(args.layers), "--prompt", str(args.prompt), "--steps", str(args.steps)],
                                 capture_output=True, text=True, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache})
        if out.returncode != 0:
            print(f"{variant} ({outliers} outliers) failed:\n{out.stderr[-1500:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    lines = ["| outliers | variant | prefill tokens/s | decode tokens/s | logits rel. error vs bf16 | compile s | "
             "new length s | steady RSS MiB | peak RSS MiB | prefill vs bf16 eager | decode vs bf16 eager |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        base = next(b for b in rows if b["variant"] == "bf16 eager" and b["outliers"] == row["outliers"])
        lines.append(f"| {row['outliers']} | {row['variant']} | {row['prefill_tokens_per_s']} | {row['decode_tokens_per_s']} | "
                     f"{row['logits_rel_error_vs_bf16']} | "
                     f"{row['compile_s']} | {row['new_length_compile_s']} | {row['steady_rss_mib']} | {row['peak_rss_mib']} | "
                     f"{row['prefill_tokens_per_s'] / base['prefill_tokens_per_s']:.2f}x | "
                     f"{row['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x |")
    machine = describe()
    caption = (f"Llama-architecture, d=2048, {args.layers} layers, ffn 5632, vocab 8000, bf16; prompt {args.prompt}, "
               f"{args.steps} decode steps, batch 1; best of 3 runs. {summary(machine)}")
    table = caption + "\n\n" + "\n".join(lines)
    print("\n" + table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cpu_model.md").write_text(table + "\n")
    (RESULTS / "cpu_model.json").write_text(json.dumps({"args": vars(args), "machine": machine, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
