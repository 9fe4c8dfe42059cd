"""llmint8::cpu_linear: the whole LLM.int8() linear on an x86-64 CPU in one call of a C++ kernel (and, from the same
library, llmint8::cpu_linear_group, the linears of one activation in one call (linear_group.py), llmint8::cpu_block_linear,
the block-scaled linear of docs/design.md §1b, llmint8::cpu_block_linear_group (block_linear_group.py), llmint8::cpu_decode_attention, decode attention on a
reduced-precision KV cache in float32 (int8pass/attention.py), and llmint8::cpu_fp_linear, the decode GEMV of the
linears a graph keeps in bf16/fp16 (int8pass/fx_pass.py)).

The op is registered in C++ (cpu_linear.cpp, TORCH_LIBRARY), so a compiled graph calls it through the dispatcher with
no Python in between, and an AOTInductor package runs it by loading the library alone; this module builds and loads
that library and gives the op its fake (shape) implementation for tracing. In a compiled graph llmint8::linear becomes
llmint8::cpu_linear (linear.decompose): one extern call, like an aten.mm in a bf16 graph.

The kernel (cpu_linear_kernels.h) quantizes X, runs the exact int8 GEMM on the dense row-major codes the Int8Weight
holds (bitsandbytes' layout; no packed copy), the outlier columns' fp32 product and the epilogue, a block of weight
rows at a time, so the weight is streamed once. It picks its GEMM by the CPU at run time: AMX, else AVX512-VNNI, else
AVX2 (`kernel_for`; INT8PASS_CPU_KERNEL=avx2|avx512_vnni caps the choice).

The library is built by torch.utils.cpp_extension the first time it is needed (about a minute: the torch headers),
into a cache keyed by a hash of its sources, flags and torch version (INT8PASS_CACHE_DIR, else ~/.cache/int8pass). It
needs AVX2 and a C++ compiler; without them CPU linears run the reference steps with torch._int_mm (linear.py), and
say so once in the log. It is built with -fopenmp: libgomp.so.1 resolves to the copy torch has loaded, so its threads
are torch's own pool (torch.set_num_threads applies).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

from int8pass.lowering.checks import (
    check_block_linear_args,
    check_block_linear_group_args,
    check_linear_args,
    check_linear_group_args,
)

log = logging.getLogger("int8pass")

SOURCES = [Path(__file__).with_name(name) for name in
           ("cpu_linear.cpp", "cpu_linear_kernels.h", "cpu_block_linear_kernels.h", "cpu_attention_kernels.h",
            "cpu_fp_linear_kernels.h")]
# -ffp-contract=off: the epilogue's multiplies and adds round one by one, as the reference's do. The AVX512 and AMX
# kernels are built for those by pragmas in their own regions and run only where the CPU has them.
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off"]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Rows up to which a linear kept in bf16/fp16 runs llmint8::cpu_fp_linear (decode: one pass over the weight for them
# all); beyond, PyTorch's GEMM, which reuses each weight load across many rows
FP_LINEAR_MAX_ROWS = 4
FP_LINEAR_DTYPES = (torch.bfloat16, torch.float16)


def cache_dir() -> Path:
    root = os.environ.get("INT8PASS_CACHE_DIR")
    return Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "int8pass"


def _why_not() -> str:
    """Why this machine cannot build and run the kernel, or ""."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"it is for x86-64 CPUs, this one is {platform.machine()}"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return "this CPU has no AVX2"
    if not (os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")):
        return "no C++ compiler was found (set CXX)"
    return ""


@functools.cache
def library_path() -> Path | None:
    """The built and loaded library (it registers llmint8::cpu_linear), or None (logged) where it cannot be."""
    from torch.utils import cpp_extension

    reason = _why_not()
    if reason:
        log.warning("llmint8: the CPU int8 kernel does not run here (%s): CPU linears use torch._int_mm", reason)
        return None
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in SOURCES)
                            + " ".join([*FLAGS, torch.__version__, os.environ.get("CXX", "")]).encode()).hexdigest()[:16]
    name = f"int8pass_cpu_linear_{digest}"
    build = cache_dir() / name
    build.mkdir(parents=True, exist_ok=True)
    # cpp_extension runs ninja from PATH; the `ninja` package puts it beside this Python
    os.environ["PATH"] = os.pathsep.join([os.environ.get("PATH", ""), str(Path(sys.executable).parent)])
    try:
        cpp_extension.load(name=name, sources=[str(SOURCES[0])], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                           build_directory=str(build), is_python_module=False)
    except Exception as error:  # noqa: BLE001  (any build failure: logged, and the reference path runs)
        log.warning("llmint8: building the CPU int8 kernel failed (%s: %s); CPU linears use torch._int_mm",
                    type(error).__name__, str(error)[-2000:])
        return None
    path = build / f"{name}.so"
    torch.library.register_fake("llmint8::cpu_linear")(_fake)
    torch.library.register_fake("llmint8::cpu_linear_group")(_fake_group)
    torch.library.register_fake("llmint8::cpu_block_linear")(_fake_block)
    torch.library.register_fake("llmint8::cpu_block_linear_group")(_fake_block_group)
    torch.library.register_fake("llmint8::cpu_decode_attention")(_fake_decode_attention)
    torch.library.register_fake("llmint8::cpu_fp_linear")(_fake_fp_linear)
    return path


def _fake(x, weight_q, weight_scale, bias, threshold, outlier_weight=None, code_sums=None):
    check_linear_args(x, weight_q, weight_scale, bias)
    return x.new_empty((*x.shape[:-1], weight_q.shape[0]))


def _fake_group(x, weight_q, weight_scale, bias, threshold, code_sums):
    check_linear_group_args(x, weight_q, weight_scale, bias, code_sums)
    return [x.new_empty((*x.shape[:-1], w.shape[0])) for w in weight_q]


def _fake_block(x, weight_q, weight_scale, bias, block_size, threshold):
    check_block_linear_args(x, weight_q, weight_scale, bias, block_size)
    return x.new_empty((*x.shape[:-1], weight_q.shape[0]))


def _fake_block_group(x, weight_q, weight_scale, bias, block_size, threshold):
    check_block_linear_group_args(x, weight_q, weight_scale, bias, block_size)
    return [x.new_empty((*x.shape[:-1], w.shape[0])) for w in weight_q]


def _fake_decode_attention(query, key, value, attn_mask, scale):
    torch._check(query.dim() == 4 and query.shape[2] == 1 and value.dim() == 4,
                 lambda: f"llmint8::cpu_decode_attention: query must be [B, H, 1, D], got {tuple(query.shape)}")
    return query.new_empty((*query.shape[:3], value.shape[3]))


def _fake_fp_linear(x, weight, bias):
    torch._check(weight.dim() == 2 and x.shape[-1] == weight.shape[1],
                 lambda: f"llmint8::cpu_fp_linear: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not fit")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.compiler.assume_constant_result  # a constant of the machine, read while tracing
def available() -> bool:
    """Whether this CPU runs the kernel (builds it on first call)."""
    return library_path() is not None


def runs(x: torch.Tensor, weight_q: torch.Tensor) -> bool:
    """Whether llmint8::linear of x with these codes runs the kernel here (CPU tensors, a supported dtype)."""
    return x.is_cpu and weight_q.is_cpu and x.dtype in DTYPES and available()


def kernel(rows: int, in_features: int) -> str:
    """The GEMM a call with this many activation rows runs here: "amx", "avx512_vnni" or "avx2"."""
    return torch.ops.llmint8.cpu_linear_kernel(rows, in_features)


KERNELS = ("avx2", "avx512_vnni", "amx")  # the GEMMs, slowest first


def kernels() -> list[str]:
    """Every GEMM this CPU runs (up to the INT8PASS_CPU_KERNEL cap), slowest first; each is a value the cap takes."""
    return list(KERNELS[: KERNELS.index(kernel(512, 4096)) + 1]) if available() else []
