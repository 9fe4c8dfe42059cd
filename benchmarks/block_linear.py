"""Block mode's CPU linear against the default (LLM.int8()) on the same weights, in one run: the kernels as a
compiled graph calls them (llmint8::cpu_linear, llmint8::cpu_block_linear), bf16 activations with 0.5% outlier
columns (|x| 20-60, the rest N(0, 1)); the default at threshold 6 (as shipped) and 0, block mode at 32, 64 and 128
columns per scale at its default threshold 0; and both again on the AVX2 kernels (INT8PASS_CPU_KERNEL=avx2, what a
CPU without AVX512-VNNI runs), where this one has VNNI. Shapes: Llama-3.1-8B's (docs/design.md §4) and Gemma 3 270M's
small linears (d = 640, ffn 2048), where decode is bound by the kernel's work per byte rather than by memory.
Then the linears a layer computes from one input (q/k/v, gate/up of Llama-3.1-8B and Gemma 3 270M) as one group call
(llmint8::cpu_linear_group, llmint8::cpu_block_linear_group: x quantized once, one parallel loop) against one call
each, in both modes. On a CPU with AMX, block mode 32 also on its VNNI kernel (INT8PASS_CPU_KERNEL=avx512_vnni), what
it ran there before its AMX kernel. Each time is the median of repeats taking turns, so a burst of the host's noise
hits every variant alike. Prints a table and writes benchmarks/results/<name>.json (block_linear unless --name says).

    .venv/bin/python benchmarks/block_linear.py [--name block_linear_amx]
"""

from __future__ import annotations

import argparse
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

RESULTS = Path(__file__).parent / "results"
SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096), (2048, 640), (640, 2048)]
ROWS = [1, 4, 16, 128, 512]
# the members' out_features and their in_features: Llama-3.1-8B's q/k/v and gate/up, Gemma 3 270M's
GROUPS = {"llama q/k/v": ((4096, 1024, 1024), 4096), "llama gate/up": ((14336, 14336), 4096),
          "gemma q/k/v": ((1024, 256, 256), 640), "gemma gate/up": ((2048, 2048), 640)}
GROUP_ROWS = [1, 4, 16, 128]


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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="block_linear", help="the result file's name in benchmarks/results")
    results = RESULTS / f"{parser.parse_args().name}.json"
    if not cpu_linear.available():
        raise SystemExit("the int8pass CPU kernel does not run here")
    machine = describe()
    print(f"{summary(machine)}\nms per call (median); ratio = default (threshold 6) / block mode 32: above 1, block "
          "mode is faster\n")
    avx2 = "avx512_vnni" in cpu_linear.kernels()  # the AVX2 kernels, measured beside the VNNI ones
    amx = "amx" in cpu_linear.kernels()  # block mode's VNNI kernel, measured beside its AMX one
    print(f"  {'N x K':<12} {'M':>4} {'default t6':>11} {'default t0':>11} {'block 32':>9} {'block 64':>9} "
          f"{'block 128':>10} {'ratio 32':>9}" + (f" {'VNNI: block 32':>15}" if amx else "")
          + (f" {'AVX2: t6':>9} {'block 32':>9} {'ratio':>6}" if avx2 else ""))
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
            if amx:
                calls["vnni block 32"] = capped("avx512_vnni", calls["block 32"])
            if avx2:
                calls["avx2 default t6"] = capped("avx2", calls["default t6"])
                calls["avx2 block 32"] = capped("avx2", calls["block 32"])
            ms = {name: 1e3 * value for name, value in medians(calls).items()}
            row = {"n": n, "k": k, "m": m, "ms": {name: round(value, 4) for name, value in ms.items()},
                   "default_t6_over_block32": round(ms["default t6"] / ms["block 32"], 3)}
            line = (f"  {f'{n}x{k}':<12} {m:>4} {ms['default t6']:>11.3f} {ms['default t0']:>11.3f} "
                    f"{ms['block 32']:>9.3f} {ms['block 64']:>9.3f} {ms['block 128']:>10.3f} "
                    f"{row['default_t6_over_block32']:>9.2f}")
            if amx:
                line += f" {ms['vnni block 32']:>15.3f}"
            if avx2:
                row["avx2_default_t6_over_block32"] = round(ms["avx2 default t6"] / ms["avx2 block 32"], 3)
                line += f" {ms['avx2 default t6']:>9.3f} {ms['avx2 block 32']:>9.3f} {row['avx2_default_t6_over_block32']:>6.2f}"
            rows.append(row)
            print(line, flush=True)
    groups = measure_groups()
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"machine": machine, "rows": rows, "groups": groups}, indent=2) + "\n")
    print(f"\nwrote {results}")


def measure_groups() -> list[dict]:
    """Each group of GROUPS as one group call and as one call per member, default (threshold 6) and block mode 32."""
    print("\nlinears of one input: ms per group call against one call per member; ratio = separate / group\n")
    print(f"  {'group':<14} {'M':>4} {'default group':>14} {'separate':>9} {'ratio':>6} {'block 32 group':>15} "
          f"{'separate':>9} {'ratio':>6}")
    results = []
    for name, (outs, k) in GROUPS.items():
        weights = [torch.randn(n, k, generator=torch.Generator().manual_seed(n + k + i)) * 0.02
                   for i, n in enumerate(outs)]
        rowwise = [reference.quantize_weight(w) for w in weights]
        w_qs, s_ws = [w_q for w_q, _ in rowwise], [s_w for _, s_w in rowwise]
        sums = [code_sums(w_q) for w_q in w_qs]
        blockwise = [reference.quantize_weight_blocks(w, 32) for w in weights]
        b_qs, d_ws = [w_q for w_q, _ in blockwise], [d_w for _, d_w in blockwise]
        for m in GROUP_ROWS:
            x = activation(m, k)
            calls = {
                "default group": lambda: torch.ops.llmint8.cpu_linear_group(x, w_qs, s_ws, [], 6.0, sums),
                "default separate": lambda: [torch.ops.llmint8.cpu_linear(x, w_q, s_w, None, 6.0, code_sums=c)
                                             for w_q, s_w, c in zip(w_qs, s_ws, sums)],
                "block 32 group": lambda: torch.ops.llmint8.cpu_block_linear_group(x, b_qs, d_ws, [], 32, 0.0),
                "block 32 separate": lambda: [torch.ops.llmint8.cpu_block_linear(x, w_q, d_w, None, 32, 0.0)
                                              for w_q, d_w in zip(b_qs, d_ws)],
            }
            ms = {call: 1e3 * value for call, value in medians(calls).items()}
            row = {"group": name, "out_features": list(outs), "k": k, "m": m,
                   "ms": {call: round(value, 4) for call, value in ms.items()},
                   "default_separate_over_group": round(ms["default separate"] / ms["default group"], 3),
                   "block32_separate_over_group": round(ms["block 32 separate"] / ms["block 32 group"], 3)}
            results.append(row)
            print(f"  {name:<14} {m:>4} {ms['default group']:>14.3f} {ms['default separate']:>9.3f} "
                  f"{row['default_separate_over_group']:>6.2f} {ms['block 32 group']:>15.3f} "
                  f"{ms['block 32 separate']:>9.3f} {row['block32_separate_over_group']:>6.2f}", flush=True)
    return results


if __name__ == "__main__":
    main()
