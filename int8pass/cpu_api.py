"""The torch.cpu internals int8pass uses, in one place (checked against torch 2.11 and 2.13)."""

from __future__ import annotations

import torch


def has_amx() -> bool:
    """Whether this CPU has AMX tiles (and the OS lets this process use them)."""
    return bool(torch.cpu._is_amx_tile_supported())
