"""CPU attention in bf16 against the same call in float32 (what cpu_attention="auto" does on CPUs without AMX):
microseconds per F.scaled_dot_product_attention call on bf16 q, k, v, and per the float32 version with its casts
(q, k, v to float32, the result back to bf16), with each one's largest error against float64.

Shapes: a decode query (1 token) and a prefill (the prompt attending to itself, causal) of the two models of
benchmarks/llamacpp.py, grouped-query as they are: "small linears, large vocabulary" (5 heads x 128, 1 KV head) and
"llama" (16 heads x 128, 4 KV heads). The two calls take turns, ROUNDS rounds of REPEATS calls each; the ratio is
the median of each round's ratio. Prints a table, writes benchmarks/results/cpu_attention.{md,json}.

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


def seconds(call, args) -> float:
    start = time.perf_counter()
    for _ in range(REPEATS):
        call(*args)
    return (time.perf_counter() - start) / REPEATS


def main():
    torch.manual_seed(0)
    rows = []
    for model, (heads, kv_heads, dim) in MODELS.items():
        for queries, keys in CASES:
            q = torch.randn(1, heads, queries, dim).to(torch.bfloat16)
            k, v = (torch.randn(1, kv_heads, keys, dim).to(torch.bfloat16) for _ in range(2))
            args = (q, k, v, queries > 1)
            exact = bf16_call(q.double(), k.double(), v.double(), queries > 1)
            errors = {name: (call(*args).double() - exact).abs().max().item()
                      for name, call in (("bf16", bf16_call), ("float32", float32_call))}
            bf16_call(*args), float32_call(*args)  # warm-up
            times = {"bf16": [], "float32": []}
            for _ in range(ROUNDS):
                times["bf16"].append(seconds(bf16_call, args))
                times["float32"].append(seconds(float32_call, args))
            row = {"model": model, "queries": queries, "keys": keys,
                   "bf16_us": round(statistics.median(times["bf16"]) * 1e6, 1),
                   "float32_us": round(statistics.median(times["float32"]) * 1e6, 1),
                   "bf16_over_float32": round(statistics.median(b / f for b, f in zip(times["bf16"], times["float32"])), 2),
                   "bf16_max_error": errors["bf16"], "float32_max_error": errors["float32"]}
            rows.append(row)
            print(row, flush=True)
    machine = describe()
    lines = ["| model | queries x keys | bf16 us | float32 (with casts) us | bf16 / float32 | max error bf16 | "
             "max error float32 |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['queries']} x {r['keys']} | {r['bf16_us']} | {r['float32_us']} | "
              f"{r['bf16_over_float32']}x | {r['bf16_max_error']:.1e} | {r['float32_max_error']:.1e} |" for r in rows]
    caption = (f"F.scaled_dot_product_attention on bf16 CPU tensors, batch 1, {torch.get_num_threads()} threads: "
               f"PyTorch's bf16 kernel against the float32 call with its casts, medians of {ROUNDS} rounds of "
               f"{REPEATS} calls taking turns. {summary(machine)}")
    table = caption + "\n\n" + "\n".join(lines)
    print("\n" + table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cpu_attention.md").write_text(table + "\n")
    (RESULTS / "cpu_attention.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
