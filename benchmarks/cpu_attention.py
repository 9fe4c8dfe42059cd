"""CPU attention in bf16 against what cpu_attention="auto" runs on CPUs without AMX: microseconds per
F.scaled_dot_product_attention call on bf16 q, k, v; per the float32 version with its casts (q, k, v to float32, the
result back to bf16: prefills and masked calls); and, for one query token, per llmint8::cpu_decode_attention (what
decode calls run), with each one's largest error against float64.

Shapes: a decode query (1 token) and a prefill (the prompt attending to itself, causal) of the two models of
benchmarks/llamacpp.py, grouped-query as they are: "small linears, large vocabulary" (5 heads x 128, 1 KV head) and
"llama" (16 heads x 128, 4 KV heads). The calls take turns, ROUNDS rounds of REPEATS calls each; the ratios are
the medians of each round's ratios. Prints a table, writes benchmarks/results/cpu_attention.{md,json}.

    bash tools/dev.sh bench-attention
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe, summary  # noqa: E402

RESULTS = Path(__file__).parent / "results"
ROUNDS, REPEATS = 7, 30
MODELS = {"small linears, large vocabulary": (5, 1, 128), "llama": (16, 4, 128)}  # heads, KV heads, head dim
CASES = [(1, 128), (1, 1024), (1, 4096), (64, 64), (512, 512)]  # (queries, keys)


def bf16_call(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


def float32_call(q, k, v, causal):
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal,
                                          enable_gqa=True).to(q.dtype)


def kernel_call(q, k, v, causal):
    return torch.ops.llmint8.cpu_decode_attention(q, k, v, None, q.shape[-1] ** -0.5)


def seconds(call, args) -> float:
    start = time.perf_counter()
    for _ in range(REPEATS):
        call(*args)
    return (time.perf_counter() - start) / REPEATS


def main():
    from int8pass.lowering import cpu_linear

    has_kernel = cpu_linear.available()
    torch.manual_seed(0)
    rows = []
    for model, (heads, kv_heads, dim) in MODELS.items():
        for queries, keys in CASES:
            q = torch.randn(1, heads, queries, dim).to(torch.bfloat16)
            k, v = (torch.randn(1, kv_heads, keys, dim).to(torch.bfloat16) for _ in range(2))
            args = (q, k, v, queries > 1)
            exact = bf16_call(q.double(), k.double(), v.double(), queries > 1)
            calls = {"bf16": bf16_call, "float32": float32_call}
            if queries == 1 and has_kernel:
                calls["kernel"] = kernel_call
            errors = {name: (call(*args).double() - exact).abs().max().item() for name, call in calls.items()}
            times = {name: [] for name in calls}
            for call in calls.values():
                call(*args)  # warm-up
            for _ in range(ROUNDS):
                for name, call in calls.items():
                    times[name].append(seconds(call, args))
            row = {"model": model, "queries": queries, "keys": keys}
            for name in calls:
                row[f"{name}_us"] = round(statistics.median(times[name]) * 1e6, 1)
            row["bf16_over_float32"] = round(statistics.median(b / f for b, f in zip(times["bf16"], times["float32"])), 2)
            if "kernel" in calls:
                for name in ("bf16", "float32"):
                    row[f"{name}_over_kernel"] = round(statistics.median(
                        t / k for t, k in zip(times[name], times["kernel"])), 2)
            row.update({f"{name}_max_error": error for name, error in errors.items()})
            rows.append(row)
            print(row, flush=True)
    machine = describe()
    lines = ["| model | queries x keys | bf16 us | float32 (with casts) us | llmint8::cpu_decode_attention us | "
             "bf16 / float32 | float32 / kernel | bf16 / kernel | max error bf16 | max error float32 | "
             "max error kernel |", "|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(row, key, fmt="{}"):
        return fmt.format(row[key]) if key in row else ""

    lines += [f"| {r['model']} | {r['queries']} x {r['keys']} | {r['bf16_us']} | {r['float32_us']} | "
              f"{cell(r, 'kernel_us')} | {r['bf16_over_float32']}x | {cell(r, 'float32_over_kernel', '{}x')} | "
              f"{cell(r, 'bf16_over_kernel', '{}x')} | {r['bf16_max_error']:.1e} | {r['float32_max_error']:.1e} | "
              f"{cell(r, 'kernel_max_error', '{:.1e}')} |" for r in rows]
    caption = (f"F.scaled_dot_product_attention on bf16 CPU tensors, batch 1, {torch.get_num_threads()} threads: "
               f"PyTorch's bf16 kernel, the float32 call with its casts and (one query token) "
               f"llmint8::cpu_decode_attention, medians of {ROUNDS} rounds of {REPEATS} calls taking turns. "
               f"{summary(machine)}")
    table = caption + "\n\n" + "\n".join(lines)
    print("\n" + table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cpu_attention.md").write_text(table + "\n")
    (RESULTS / "cpu_attention.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
