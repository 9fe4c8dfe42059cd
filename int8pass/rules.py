"""What is rewritten to int8 and what is kept: the rules every entry point applies.

The FX pass (torch.compile), `quantize_` and `from_pretrained` each call these functions, so the three cannot drift:
- `linear_weight_orientation`: which modules are linear layers, and how their weight is stored;
- `weight_skip_reason`: whether a linear's weight stays in floating point, and why;
- `keeps_original`: whether an Int8Weight keeps the floating-point weight beside its codes;
- `new_weight_threshold`, `new_weight_block_size`: the outlier threshold and the scale granularity a newly quantized
  weight carries.
Checks that only a graph can make (is the weight a constant, does grad mode need it, do the activation's dtype and
the bias fit) stay in the FX pass, which applies these rules too.
"""

from __future__ import annotations

import torch

from int8pass.int8_weight import Int8Weight, all_finite
from int8pass.options import BLOCK_DEFAULT_THRESHOLD, DEFAULT_THRESHOLD, Options
from int8pass.reference import MAX_EXACT_K


def linear_weight_orientation(module: torch.nn.Module) -> bool | None:
    """For a linear layer: whether its weight is stored [in, out] (GPT-2's Conv1D) rather than [out, in]
    (nn.Linear). None for other modules."""
    if isinstance(module, torch.nn.Linear):
        return False
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers.pytorch_utils.Conv1D
        return True
    return None


def weight_skip_reason(name: str, weight: torch.Tensor, in_features: int, options: Options) -> str:
    """Why the linear layer `name` keeps its floating-point weight, or "" to make it int8.

    `weight` is the floating-point weight or an Int8Weight (its face dtype, its scales). On the meta device (a model
    being built, before its checkpoint is read) the values are not checked; whoever reads them calls this again.
    """
    if reason := options.skip_reason(name):
        return reason
    if weight.dtype not in options.dtypes:
        return f"weight dtype {str(weight.dtype).replace('torch.', '')} not in option dtypes"
    if min(weight.shape) < options.min_features:
        return f"too small: min(N, K) = {min(weight.shape)} < min_features = {options.min_features}"
    if in_features > MAX_EXACT_K:
        return f"K = {in_features} > {MAX_EXACT_K} would overflow the int32 accumulator"
    if isinstance(weight, Int8Weight):
        if not bool(torch.isfinite(weight.scale).all()):
            return "int8 weight has a non-finite scale"
    elif not weight.is_meta and not all_finite(weight):
        return "weight holds NaN or Inf"
    return ""


def keeps_original(options: Options, read_in_floating_point: bool) -> bool:
    """Whether a new Int8Weight keeps its floating-point weight: when asked to, when the outlier columns are to use it,
    or when something other than a linear reads the weight (a tied embedding), which must see the exact values."""
    return options.keep_fp_weights or options.outlier_weights == "original" or read_in_floating_point


def new_weight_threshold(options: Options) -> float:
    """The outlier threshold a weight quantized under these options carries (eager calls use it)."""
    if options.threshold is not None:
        return options.threshold
    return BLOCK_DEFAULT_THRESHOLD if options.block_size else DEFAULT_THRESHOLD


def new_weight_block_size(options: Options) -> int:
    """The columns per scale of a weight quantized under these options: 0 (one per row, LLM.int8()) or block mode's."""
    return options.block_size
