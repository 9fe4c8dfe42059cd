"""Compile-time int8 weights: quantized once per parameter, shared by every graph and consumer that uses it.

The cache is keyed by the parameter object (weakly, so it dies with the model). A parameter whose fp storage
was released stays usable by later compiles (recompiles for new shapes, other graphs) through this cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary

from int8pass import reference


@dataclass
class QuantizedWeight:
    weight_q: torch.Tensor  # int8 [N, K], output channels as rows
    scale: torch.Tensor  # fp32 [N]
    source_version: int  # the parameter's _version when quantized: a later in-place write means stale codes

    @property
    def nbytes(self) -> int:
        return self.weight_q.nbytes + self.scale.nbytes


# param -> {stored_transposed: QuantizedWeight}; one parameter may be used as [N, K] and as [K, N].
_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()
# parameters whose fp storage int8pass released, with the name they were released under
_RELEASED: WeakIdKeyDictionary = WeakIdKeyDictionary()
# parameters that some compiled graph reads in floating point: their storage must stay
_READ_IN_FP: WeakIdKeyDictionary = WeakIdKeyDictionary()


class ReleasedWeightError(RuntimeError):
    pass


def is_released(param: torch.Tensor) -> bool:
    return param in _RELEASED


def quantized(param: torch.Tensor, stored_transposed: bool) -> QuantizedWeight:
    """The int8 form of `param` as a linear weight ([N, K], or [K, N] when stored_transposed)."""
    per_layout = _CACHE.get(param)
    if per_layout is None:
        per_layout = _CACHE[param] = {}
    cached = per_layout.get(stored_transposed)
    if cached is not None and (is_released(param) or cached.source_version == param._version):
        return cached
    if is_released(param):
        raise ReleasedWeightError(
            f"int8pass released the floating-point storage of {_RELEASED[param]} after quantizing it, and it is "
            "needed again in a layout not quantized before; compile with options={'keep_fp_weights': True}"
        )
    with torch.no_grad():
        weight = param.detach()
        weight = weight.t() if stored_transposed else weight
        weight_q, scale = reference.quantize_weight(weight)
    per_layout[stored_transposed] = QuantizedWeight(weight_q.contiguous(), scale, param._version)
    return per_layout[stored_transposed]


def release_fp_storage(param: torch.Tensor, name: str) -> int:
    """Free the fp storage of a quantized parameter; returns the bytes freed.

    The tensor keeps its shape, dtype and device, so Dynamo's guards still match and no recompile happens;
    only its data is gone (the way FSDP frees parameters). Eager use of the module afterwards fails.
    """
    storage = param.untyped_storage()
    freed = storage.nbytes()
    if freed:
        storage.resize_(0)
        _RELEASED[param] = name
    return freed


def check_not_released(param: torch.Tensor, what: str) -> None:
    if is_released(param):
        raise ReleasedWeightError(
            f"{what} uses {_RELEASED[param]} in floating point, but int8pass released its storage when an earlier "
            "graph quantized it; compile with options={'keep_fp_weights': True}"
        )


def mark_fp_use(param: torch.Tensor) -> None:
    _READ_IN_FP[param] = True


def has_fp_use(param: torch.Tensor) -> bool:
    return param in _READ_IN_FP
