"""Compile Triton kernels for CUDA (sm_80 and sm_90) on a machine without a GPU.

Triton's compiler and the ptxas bundled with its wheel need no GPU, so CI checks that every kernel lowers to
GPU machine code, not only that it runs in the interpreter. Run as a script, outside the interpreter:
    python -m tests.cuda_compile [generated_kernel.py ...]
compiles lowering's eager kernels and each Inductor-generated kernel module given (tests/test_cuda_compile.py
writes them), printing one line per kernel and target with the number of tensor-core instructions.
"""

from __future__ import annotations

import importlib.util
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGETS = {"sm_80": GPUTarget("cuda", 80, 32), "sm_90": GPUTarget("cuda", 90, 32)}


def eager_kernels():
    """(name, jit function, {arg: type}, {constexpr arg: value}, options) for lowering's kernels, bf16 X."""
    from int8pass.lowering import triton_gemm, triton_quantize

    flags = {"x_ptr": "*bf16", "flags_ptr": "*i32", "M": "i32", "K": "i32", "stride_xm": "i32", "stride_xk": "i32",
             "limit": "fp32", "rows_per_program": "i32"}
    for atomic in (False, True):
        yield f"outlier_flags(atomic={atomic})", triton_quantize._outlier_flags_kernel, flags, {
            "ATOMIC": atomic, "BLOCK_M": 32, "BLOCK_K": 128}, {}
    rows = {"x_ptr": "*bf16", "flags_ptr": "*i32", "x_q_ptr": "*i8", "s_x_ptr": "*fp32", "indices_ptr": "*i32",
            "count_ptr": "*i32", "M": "i32", "K": "i32", "stride_xm": "i32", "stride_xk": "i32", "stride_qm": "i32",
            "stride_qk": "i32"}
    yield "quantize_rows", triton_quantize._quantize_rows_kernel, rows, {
        "BLOCK_M": triton_quantize.ROWS_BLOCK[0], "BLOCK_K": triton_quantize.ROWS_BLOCK[1],
        "COMPACT_BLOCK": triton_quantize.COMPACT_BLOCK}, {}
    gemm = {"x_q_ptr": "*i8", "w_q_ptr": "*i8", "y_ptr": "*bf16", "x_ptr": "*bf16", "s_x_ptr": "*fp32",
            "s_w_ptr": "*fp32", "outlier_w_ptr": "*i8", "bias_ptr": "*bf16", "indices_ptr": "*i32", "count_ptr": "*i32",
            **{name: "i32" for name in ("M", "N", "K", "stride_qm", "stride_qk", "stride_wn", "stride_wk", "stride_ym",
                                       "stride_yn", "stride_xm", "stride_xk", "stride_own", "stride_owk")}}
    fused = {"x_ptr": "*bf16", "w_q_ptr": "*i8", "outlier_w_ptr": "*i8", "s_w_ptr": "*fp32", "bias_ptr": "*bf16",
             "y_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32", "limit": "fp32",
             **{name: "i32" for name in ("stride_xm", "stride_xk", "stride_wn", "stride_wk", "stride_own", "stride_owk",
                                        "stride_ym", "stride_yn")}}
    config = triton_gemm.DECODE_CONFIG
    yield "fused_linear", triton_gemm._fused_linear_kernel, fused, {
        "OUTLIER_CODES": True, "HAS_BIAS": True,
        **{key: config[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K")},
    }, {"num_warps": config["num_warps"], "num_stages": config["num_stages"]}
    for label, config in (("decode", triton_gemm.DECODE_CONFIG), ("prefill", triton_gemm.PREFILL_CONFIG)):
        blocks = {key: config[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
        yield f"int8_linear({label})", triton_gemm._int8_linear_kernel, gemm, {
            "OUTLIER_CODES": True, "HAS_BIAS": True, **blocks,
        }, {"num_warps": config["num_warps"], "num_stages": config["num_stages"]}


def generated_kernels(paths):
    """Inductor-generated modules: each defines one kernel whose signature is in its triton_meta."""
    for path in paths:
        spec = importlib.util.spec_from_file_location(f"generated_{abs(hash(path))}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for name, value in vars(module).items():
            if name.startswith("triton_") and hasattr(value, "triton_meta"):
                launch = value.configs[0]
                options = {"num_warps": launch.num_warps, "num_stages": launch.num_stages}
                yield name, value.fn, dict(value.triton_meta["signature"]), {}, options


def compile_all(paths) -> bool:
    ok = True
    for name, fn, types, constexprs, options in (*eager_kernels(), *generated_kernels(paths)):
        signature = {arg: types.get(arg, "constexpr") for arg in fn.arg_names}
        for target_name, target in TARGETS.items():
            try:
                compiled = triton.compile(ASTSource(fn, signature, constexprs), target=target, options=options)
            except Exception as error:  # report every kernel, then fail
                print(f"{name} {target_name}: FAILED {type(error).__name__}: {error}")
                ok = False
                continue
            mma = len(re.findall(r"\b(?:mma|wgmma\.mma_async)\.", compiled.asm["ptx"]))
            print(f"{name} {target_name}: ok, tensor-core instructions: {mma}")
    return ok


if __name__ == "__main__":
    sys.exit(0 if compile_all(sys.argv[1:]) else 1)
