"""llmint8::cpu_int8_mm: the CPU linear's products on dense codes, on x86 CPUs with AVX2 whose oneDNN int8 GEMM is
not exact in one pass (no VNNI or AMX; see onednn_int8_mm.py): X_q . W_q^T as int32 [M, N], and the outlier
columns' X[:, O] . W_q[:, O]^T as fp32 [M, N], in one pass over the weight.

The kernel (cpu_int8_mm.cpp) multiplies |W_q| by X_q carrying W_q's sign, so vpmaddubsw's int16 pairs never
saturate: exact in one pass, where oneDNN needs each activation row split in two. It reads the weight row-major as
the Int8Weight keeps it, so the outlier columns W_q[:, O] are a plain gather, and it runs decode (M = 1) at the
speed memory delivers the weight. It is built with the system's C++ compiler the first time it is needed (about a
second) into a cache keyed by its source; without a compiler or AVX2, weights are packed for oneDNN instead.
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

log = logging.getLogger("int8pass")

SOURCE = Path(__file__).with_name("cpu_int8_mm.cpp")
# -fopenmp: the library needs libgomp.so.1, which resolves to the copy torch has loaded, so its threads are torch's
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
X_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _cache_dir() -> Path:
    root = os.environ.get("INT8PASS_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "int8pass"
    return Path(root)


@functools.cache
def _kernel():
    """The loaded kernel function, or None (logged) where it cannot run: no AVX2, no compiler, a failed build."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        log.warning("llmint8: no C++ compiler found (set CXX): the CPU int8 GEMM falls back to oneDNN's split form")
        return None
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(FLAGS).encode()).hexdigest()[:16]
    library = _cache_dir() / f"cpu_int8_mm-{digest}.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=library.parent) as build:  # built aside, then moved: safe across processes
            built = Path(build) / library.name
            result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True, text=True)
            if result.returncode != 0:
                log.warning("llmint8: building the CPU int8 GEMM failed, falling back to oneDNN's split form:\n%s",
                            result.stderr[-2000:])
                return None
            os.replace(built, library)
    function = ctypes.CDLL(str(library)).int8pass_cpu_int8_mm  # ctypes releases the GIL during the call
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, *[ctypes.c_void_p] * 4, *[ctypes.c_int64] * 3]
    function.restype = ctypes.c_int
    return function


@torch.compiler.assume_constant_result  # a constant of the machine, read while tracing
def available() -> bool:
    """Whether this CPU runs llmint8::cpu_int8_mm (builds the kernel on first call)."""
    return _kernel() is not None


@torch.library.custom_op("llmint8::cpu_int8_mm", mutates_args=())
def cpu_int8_mm(
    x_q: torch.Tensor, x: torch.Tensor, is_outlier: torch.Tensor, weight_q: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(X_q . W_q^T as int32, X[:, O] . W_q[:, O]^T as fp32), both [M, N], for X_q int8 [M, K] holding codes in
    [-127, 127], X [M, K] (fp32, bf16 or fp16), O the columns where is_outlier (bool [K]) is set, W_q int8 [N, K]."""
    _check(x_q, x, is_outlier, weight_q)
    kernel = _kernel()
    if kernel is None or x.device.type != "cpu" or weight_q.device.type != "cpu":
        raise RuntimeError("llmint8::cpu_int8_mm runs on x86 CPUs with AVX2 and a C++ compiler only")
    x_q, x, is_outlier, weight_q = x_q.contiguous(), x.contiguous(), is_outlier.contiguous(), weight_q.contiguous()
    (m, k), n = x_q.shape, weight_q.shape[0]
    acc = torch.empty((m, n), dtype=torch.int32)
    outliers = torch.empty((m, n), dtype=torch.float32)
    status = kernel(x_q.data_ptr(), x.data_ptr(), X_DTYPES[x.dtype], is_outlier.data_ptr(), weight_q.data_ptr(),
                    acc.data_ptr(), outliers.data_ptr(), m, n, k)
    if status != 0:
        raise ValueError("llmint8::cpu_int8_mm: activation codes must lie in [-127, 127]; got -128")
    return acc, outliers


def _check(x_q, x, is_outlier, weight_q) -> None:
    m, k = x_q.shape if x_q.dim() == 2 else (-1, -1)
    if (x_q.dtype != torch.int8 or x.shape != x_q.shape or x.dtype not in X_DTYPES or weight_q.dtype != torch.int8
            or weight_q.dim() != 2 or weight_q.shape[1] != k or is_outlier.shape != (k,)
            or is_outlier.dtype != torch.bool):
        raise ValueError(
            "llmint8::cpu_int8_mm expects x_q int8 [M, K], x float32/bfloat16/float16 [M, K], is_outlier bool [K] and "
            f"weight_q int8 [N, K]; got {x_q.dtype} {tuple(x_q.shape)}, {x.dtype} {tuple(x.shape)}, "
            f"{is_outlier.dtype} {tuple(is_outlier.shape)}, {weight_q.dtype} {tuple(weight_q.shape)}")


@cpu_int8_mm.register_fake
def _(x_q, x, is_outlier, weight_q):
    _check(x_q, x, is_outlier, weight_q)
    shape = (x_q.shape[0], weight_q.shape[0])
    return x_q.new_empty(shape, dtype=torch.int32), x_q.new_empty(shape, dtype=torch.float32)
