"""llmint8::record_outliers(x, threshold, layer): record X's outlier columns for `layer` (int8pass.stats).

The node the FX pass adds before each rewritten linear when options={"stats": True}; no kernel schema carries
anything for statistics. A host sync on GPUs; its only effect is the record, so it is marked side-effecting (kept by
dead-code elimination).
"""

from __future__ import annotations

import torch

from int8pass import stats


@torch.library.custom_op("llmint8::record_outliers", mutates_args=())
def record_outliers(x: torch.Tensor, threshold: float, layer: str) -> None:
    """Record X's outlier columns for `layer` (int8pass.stats)."""
    stats.record(layer, x, threshold)


@record_outliers.register_fake
def _(x, threshold, layer):
    return None


torch.fx.node.has_side_effect(torch.ops.llmint8.record_outliers.default)
