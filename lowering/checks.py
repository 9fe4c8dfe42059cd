"""Argument checks shared by every implementation of the llmint8 ops (eager, fake, device kernels), so each
rejects bad input with the same clear error."""

from __future__ import annotations

import torch

from int8pass.reference import BLOCK_SIZES, block_count


def check_2d(op: str, x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"llmint8::{op} expects a 2-D activation [M, K], got shape {tuple(x.shape)}")


def _check_operands(op: str, x, weight_q, bias) -> None:
    """The checks of x, the codes and the bias that llmint8::linear and llmint8::block_linear share."""
    if weight_q.dtype != torch.int8 or weight_q.dim() != 2:
        raise ValueError(f"llmint8::{op} expects an int8 [N, K] weight, got {weight_q.dtype} {tuple(weight_q.shape)}")
    n, k = weight_q.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"llmint8::{op}: activation shape {tuple(x.shape)} does not end in K={k}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"llmint8::{op} expects a floating-point activation, got {x.dtype}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"llmint8::{op} expects a bias of shape ({n},), got {tuple(bias.shape)}")


def check_linear_args(x, weight_q, weight_scale, bias, code_sums=None) -> None:
    """Clear errors for llmint8::linear arguments; every implementation of the op calls this."""
    _check_operands("linear", x, weight_q, bias)
    n = weight_q.shape[0]
    if weight_scale.shape != (n,) or weight_scale.dtype != torch.float32:
        raise ValueError(f"llmint8::linear expects an fp32 [{n}] weight scale, got {weight_scale.dtype} {tuple(weight_scale.shape)}")
    if code_sums is not None and (code_sums.shape != (n,) or code_sums.dtype != torch.int32):
        raise ValueError(f"llmint8::linear expects int32 [{n}] code sums, got {code_sums.dtype} {tuple(code_sums.shape)}")


def check_block_linear_args(x, weight_q, weight_scale, bias, block_size) -> None:
    """Clear errors for llmint8::block_linear arguments; every implementation of the op calls this."""
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"llmint8::block_linear: block_size must be one of {BLOCK_SIZES}, got {block_size}")
    _check_operands("block_linear", x, weight_q, bias)
    n, k = weight_q.shape
    blocks = block_count(k, block_size)
    if weight_scale.shape != (n, blocks) or weight_scale.dtype != torch.bfloat16:
        raise ValueError(f"llmint8::block_linear expects bf16 [{n}, {blocks}] block scales, got {weight_scale.dtype} "
                         f"{tuple(weight_scale.shape)}")


def _check_group_lengths(op: str, weight_q, weight_scale, **optional) -> None:
    """A group's lists: at least one weight, a scale for each, and each optional list empty or one per weight."""
    count = len(weight_q)
    if count == 0:
        raise ValueError(f"llmint8::{op} expects at least one weight")
    for name, values in (("weight_scale", weight_scale), *optional.items()):
        if len(values) != count and (name == "weight_scale" or values):
            raise ValueError(f"llmint8::{op}: {count} weights but {len(values)} {name} "
                             f"({'one per weight' if name == 'weight_scale' else 'none or one per weight'})")


def check_linear_group_args(x, weight_q, weight_scale, bias, code_sums) -> None:
    """Clear errors for llmint8::linear_group arguments: each member's as llmint8::linear's, and the lists' lengths."""
    _check_group_lengths("linear_group", weight_q, weight_scale, bias=bias, code_sums=code_sums)
    for i in range(len(weight_q)):
        check_linear_args(x, weight_q[i], weight_scale[i], bias[i] if bias else None,
                          code_sums[i] if code_sums else None)


def check_block_linear_group_args(x, weight_q, weight_scale, bias, block_size) -> None:
    """Clear errors for llmint8::block_linear_group arguments: each member's as llmint8::block_linear's, and the
    lists' lengths."""
    _check_group_lengths("block_linear_group", weight_q, weight_scale, bias=bias)
    for i in range(len(weight_q)):
        check_block_linear_args(x, weight_q[i], weight_scale[i], bias[i] if bias else None, block_size)
