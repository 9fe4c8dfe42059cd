"""The tensor-subclass internals Int8Weight uses, in one place (checked against torch 2.11 and 2.13).

Wrapper subclasses in PyTorch (torchao's, DTensor) are written with the first two; none of these is public API.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map_only

# a subclass that handles everything in __torch_dispatch__ turns __torch_function__ off with this
disabled_torch_function = torch._C._disabled_torch_function_impl


def no_dispatch_mode() -> bool:
    """Whether no TorchDispatchMode (fake tensors, proxy tracing, a counter) is on the stack: what an op called now
    reaches is its kernel."""
    return torch._C._len_torch_dispatch_stack() == 0


__all__ = ["disabled_torch_function", "no_dispatch_mode", "tree_map_only"]
