"""Every Triton kernel, eager and Inductor-generated, compiles for sm_80 and sm_90 (no GPU needed).

The interpreter (the other Triton tests) checks what the kernels compute; this checks that Triton's real
compiler accepts them and emits tensor-core instructions for the int8 GEMMs (tests/cuda_compile.py).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from torch._inductor.utils import run_and_get_code  # noqa: E402

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or "nvidia" not in __import__("triton.backends").backends.backends,
    reason="needs Triton's CUDA compiler; on a GPU machine the GPU tests run the kernels instead",
)


def generated_modules(tmp_path: Path) -> list[Path]:
    """The Triton modules Inductor writes for three llmint8 graphs: a linear with a fused epilogue (the
    two-step path), the same as a decode step (the single kernel, threshold 0), and a dynamic-M bias-free
    one with the original outlier weights."""
    torch.manual_seed(0)
    fused = torch.nn.Linear(256, 128).to(torch.bfloat16)
    plain = torch.nn.Linear(256, 96, bias=False).to(torch.float16)
    graphs = [
        (lambda x: torch.relu(fused(x)) + 1, torch.randn(40, 256, dtype=torch.bfloat16), {}, False),
        (lambda x: torch.relu(fused(x)) + 1, torch.randn(1, 256, dtype=torch.bfloat16), {"threshold": 0.0}, False),
        (plain, torch.randn(8, 256, dtype=torch.float16), {"outlier_weights": "original", "keep_fp_weights": True}, True),
    ]
    paths = []
    for fn, x, options, dynamic in graphs:
        torch._dynamo.reset()
        compiled = torch.compile(fn, backend="llmint8", dynamic=dynamic,
                                 options={"inductor": {"cpu_backend": "triton"}, **options})
        with torch.no_grad():
            _, (code,) = run_and_get_code(compiled, x)
        for name, source in re.findall(r"async_compile\.triton\('(\w+)', '''(.*?)'''", code, re.S):
            path = tmp_path / f"{name}_{len(paths)}.py"
            path.write_text(source)
            paths.append(path)
    return paths


def test_kernels_compile_for_sm80_and_sm90(tmp_path):
    paths = generated_modules(tmp_path)
    assert len(paths) == 3 and all("triton_tem_" in p.name for p in paths)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, "-m", "tests.cuda_compile", *map(str, paths)], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = [line for line in run.stdout.splitlines() if ": ok" in line]
    assert len(lines) == 2 * (6 + len(paths)), run.stdout
    gemms = [line for line in lines if "linear" in line or "triton_tem_" in line]
    assert all(int(line.rsplit(" ", 1)[1]) > 0 for line in gemms), run.stdout  # tensor cores, both targets
