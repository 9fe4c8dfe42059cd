"""The tensor-subclass internals Int8Weight uses, in one place (checked against torch 2.11 and 2.13).

Wrapper subclasses in PyTorch (torchao's, DTensor) are written with the first two; none of these is public API.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map_only


def torch_function_off(func, args, kwargs):
    """func called as if the subclass had no __torch_function__ (what torch._C._disabled_torch_function_impl does, in
    a form Dynamo traces): its aten ops then reach __torch_dispatch__."""
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **(kwargs or {}))


def no_dispatch_mode() -> bool:
    """Whether no TorchDispatchMode (fake tensors, proxy tracing, a counter) is on the stack: what an op called now
    reaches is its kernel."""
    return torch._C._len_torch_dispatch_stack() == 0


def eager_call() -> bool:
    """Whether a call now runs eagerly: not compiled or exported, and no dispatch or torch-function mode on."""
    return (not torch.compiler.is_compiling() and no_dispatch_mode()
            and not torch._C._is_torch_function_mode_enabled())


__all__ = ["eager_call", "no_dispatch_mode", "torch_function_off", "tree_map_only"]
