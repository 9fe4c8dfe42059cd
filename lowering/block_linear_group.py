"""llmint8::block_linear_group: several block-scaled linears of one activation,
[y_i] = [llmint8::block_linear(x, W_i, ...)].

The FX pass writes it where block-mode linears share their input (q, k and v; gate and up:
fx_pass.group_shared_inputs), as llmint8::linear_group for the default mode. Its value is each member's
llmint8::block_linear, bit for bit; on a CPU with the int8pass kernel it decomposes to llmint8::cpu_block_linear_group
(cpu_linear.cpp): one call that finds the outlier columns and quantizes x block by block once, then streams the weights
in one parallel loop. Elsewhere the op stays in the graph and runs each member's llmint8::block_linear.

bias is empty or one per weight. Like the linears it groups, it is written only where no gradient flows through it,
so it has no autograd formula.
"""

from __future__ import annotations

import torch

from int8pass.lowering import cpu_linear
from int8pass.lowering.block_linear import block_linear_on_cpu
from int8pass.lowering.checks import check_block_linear_group_args
from int8pass.lowering.linear_group import members


@torch.library.custom_op("llmint8::block_linear_group", mutates_args=())
def block_linear_group(
    x: torch.Tensor,
    weight_q: list[torch.Tensor],
    weight_scale: list[torch.Tensor],
    bias: list[torch.Tensor],
    block_size: int,
    threshold: float,
) -> list[torch.Tensor]:
    check_block_linear_group_args(x, weight_q, weight_scale, bias, block_size)
    return [torch.ops.llmint8.block_linear(x, w, s, b, block_size, threshold)
            for w, s, b in members(weight_q, weight_scale, bias)]


@block_linear_group.register_fake
def _(x, weight_q, weight_scale, bias, block_size, threshold):
    check_block_linear_group_args(x, weight_q, weight_scale, bias, block_size)
    return [x.new_empty((*x.shape[:-1], w.shape[0])) for w in weight_q]


def _runs_kernel(x, weight_q) -> bool:
    return all(cpu_linear.runs(x, w) for w in weight_q)


def block_linear_group_on_cpu(x, weight_q, weight_scale, bias, block_size, threshold):
    """llmint8::block_linear_group on CPU: one call of the C++ kernel where it runs, else each member's reference."""
    check_block_linear_group_args(x, weight_q, weight_scale, bias, block_size)
    if _runs_kernel(x, weight_q):
        return torch.ops.llmint8.cpu_block_linear_group(x, weight_q, weight_scale, bias, block_size, threshold)
    return [block_linear_on_cpu(x, w, s, b, block_size, threshold)
            for w, s, b in members(weight_q, weight_scale, bias)]


def decompose(x, weight_q, weight_scale, bias, block_size, threshold):
    """llmint8::block_linear_group as the CPU kernel's op where it runs (NotImplemented: keep the op)."""
    if _runs_kernel(x, weight_q):
        return torch.ops.llmint8.cpu_block_linear_group(x, weight_q, weight_scale, bias, block_size, threshold)
    return NotImplemented


torch.library.register_kernel("llmint8::block_linear_group", "cpu", block_linear_group_on_cpu)
