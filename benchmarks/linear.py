"""Linear-level benchmark: llmint8 vs bf16 (eager and torch.compile) vs bitsandbytes and torchao.

Runs on CUDA when present (all docs/design.md §4 shapes, M = 1 ... 4096), else on CPU (the Llama-3.1-8B / OPT-6.7B
shapes a 2-core CPU runs in reasonable time, M = 1 ... 512). Activations with 0.5% outlier columns (|x| 20-60),
threshold 6, bf16. All ratios come from the same run. Peers run where installed: bitsandbytes Linear8bitLt
(threshold 6, eval) and torchao Int8DynamicActivationInt8WeightConfig compiled with Inductor (as torchao
recommends). On CPU it adds fp32 eager (MKL), the fast floating-point GEMM where a CPU has no bf16 dot product. On
CUDA it counts the kernels one llmint8 call launches (profiler). Each time is the median of repeats that stop once
two rounds agree (min and max go to the JSON, with the machine: CPU model and ISA flags, versions, threads). Prints
a markdown table and writes benchmarks/results/{cpu,cuda}_linear.{json,md,png}.

    bash tools/dev.sh bench-linear
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_mlp import activations, time_stats  # noqa: E402
from machine import describe, summary  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DESIGN_SHAPES = [(4096, 4096), (16384, 4096), (4096, 16384), (14336, 4096), (4096, 14336), (1024, 4096),
                 (8192, 8192), (28672, 8192), (8192, 28672), (9216, 9216), (36864, 9216)]
SHAPES = DESIGN_SHAPES if DEVICE == "cuda" else [(4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096)]
TOKENS = [1, 16, 128, 512, 2048, 4096] if DEVICE == "cuda" else [1, 16, 128, 512]
RESULTS = Path(__file__).parent / "results"


def synchronized(fn):
    """Time GPU work, not its launch."""
    if DEVICE != "cuda":
        return fn

    def run(x):
        out = fn(x)
        torch.cuda.synchronize()
        return out

    return run


def cuda_kernels_per_call(fn, x) -> int:
    """CUDA kernels (and memsets) one call launches, from the profiler: the fused-kernel count of a linear."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(x)
        torch.cuda.synchronize()
    return sum(1 for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA)


def peers(linear: torch.nn.Linear) -> dict:
    """name -> callable for each peer that is installed and runs here; failures are reported, not hidden."""
    built = {}
    try:
        import bitsandbytes as bnb

        module = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=True,
                                     has_fp16_weights=False, threshold=6.0)
        module.load_state_dict(linear.state_dict())
        built["bitsandbytes int8 (t=6)"] = module.eval().to(DEVICE)
    except Exception as error:  # noqa: BLE001  (any failure to build a peer is reported)
        print(f"bitsandbytes unavailable: {type(error).__name__}: {error}", file=sys.stderr)
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        module = copy.deepcopy(linear)
        quantize_(module, Int8DynamicActivationInt8WeightConfig())
        built["torchao int8 dyn + compile"] = torch.compile(module, dynamic=False)
    except Exception as error:  # noqa: BLE001
        print(f"torchao unavailable: {type(error).__name__}: {error}", file=sys.stderr)
    return built


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    # Every variant is an nn.Linear sharing one forward code object and dynamic=False recompiles per M: past
    # Dynamo's recompile limit it would silently run frames eagerly and time bf16 instead of the variant.
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 1024
    rows = []
    for n, k in SHAPES:
        torch._dynamo.reset()
        torch.manual_seed(0)
        linear = torch.nn.Linear(k, n).eval().to(DEVICE, torch.bfloat16)
        with torch.no_grad():
            variants = {
                "bf16 eager": linear,
                "bf16 compile": torch.compile(copy.deepcopy(linear), dynamic=False),
                "llmint8": torch.compile(copy.deepcopy(linear), backend="llmint8", dynamic=False),
                **peers(linear),
            }
            if DEVICE == "cpu":  # where the CPU has no bf16 dot product, fp32 (MKL) is the fast floating-point GEMM
                fp32 = copy.deepcopy(linear).float()
                variants["fp32 eager (x cast)"] = lambda x, fp32=fp32: fp32(x.float())
            for m in args.tokens:
                x = activations(m, k, torch.bfloat16, 0.005).to(DEVICE)
                row = {"N": n, "K": k, "M": m}
                for name, fn in variants.items():
                    try:
                        stats = time_stats(synchronized(fn), x, args.min_seconds)
                        row[name], row.setdefault("ms", {})[name] = stats["median"], stats
                    except Exception as error:  # noqa: BLE001  (a peer that fails at a shape is reported)
                        print(f"{name} failed at M={m} {n}x{k}: {type(error).__name__}: {error}", file=sys.stderr)
                if DEVICE == "cuda":
                    row["llmint8 kernels"] = cuda_kernels_per_call(variants["llmint8"], x)
                rows.append(row)
                print(" ".join(f"{key}={value}" for key, value in row.items() if key != "ms"), flush=True)

    names = [key for key in rows[0] if key not in ("N", "K", "M", "ms", "llmint8 kernels")]
    kernels = "llmint8 kernels" in rows[0]
    peer = "torchao int8 dyn + compile"
    machine = describe() if DEVICE == "cpu" else {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    header = ("| N x K | M | " + " | ".join(f"{name} ms" for name in names)
              + " | llmint8 vs bf16 eager | vs bf16 compile | vs torchao |" + (" vs fp32 |" if DEVICE == "cpu" else "")
              + (" llmint8 kernels/call |" if kernels else ""))
    lines = [header, "|" + "---|" * (header.count("|") - 1)]

    def ratio(row, name):
        return f"{row[name] / row['llmint8']:.2f}x" if name in row else "n/a"

    for row in rows:
        cells = [f"{row[name]:.3g}" if name in row else "n/a" for name in names]
        lines.append(f"| {row['N']} x {row['K']} | {row['M']} | " + " | ".join(cells)
                     + f" | {ratio(row, 'bf16 eager')} | {ratio(row, 'bf16 compile')} | {ratio(row, peer)} |"
                     + (f" {ratio(row, 'fp32 eager (x cast)')} |" if DEVICE == "cpu" else "")
                     + (f" {row['llmint8 kernels']} |" if kernels else ""))
    caption = (summary(machine) if DEVICE == "cpu" else f"{machine['device']}, torch {machine['torch']}") + \
        ". Medians of the per-call times, ms (min and max in the JSON); ratios from the same run."
    table = caption + "\n\n" + "\n".join(lines)
    print("\n" + table)
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / f"{DEVICE}_linear"
    stem.with_suffix(".md").write_text(table + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {stem}.md and .json")
    try:
        from plot import plot

        print(f"wrote {plot(stem.with_suffix('.json'), stem.with_suffix('.png'))}")
    except ImportError as error:
        print(f"no plot: {error}")


if __name__ == "__main__":
    main()
