"""Where one compiled llmint8 linear's time goes on CPU: the compiled call (Dynamo's guards, Inductor's wrapper and the
kernel), llmint8::cpu_linear called directly (the dispatcher and the kernel), and the same call with threshold 0 (no
outlier product), with every GEMM kernel this CPU has, for a bf16 4096 x 4096 linear at M = 1 and 512 (0.5% outlier
columns, threshold 6). Prints a table and writes benchmarks/results/cpu_linear_breakdown.json.

    .venv/bin/python benchmarks/linear_breakdown.py
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_mlp import activations, time_stats  # noqa: E402
from machine import describe  # noqa: E402

import int8pass  # noqa: E402, F401  (registers the backend's ops)
from int8pass import reference  # noqa: E402
from int8pass.int8_weight import code_sums  # noqa: E402
from int8pass.lowering import cpu_linear  # noqa: E402


def main():
    if not cpu_linear.available():
        raise SystemExit("this CPU does not run the int8pass CPU kernel")
    n = k = 4096
    linear = torch.nn.Linear(k, n).eval().to(torch.bfloat16)
    compiled = torch.compile(copy.deepcopy(linear), backend="llmint8", dynamic=False)
    w_q, s_w = reference.quantize_weight(linear.weight)
    sums = code_sums(w_q)  # as an Int8Weight keeps them
    rows = []
    with torch.no_grad():
        for kernel in cpu_linear.kernels():
            os.environ["INT8PASS_CPU_KERNEL"] = kernel  # read by the kernel at every call
            for m in (1, 512):
                x = activations(m, k, torch.bfloat16, 0.005)
                row = {"kernel": cpu_linear.kernel(m, k), "M": m}
                for name, fn in (
                    ("compiled", compiled),
                    ("op", lambda x: torch.ops.llmint8.cpu_linear(x, w_q, s_w, linear.bias, 6.0, code_sums=sums)),
                    ("op, threshold 0", lambda x: torch.ops.llmint8.cpu_linear(x, w_q, s_w, linear.bias, 0.0, code_sums=sums)),
                ):
                    row[name] = time_stats(fn, x, 1.0)
                rows.append(row)
                print(f"{row['kernel']} M={m}: "
                      + ", ".join(f"{name} {row[name]['median']:.3f} ms" for name in ("compiled", "op", "op, threshold 0")),
                      flush=True)
    del os.environ["INT8PASS_CPU_KERNEL"]
    out = Path(__file__).parent / "results" / "cpu_linear_breakdown.json"
    out.write_text(json.dumps({"machine": describe(), "shape": [n, k], "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
