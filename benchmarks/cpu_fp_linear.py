"""The linears a compiled graph keeps in bf16 (output heads) at decode on the CPU: llmint8::cpu_fp_linear, what
cpu_fp_linears="auto" runs, against F.linear, what "aten" leaves them to. Milliseconds per call and the weight's
read rate, beside an fp32 sum of the same bytes (the memory's read rate in the same rounds), and each one's largest
error against float64.

Shapes: the output heads of benchmarks/llamacpp.py's models and Gemma 3 270M (262144 x 640), Llama 2's (32000 x
2048) and Llama 3.2 1B's (128256 x 2048), at 1 row (decode) and 4 (the kernel's largest). The calls take turns,
ROUNDS rounds of REPEATS calls each; times are medians over all calls, the ratio the median of each round's ratio.
Prints a table, writes benchmarks/results/cpu_fp_linear.{md,json} (another name with --name).

    .venv/bin/python benchmarks/cpu_fp_linear.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe, summary  # noqa: E402

from int8pass.lowering import cpu_linear  # noqa: E402

RESULTS = Path(__file__).parent / "results"
ROUNDS, REPEATS = 5, 10
SHAPES = [(262144, 640), (32000, 2048), (128256, 2048)]  # N x K
ROWS = [1, cpu_linear.FP_LINEAR_MAX_ROWS]


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="cpu_fp_linear", help="the result files' name in benchmarks/results")
    args = parser.parse_args()
    if not cpu_linear.available():
        sys.exit("the int8pass CPU library does not run here (it needs an x86-64 CPU with AVX2 and a C++ compiler)")
    torch.manual_seed(0)
    rows = []
    with torch.no_grad():
        for n, k in SHAPES:
            weight = (torch.randn(n, k) * 0.02).to(torch.bfloat16)
            as_fp32 = weight.view(torch.float32)  # the same bytes, for the read rate
            for m in ROWS:
                x = torch.randn(m, k).to(torch.bfloat16)
                exact = x.double() @ weight.double().T
                calls = {"F.linear": lambda: F.linear(x, weight),
                         "kernel": lambda: torch.ops.llmint8.cpu_fp_linear(x, weight, None),
                         "fp32 sum": as_fp32.sum}
                errors = {name: ((calls[name]().double() - exact).abs().max().item()) for name in ("F.linear", "kernel")}
                times = {name: [] for name in calls}
                for _ in range(ROUNDS):
                    for name, fn in calls.items():
                        fn()
                        times[name].append(statistics.median(seconds(fn) for _ in range(REPEATS)))
                gb = weight.numel() * weight.element_size() / 1e9
                row = {"N": n, "K": k, "M": m,
                       **{f"{name} ms": round(statistics.median(t) * 1e3, 2) for name, t in times.items()},
                       **{f"{name} GB/s": round(gb / statistics.median(t), 1) for name, t in times.items()},
                       "F.linear / kernel": round(statistics.median(
                           a / b for a, b in zip(times["F.linear"], times["kernel"])), 2),
                       **{f"{name} max error": error for name, error in errors.items()}}
                rows.append(row)
                print(row, flush=True)
    machine = describe()
    lines = ["| N x K | M | F.linear ms | kernel ms | F.linear / kernel | F.linear GB/s | kernel GB/s | fp32 sum GB/s | "
             "max error F.linear | max error kernel |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['N']} x {r['K']} | {r['M']} | {r['F.linear ms']} | {r['kernel ms']} | {r['F.linear / kernel']}x | "
              f"{r['F.linear GB/s']} | {r['kernel GB/s']} | {r['fp32 sum GB/s']} | {r['F.linear max error']:.1e} | "
              f"{r['kernel max error']:.1e} |" for r in rows]
    caption = (f"bf16 linears without bias, {torch.get_num_threads()} threads: F.linear (PyTorch) and "
               f"llmint8::cpu_fp_linear, beside an fp32 sum of the weight's bytes; medians of {ROUNDS} rounds of "
               f"{REPEATS} calls taking turns. {summary(machine)}")
    table = caption + "\n\n" + "\n".join(lines)
    print("\n" + table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text(table + "\n")
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
