"""Model-level CPU benchmark: a Llama-architecture model (HF transformers, built from a config, random weights
with emergent features in 3 hidden dims) — prefill tokens/s, decode tokens/s and peak memory.

Variants: bf16 eager, bf16 torch.compile, llmint8, bitsandbytes Linear8bitLt (threshold 6), torchao int8
dynamic + torch.compile; output heads stay bf16 in every int8 variant. Each variant runs in its own process
so that its memory is its own: steady RSS (held after the runs, freed heap returned) and peak RSS (which
for the int8 variants includes the transient of quantizing while the bf16 weights still exist). Prints a markdown table, writes benchmarks/results/cpu_model.{json,md}.

    bash tools/dev.sh bench-model
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_mlp import rss_mib  # noqa: E402

VARIANTS = ["bf16 eager", "bf16 compile", "llmint8", "bitsandbytes int8 (t=6)", "torchao int8 dyn + compile"]
RESULTS = Path(__file__).parent / "results"
OUTLIER_DIMS = [17, 300, 1111]


def build_model(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=16,
                         num_key_value_heads=4, vocab_size=8000, max_position_embeddings=2048)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # emergent features: large norm gains in a few dims, small reading weights
            for norm, readers in ((layer.input_layernorm, (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)),
                                  (layer.post_attention_layernorm, (layer.mlp.gate_proj, layer.mlp.up_proj))):
                norm.weight[OUTLIER_DIMS] = 40.0
                for reader in readers:
                    reader.weight[:, OUTLIER_DIMS] /= 40.0
    return model.to(torch.bfloat16)


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
        import bitsandbytes as bnb

        for name, linear in int8_linears:
            replacement = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                              has_fp16_weights=False, threshold=6.0)
            replacement.load_state_dict(linear.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, replacement.eval())
        return model
    if variant == "torchao int8 dyn + compile":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        quantize_(model, Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda m, name: name != "lm_head" and isinstance(m, torch.nn.Linear))
        return torch.compile(model)
    raise ValueError(variant)


def run_variant(variant: str, layers: int, prompt: int, steps: int) -> dict:
    from transformers import DynamicCache

    model = build_model(layers)
    forward = prepare(model, variant)
    ids = torch.randint(0, 8000, (1, prompt), generator=torch.Generator().manual_seed(0))

    def generate():
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
        generate()  # compiles (prefill, first decode shapes, dynamic decode)
        generate()
        prefill, decode = min(generate() for _ in range(2))
    return {
        "variant": variant,
        "prefill_tokens_per_s": round(prompt / prefill, 1),
        "decode_tokens_per_s": round(steps / decode, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "steady_rss_mib": round(rss_mib(), 1),  # after the runs: what the process holds while serving
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant in this process and print its JSON")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.layers, args.prompt, args.steps)))
        return
    rows = []
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--layers", str(args.layers),
                              "--prompt", str(args.prompt), "--steps", str(args.steps)], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{variant} failed:\n{out.stderr[-1500:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    base = next(row for row in rows if row["variant"] == "bf16 eager")
    lines = ["| variant | prefill tokens/s | decode tokens/s | steady RSS MiB | peak RSS MiB | prefill vs bf16 eager | decode vs bf16 eager |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['variant']} | {row['prefill_tokens_per_s']} | {row['decode_tokens_per_s']} | "
                     f"{row['steady_rss_mib']} | {row['peak_rss_mib']} | "
                     f"{row['prefill_tokens_per_s'] / base['prefill_tokens_per_s']:.2f}x | "
                     f"{row['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x |")
    table = "\n".join(lines)
    print(f"\nLlama-architecture, d=2048, {args.layers} layers, ffn 5632, vocab 8000, bf16; prompt {args.prompt}, "
          f"{args.steps} decode steps, batch 1, {torch.get_num_threads()} threads\n\n{table}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cpu_model.md").write_text(table + "\n")
    (RESULTS / "cpu_model.json").write_text(json.dumps({"args": vars(args), "torch": torch.__version__, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
