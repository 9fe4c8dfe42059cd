"""The tensor-subclass internals Int8Weight uses, in one place (checked against torch 2.11 and 2.13).

Wrapper subclasses in PyTorch (torchao's, DTensor) are written with these two; neither is public API.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map_only

# a subclass that handles everything in __torch_dispatch__ turns __torch_function__ off with this
disabled_torch_function = torch._C._disabled_torch_function_impl

__all__ = ["disabled_torch_function", "tree_map_only"]
