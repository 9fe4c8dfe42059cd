"""Where one compiled llmint8 linear's time goes on CPU (the AVX2 kernel): the compiled call, the custom op called
directly, the C++ call alone, and the int8 GEMM alone, for a bf16 4096 x 4096 linear at M = 1 and 512 (0.5% outlier
columns, threshold 6). Prints a table and writes benchmarks/results/cpu_linear_breakdown.json.

    .venv/bin/python benchmarks/linear_breakdown.py
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_mlp import activations, time_stats  # noqa: E402
from machine import describe  # noqa: E402

import int8pass  # noqa: E402, F401  (registers the backend's ops)
from int8pass import reference  # noqa: E402
from int8pass.lowering import avx2_linear  # noqa: E402


def main():
    if not avx2_linear.available():
        raise SystemExit("this CPU does not run the AVX2 kernel")
    n = k = 4096
    linear = torch.nn.Linear(k, n).eval().to(torch.bfloat16)
    compiled = torch.compile(copy.deepcopy(linear), backend="llmint8", dynamic=False)
    w_q, s_w = reference.quantize_weight(linear.weight)
    rows = []
    with torch.no_grad():
        for m in (1, 512):
            x = activations(m, k, torch.bfloat16, 0.005)
            x_q = reference.quantize_activation(x, 6.0)[0]
            row = {"M": m}
            for name, fn, arg in (
                ("compiled", compiled, x),
                ("custom op", lambda x: torch.ops.llmint8.avx2_linear(x, w_q, s_w, linear.bias, 6.0), x),
                ("C++ call", lambda x: avx2_linear.linear(x, w_q, s_w, linear.bias, 6.0), x),
                ("int8 GEMM alone", lambda x_q: avx2_linear.int8_mm(x_q, w_q), x_q),
            ):
                row[name] = time_stats(fn, arg, 1.0)
            rows.append(row)
            print(f"M={m}: " + ", ".join(f"{name} {stats['median']:.3f} ms" for name, stats in list(row.items())[1:]))
    out = Path(__file__).parent / "results" / "cpu_linear_breakdown.json"
    out.write_text(json.dumps({"machine": describe(), "shape": [n, k], "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
