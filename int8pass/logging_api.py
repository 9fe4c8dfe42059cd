"""The torch._logging internals int8pass uses, in one place (checked against torch 2.11 and 2.13)."""

from __future__ import annotations

import os


def register_with_torch_logs(name: str) -> None:
    """Let TORCH_LOGS="<name>" (or "+<name>" for debug) turn the logger `name` on, like torch.compile's own."""
    try:
        from torch._logging._internal import _init_logs, register_log
    except ImportError:  # a torch without this private API: plain `logging` configuration still works
        return
    register_log(name, name)
    if name in os.environ.get("TORCH_LOGS", ""):
        _init_logs()  # TORCH_LOGS was parsed when torch was imported, before this name existed
