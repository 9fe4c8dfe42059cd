"""CUDA path: llmint8::linear as Triton kernels, with no host synchronisation.

Activation quantization (lowering/triton_quantize.py) and the int8 GEMM whose epilogue adds the outlier
product by looping up to the count stored on the device (lowering/triton_gemm.py): safe under CUDA graphs.
Inductor calls this as the op's kernel; template lowerings that let Inductor fuse following pointwise ops
into the GEMM's epilogue are not built yet.
"""

from __future__ import annotations

import torch

from int8pass import ops, reference, stats
from lowering import triton_gemm


def linear(x, weight_q, weight_scale, bias, threshold, outlier_weight=None, stats_id=-1):
    ops.check_linear_args(x, weight_q, weight_scale, bias)
    if outlier_weight is not None:
        # outlier_weights="original" is not in the Triton epilogue: the reference math (syncs the host)
        return reference.linear(x, weight_q, weight_scale, bias, threshold, outlier_weight)
    # opt-in: one device-to-host copy of the outlier set per call
    stats.record_activation(stats_id, x.reshape(-1, weight_q.shape[1]), threshold)
    return triton_gemm.linear(x, weight_q, weight_scale, bias, threshold)


torch.library.register_kernel("llmint8::linear", "cuda", linear)
