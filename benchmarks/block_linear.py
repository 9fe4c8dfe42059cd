"""Block mode's CPU linear against the default (LLM.int8()) on the same weights, in one run: the kernels as a
compiled graph calls them (llmint8::cpu_linear, llmint8::cpu_block_linear), bf16 activations with 0.5% outlier
columns (|x| 20-60, the rest N(0, 1)); the default at threshold 6 (as shipped) and 0, block mode at 32, 64 and 128
columns per scale at its default threshold 0; and both again on the AVX2 kernels (INT8PASS_CPU_KERNEL=avx2, what a
CPU without AVX512-VNNI runs), where this one has VNNI. Shapes: Llama-3.1-8B's (docs/design.md §4) and Gemma 3 270M's
small linears (d = 640, ffn 2048), where decode is bound by the kernel's work per byte rather than by memory.
Each time is the median of repeats taking turns, so a burst of the host's noise hits every variant alike. Prints a
table and writes benchmarks/results/block_linear.json.

    .venv/bin/python benchmarks/block_linear.py
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from int8pass import reference  # noqa: E402
from int8pass.int8_weight import code_sums  # noqa: E402
from int8pass.lowering import cpu_linear  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe, summary  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "block_linear.json"
SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096), (2048, 640), (640, 2048)]
ROWS = [1, 4, 16, 128, 512]


def activation(m: int, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(m * 7 + k)
    x = torch.randn(m, k, generator=g)
    cols = torch.randperm(k, generator=g)[: max(1, k // 200)]
    x[:, cols] = (torch.rand(m, len(cols), generator=g) * 40 + 20) * torch.sign(torch.randn(m, len(cols), generator=g))
    return x.to(torch.bfloat16)


def capped(kernel: str, call):
    """call, run with the CPU kernels capped at `kernel` (INT8PASS_CPU_KERNEL is read at every call)."""

    def run():
        os.environ["INT8PASS_CPU_KERNEL"] = kernel
        try:
            return call()
        finally:
            del os.environ["INT8PASS_CPU_KERNEL"]

    return run


def medians(calls: dict, budget_s: float = 1.5) -> dict:
    """Median seconds of each call, the calls taking turns until about budget_s in all has passed."""
    for call in calls.values():
        call()
    start = time.perf_counter()
    call()
    rounds = max(5, min(200, int(budget_s / max(time.perf_counter() - start, 1e-6) / len(calls))))
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            begin = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - begin)
    return {name: statistics.median(values) for name, values in times.items()}


def main():
    if not cpu_linear.available():
        raise SystemExit("the int8pass CPU kernel does not run here")
    machine = describe()
    print(f"{summary(machine)}\nms per call (median); ratio = default (threshold 6) / block mode 32: above 1, block "
          "mode is faster\n")
    avx2 = "avx512_vnni" in cpu_linear.kernels()  # the AVX2 kernels, measured beside the VNNI ones
    print(f"  {'N x K':<12} {'M':>4} {'default t6':>11} {'default t0':>11} {'block 32':>9} {'block 64':>9} "
          f"{'block 128':>10} {'ratio 32':>9}" + (f" {'AVX2: t6':>9} {'block 32':>9} {'ratio':>6}" if avx2 else ""))
    rows = []
    for n, k in SHAPES:
        weight = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)) * 0.02
        w_q, s_w = reference.quantize_weight(weight)
        sums = code_sums(w_q)  # as an Int8Weight keeps them
        blocks = {size: reference.quantize_weight_blocks(weight, size) for size in reference.BLOCK_SIZES}
        for m in ROWS:
            x = activation(m, k)
            calls = {
                "default t6": lambda: torch.ops.llmint8.cpu_linear(x, w_q, s_w, None, 6.0, code_sums=sums),
                "default t0": lambda: torch.ops.llmint8.cpu_linear(x, w_q, s_w, None, 0.0, code_sums=sums),
                **{f"block {size}": (lambda size=size: torch.ops.llmint8.cpu_block_linear(
                    x, blocks[size][0], blocks[size][1], None, size, 0.0)) for size in reference.BLOCK_SIZES},
            }
            if avx2:
                calls["avx2 default t6"] = capped("avx2", calls["default t6"])
                calls["avx2 block 32"] = capped("avx2", calls["block 32"])
            ms = {name: 1e3 * value for name, value in medians(calls).items()}
            row = {"n": n, "k": k, "m": m, "ms": {name: round(value, 4) for name, value in ms.items()},
                   "default_t6_over_block32": round(ms["default t6"] / ms["block 32"], 3)}
            line = (f"  {f'{n}x{k}':<12} {m:>4} {ms['default t6']:>11.3f} {ms['default t0']:>11.3f} "
                    f"{ms['block 32']:>9.3f} {ms['block 64']:>9.3f} {ms['block 128']:>10.3f} "
                    f"{row['default_t6_over_block32']:>9.2f}")
            if avx2:
                row["avx2_default_t6_over_block32"] = round(ms["avx2 default t6"] / ms["avx2 block 32"], 3)
                line += f" {ms['avx2 default t6']:>9.3f} {ms['avx2 block 32']:>9.3f} {row['avx2_default_t6_over_block32']:>6.2f}"
            rows.append(row)
            print(line, flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
