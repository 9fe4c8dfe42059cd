"""llmint8::block_linear: the block-scaled int8 linear (docs/design.md §1b), x [..., K], int8 weight [N, K] and bf16
block scales [N, ceil(K / block_size)] -> [..., N] in x's dtype.

What the FX pass writes for an Int8Weight made with block_size. Its default implementation is the reference math;
`decompose` (in Inductor's decomposition table) replaces it while AOT autograd traces for Inductor: on CPUs with the
int8pass kernel, llmint8::cpu_block_linear (cpu_linear.py: one extern call of the C++ kernel,
cpu_block_linear_kernels.h). Elsewhere (other CPUs, GPUs) the op stays in the graph and runs the reference math: block
mode has no Triton kernel yet, and the log says so once.
"""

from __future__ import annotations

import functools
import logging

import torch

from int8pass import reference
from int8pass.lowering import cpu_linear
from int8pass.lowering.checks import check_block_linear_args
from int8pass.lowering.linear import register_input_and_bias_grads

log = logging.getLogger("int8pass")


@torch.library.custom_op("llmint8::block_linear", mutates_args=())
def block_linear(
    x: torch.Tensor,
    weight_q: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    block_size: int,
    threshold: float,
) -> torch.Tensor:
    check_block_linear_args(x, weight_q, weight_scale, bias, block_size)
    _log_reference_path(x.device.type)
    return reference.block_linear(x, weight_q, weight_scale, bias, block_size, threshold)


@block_linear.register_fake
def _(x, weight_q, weight_scale, bias, block_size, threshold):
    check_block_linear_args(x, weight_q, weight_scale, bias, block_size)
    return x.new_empty((*x.shape[:-1], weight_q.shape[0]))


@functools.cache
def _log_reference_path(device: str) -> None:
    log.warning("llmint8: block-scaled linears on %s run the reference math (no fast kernel for block mode there)",
                device)


def block_linear_on_cpu(x, weight_q, weight_scale, bias, block_size, threshold):
    """llmint8::block_linear on CPU: the C++ kernel where it runs, else the reference math."""
    check_block_linear_args(x, weight_q, weight_scale, bias, block_size)
    if cpu_linear.runs(x, weight_q):
        return torch.ops.llmint8.cpu_block_linear(x, weight_q, weight_scale, bias, block_size, threshold)
    _log_reference_path("cpu")
    return reference.block_linear(x, weight_q, weight_scale, bias, block_size, threshold)


def decompose(x, weight_q, weight_scale, bias, block_size, threshold):
    """llmint8::block_linear as the CPU kernel's op where it runs (NotImplemented: keep the op)."""
    if cpu_linear.runs(x, weight_q):
        return torch.ops.llmint8.cpu_block_linear(x, weight_q, weight_scale, bias, block_size, threshold)
    return NotImplemented


register_input_and_bias_grads(block_linear, lambda weight_q, weight_scale, block_size, _: reference.dequantize_blocks(
    weight_q, weight_scale, block_size))
torch.library.register_kernel("llmint8::block_linear", "cpu", block_linear_on_cpu)
