"""Compile-time int8 weights: quantized once per parameter, shared by every graph and consumer that uses it.

The cache is keyed by the parameter object (weakly, so it dies with the model). A parameter whose fp storage
was released stays usable by later compiles (recompiles for new shapes, other graphs) through this cache.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary

from int8pass import reference


@dataclass
class QuantizedWeight:
    weight_q: torch.Tensor  # int8 [N, K], output channels as rows
    scale: torch.Tensor  # fp32 [N]
    source: tuple  # fingerprint() of the parameter when quantized: any change means stale codes

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


_LOCK = threading.Lock()


def fingerprint(param: torch.Tensor) -> tuple:
    """What changes when a parameter's values may have: in-place writes bump _version; `param.data = t` and
    `.to()` swap the storage (new data_ptr) or dtype without bumping it."""
    return (param._version, param.data_ptr(), param.dtype)


def is_released(param: torch.Tensor) -> bool:
    return param in _RELEASED and param.untyped_storage().nbytes() == 0


def is_current(param: torch.Tensor, qweight: QuantizedWeight) -> bool:
    return is_released(param) or qweight.source == fingerprint(param)


def quantized(param: torch.Tensor, stored_transposed: bool) -> QuantizedWeight:
    """The int8 form of `param` as a linear weight ([N, K], or [K, N] when stored_transposed)."""
    per_layout = _CACHE.get(param)
    if per_layout is None:
        per_layout = _CACHE[param] = {}
    cached = per_layout.get(stored_transposed)
    if cached is not None and is_current(param, cached):
        return cached
    if is_released(param):
        raise ReleasedWeightError(
            f"int8pass released the floating-point storage of {_RELEASED[param]} after quantizing it, and it is "
            "needed again in a layout not quantized before; compile with options={'keep_fp_weights': True}"
        )
    weight_q, scale = _quantize(param, stored_transposed)
    per_layout[stored_transposed] = QuantizedWeight(weight_q.contiguous(), scale, fingerprint(param))
    return per_layout[stored_transposed]


def _quantize(param: torch.Tensor, stored_transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        weight = param.detach()
        return reference.quantize_weight(weight.t() if stored_transposed else weight)


def refresh(param: torch.Tensor, stored_transposed: bool, qweight: QuantizedWeight) -> bool:
    """Re-quantize into the same tensors (which compiled graphs hold) if the parameter changed since.

    Returns True when it did; the caller then re-prepares the kernel layout. Never leaves stale codes.
    """
    with _LOCK:
        if is_current(param, qweight):
            return False
        weight_q, scale = _quantize(param, stored_transposed)
        storage = qweight.weight_q.untyped_storage()
        if storage.nbytes() == 0:  # the kernel layout had replaced the dense codes: bring them back
            storage.resize_(qweight.weight_q.numel() * qweight.weight_q.element_size())
        qweight.weight_q.copy_(weight_q)
        qweight.scale.copy_(scale)
        qweight.source = fingerprint(param)
        return True


def release_fp_storage(param: torch.Tensor, name: str) -> int:
    """Free the fp storage of a quantized parameter; returns the bytes freed.

    The tensor keeps its shape, dtype and device, so Dynamo's guards still match and no recompile happens;
    only its data is gone (the way FSDP frees parameters). Eager use of the module afterwards fails.
    """
    freed = free_storage(param)
    if freed:
        _RELEASED[param] = name
    return freed


def free_storage(tensor: torch.Tensor) -> int:
    """Empty a tensor's storage in place (shape, dtype and device stay); returns the bytes freed."""
    storage = tensor.untyped_storage()
    freed = storage.nbytes()
    storage.resize_(0)
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
