"""llmint8::linear_group: several LLM.int8() linears of one activation, [y_i] = [llmint8::linear(x, W_i, ...)].

The FX pass writes it where linears share their input (an attention layer's q, k and v projections, an MLP's gate and
up projections: fx_pass.group_shared_inputs). Its value is each member's llmint8::linear, bit for bit; what it saves
is work done once per activation rather than once per weight. On a CPU with the int8pass kernel it decomposes to
llmint8::cpu_linear_group (cpu_linear.cpp): one call that finds the outlier columns and quantizes x once, then streams
the weights in one parallel loop, so a decode step pays one call's fixed costs (dispatch, waking the threads, the start
of each thread's stream) for the group rather than for each member. Elsewhere it decomposes to one llmint8::linear
path per member (linear.py), as if the linears had not been grouped.

bias and code_sums are empty or one per weight; a group never mixes members with and without them, and has no
outlier_weight (the pass leaves such linears alone). Like the linears it groups, it is written only where no gradient
flows through it (no input requires grad), so it has no autograd formula.
"""

from __future__ import annotations

import torch

from int8pass.lowering import cpu_linear, linear
from int8pass.lowering.checks import check_linear_group_args
from int8pass.lowering.inductor_api import uses_triton


@torch.library.custom_op("llmint8::linear_group", mutates_args=())
def linear_group(
    x: torch.Tensor,
    weight_q: list[torch.Tensor],
    weight_scale: list[torch.Tensor],
    bias: list[torch.Tensor],
    threshold: float,
    code_sums: list[torch.Tensor],
) -> list[torch.Tensor]:
    check_linear_group_args(x, weight_q, weight_scale, bias, code_sums)
    return [torch.ops.llmint8.linear(x, *member, threshold, None, sums)
            for member, sums in zip(members(weight_q, weight_scale, bias), _sums(code_sums, len(weight_q)))]


@linear_group.register_fake
def _(x, weight_q, weight_scale, bias, threshold, code_sums):
    check_linear_group_args(x, weight_q, weight_scale, bias, code_sums)
    return [x.new_empty((*x.shape[:-1], w.shape[0])) for w in weight_q]


def members(weight_q, weight_scale, bias):
    """(codes, scales, bias or None) of each member of a group (block_linear_group.py too)."""
    return zip(weight_q, weight_scale, bias if bias else [None] * len(weight_q))


def _sums(code_sums, count):
    return code_sums if code_sums else [None] * count


def decompose(x, weight_q, weight_scale, bias, threshold, code_sums):
    """llmint8::linear_group as the ops Inductor compiles for x's device (NotImplemented: keep the op)."""
    check_linear_group_args(x, weight_q, weight_scale, bias, code_sums)
    if x.device.type == "cpu" and not uses_triton(x.device) and all(cpu_linear.runs(x, w) for w in weight_q):
        return torch.ops.llmint8.cpu_linear_group(x, weight_q, weight_scale, bias, threshold, code_sums)
    outputs = [linear.decompose(x, *member, threshold, None, sums)
               for member, sums in zip(members(weight_q, weight_scale, bias), _sums(code_sums, len(weight_q)))]
    return NotImplemented if any(y is NotImplemented for y in outputs) else outputs


# Eager calls use the same kernels.
torch.library.register_kernel("llmint8::linear_group", "cpu", decompose)
