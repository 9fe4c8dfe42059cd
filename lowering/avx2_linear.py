"""llmint8::linear's CPU kernel on dense codes, for x86 CPUs with AVX2 whose oneDNN int8 GEMM is not exact in one
pass (no VNNI or AMX; see onednn_int8_mm.py): the whole linear in one C++ call (avx2_linear.cpp).

The call quantizes X (outlier columns, row scales, codes), runs the exact int8 GEMM, the outlier columns' fp32
product and the epilogue, a block of weight rows at a time, so the weight is streamed once and nothing [M, N] is
written but the output. The GEMM multiplies |W_q| by X_q carrying W_q's sign, so vpmaddubsw's int16 pairs never
saturate: exact in one pass, where oneDNN needs each activation row split in two. It reads the codes row-major as
the Int8Weight keeps them, so the outlier columns W_q[:, O] are a plain gather. In a compiled graph llmint8::linear
becomes llmint8::avx2_linear (linear.decompose), one extern call like an aten.mm in a bf16 graph: no Inductor kernels
to generate and compile for it.

The library is built with the system's C++ compiler the first time it is needed (about two seconds) into a cache
keyed by its source and flags (INT8PASS_CACHE_DIR, else ~/.cache/int8pass); without a compiler or AVX2, weights are
packed for oneDNN instead. It is linked with -fopenmp: libgomp.so.1 resolves to the copy torch has loaded, so its
threads are torch's own pool.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from int8pass import reference
from int8pass.lowering.checks import check_linear_args

log = logging.getLogger("int8pass")

SOURCE = Path(__file__).with_name("avx2_linear.cpp")
# -ffp-contract=off: the epilogue's multiplies and adds round one by one, as the reference's do
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC", "-std=c++17"]
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _cache_dir() -> Path:
    root = os.environ.get("INT8PASS_CACHE_DIR")
    return Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "int8pass"


@functools.cache
def _library():
    """The loaded library, or None (logged) where it cannot run: no AVX2, no compiler, a failed build."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        log.warning("llmint8: no C++ compiler found (set CXX): int8 weights are packed for oneDNN, whose int8 GEMM "
                    "runs each activation row twice on this CPU")
        return None
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *FLAGS]).encode()).hexdigest()[:16]
    path = _cache_dir() / f"avx2_linear-{digest}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as build:  # built aside, then moved: safe across processes
            built = Path(build) / path.name
            result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True, text=True)
            if result.returncode != 0:
                log.warning("llmint8: building the AVX2 int8 kernel failed; int8 weights are packed for oneDNN:\n%s",
                            result.stderr[-2000:])
                return None
            os.replace(built, path)
    library = ctypes.CDLL(str(path))  # ctypes releases the GIL during calls
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    library.int8pass_avx2_linear.argtypes = [pointer, ctypes.c_int, i64, i64, pointer, i64, pointer, pointer,
                                             ctypes.c_int, ctypes.c_float, pointer, pointer]
    library.int8pass_avx2_linear.restype = None
    library.int8pass_int8_mm.argtypes = [pointer, pointer, pointer, i64, i64, i64]
    library.int8pass_int8_mm.restype = None
    return library


@torch.compiler.assume_constant_result  # a constant of the machine, read while tracing
def available() -> bool:
    """Whether this CPU runs the kernel (builds it on first call)."""
    return _library() is not None


def runs(x: torch.Tensor, weight_q: torch.Tensor | None) -> bool:
    """Whether llmint8::linear of x with these codes runs here (dense codes on the CPU, a supported dtype)."""
    return (weight_q is not None and x.device.type == "cpu" and weight_q.device.type == "cpu" and x.dtype in DTYPES
            and available())


@torch.library.custom_op("llmint8::avx2_linear", mutates_args=())
def avx2_linear(
    x: torch.Tensor,
    weight_q: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: float,
    outlier_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """llmint8::linear (same arguments, dense codes) in one call of the C++ kernel."""
    check_linear_args(x, weight_q, weight_scale, bias)
    if not runs(x, weight_q):
        raise RuntimeError(f"llmint8::avx2_linear runs on x86 CPUs with AVX2 and a C++ compiler, for "
                           f"{', '.join(map(str, DTYPES))} activations; got {x.dtype} on {x.device}")
    return linear(x, weight_q, weight_scale, bias, threshold, outlier_weight)


@avx2_linear.register_fake
def _(x, weight_q, weight_scale, bias, threshold, outlier_weight=None):
    check_linear_args(x, weight_q, weight_scale, bias)
    return x.new_empty((*x.shape[:-1], weight_q.shape[0]))


def linear(x, weight_q, weight_scale, bias, threshold, outlier_weight=None) -> torch.Tensor:
    """reference.linear by the C++ kernel, arguments already checked (runs(x, weight_q) holds)."""
    n, k = weight_q.shape
    x2d = x.reshape(-1, k).contiguous()
    weight_q, weight_scale = weight_q.contiguous(), weight_scale.contiguous()  # held: the C++ reads their memory
    outlier_product = None
    if outlier_weight is not None:  # the outlier columns' product with the original weight, not with the codes
        indices, count = reference.compact_indices(reference.outlier_columns(x2d, threshold))
        outlier_product = reference.outlier_matmul(x2d, indices, count, outlier_weight, weight_scale).contiguous()
    if bias is not None:
        bias = (bias if bias.dtype in DTYPES else bias.float()).contiguous()
    y = torch.empty((x2d.shape[0], n), dtype=x.dtype)
    _library().int8pass_avx2_linear(
        x2d.data_ptr(), DTYPES[x.dtype], x2d.shape[0], k, weight_q.data_ptr(), n,
        weight_scale.data_ptr(), None if bias is None else bias.data_ptr(),
        DTYPES[bias.dtype] if bias is not None else 0, threshold,
        None if outlier_product is None else outlier_product.data_ptr(), y.data_ptr())
    return y.reshape(*x.shape[:-1], n)


def int8_mm(x_q: torch.Tensor, weight_q: torch.Tensor) -> torch.Tensor:
    """X_q . W_q^T as int32 [M, N], the GEMM inside `linear` alone (its accumulator, for the tests); X_q holds codes in
    [-127, 127]."""
    x_q, weight_q = x_q.contiguous(), weight_q.contiguous()
    acc = torch.empty((x_q.shape[0], weight_q.shape[0]), dtype=torch.int32)
    _library().int8pass_int8_mm(x_q.data_ptr(), weight_q.data_ptr(), acc.data_ptr(), x_q.shape[0], weight_q.shape[0],
                                x_q.shape[1])
    return acc
