"""llmint8::onednn_unpack(packed_handle, N, K): the dense int8 codes [N, K] of a weight packed for oneDNN.

For the paths that read dense codes (the Triton templates on CPU, eager reads of Int8Weight.codes).
"""

from __future__ import annotations

import torch

from int8pass.lowering.onednn_int8_mm import packed_by_handle


@torch.library.custom_op("llmint8::onednn_unpack", mutates_args=())
def onednn_unpack(packed_handle: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The dense int8 codes [N, K] of a weight packed for oneDNN (by its handle)."""
    return packed_by_handle(packed_handle).packed.to_dense().t().contiguous()


@onednn_unpack.register_fake
def _(packed_handle, out_features, in_features):
    return packed_handle.new_empty((out_features, in_features), dtype=torch.int8)
