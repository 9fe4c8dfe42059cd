"""Argument checks shared by every implementation of the llmint8 ops (eager, fake, device kernels), so each
rejects bad input with the same clear error."""

from __future__ import annotations

import torch


def check_2d(op: str, x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"llmint8::{op} expects a 2-D activation [M, K], got shape {tuple(x.shape)}")


def check_linear_args(x, weight_q, weight_scale, bias) -> None:
    """Clear errors for llmint8::linear arguments; every implementation of the op calls this."""
    if weight_q.dtype != torch.int8 or weight_q.dim() != 2:
        raise ValueError(f"llmint8::linear expects an int8 [N, K] weight, got {weight_q.dtype} {tuple(weight_q.shape)}")
    n, k = weight_q.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"llmint8::linear: activation shape {tuple(x.shape)} does not end in K={k}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"llmint8::linear expects a floating-point activation, got {x.dtype}")
    if weight_scale.shape != (n,) or weight_scale.dtype != torch.float32:
        raise ValueError(f"llmint8::linear expects an fp32 [{n}] weight scale, got {weight_scale.dtype} {tuple(weight_scale.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"llmint8::linear expects a bias of shape ({n},), got {tuple(bias.shape)}")
