"""Tensor-parallel int8 linears: transformers' tensor-parallel plans (`int8pass.from_pretrained(path,
tp_plan="auto")` under torchrun) with Int8Weights, over torch.distributed (gloo on CPU). docs/design.md §1c.

transformers builds the model with each planned parameter a DTensor placeholder, reads only this rank's slice of each
checkpoint tensor, and replaces each planned linear's forward with its plan's (ColwiseParallel: the whole input, this
rank's output features; RowwiseParallel: this rank's input features, the partial outputs all-reduced in floating
point, then the bias). Here, for the weights int8pass quantizes:
- `WeightShard.of`: which rows (column-parallel) or columns (row-parallel) of an [N, K] weight this rank holds;
- `quantize`: that slice quantized as the whole weight is: a row-parallel slice takes the whole rows' absmax
  (all-reduced), so its codes are those columns of the whole weight's codes and the bitsandbytes layout (CB, SCB)
  holds on every rank;
- `adopt`: the local Int8Weight becomes the module's weight as a plain tensor (the int8 kernels take plain tensors),
  with transformers' flag for quantized modules that run their plan on local tensors;
- `gather`: the whole weight's codes and scales again, for save_pretrained (every rank calls it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from int8pass import reference
from int8pass.int8_weight import Int8Weight, row_absmax

# transformers' own attribute (its torchao and fp8 integrations set it): the plan's forward keeps this module's inputs,
# parameters and outputs local tensors instead of DTensors
LOCAL_TENSOR_FLAG = "_hf_quantized_needs_local_tp"
# where an adopted weight's WeightShard is kept, on its module, for save_pretrained
SHARD_ATTRIBUTE = "_int8pass_weight_shard"


@dataclass(frozen=True)
class WeightShard:
    """This rank's slice of an [N, K] linear weight: rows [start, stop) (dim 0: column-parallel, output features) or
    columns (dim 1: row-parallel, input features), as DTensor's Shard splits them (reference.shard_bounds)."""

    dim: int
    start: int
    stop: int
    full_shape: tuple[int, int]
    group: dist.ProcessGroup

    @classmethod
    def of(cls, name: str, placeholder: torch.Tensor, transposed: bool) -> "WeightShard | None":
        """The slice a tensor-parallel placeholder (a DTensor) stands for; None for a replicated one. Raises for
        layouts int8pass does not split: meshes of more than one dimension (TP with FSDP, per-head unit meshes),
        interleaved shards, weights stored [in, out]."""
        mesh = placeholder.device_mesh
        if mesh.ndim != 1 or len(placeholder.placements) != 1:
            raise ValueError(f"{name}: int8pass splits int8 weights over a 1-D tensor-parallel mesh; this weight is "
                             f"placed {placeholder.placements} on a {mesh.ndim}-D mesh")
        placement = placeholder.placements[0]
        if placement.is_replicate():
            return None
        if type(placement) is not Shard or transposed:
            raise ValueError(f"{name}: int8pass splits [out, in] linear weights by whole rows or columns; this one is "
                             f"{'stored [in, out] and ' if transposed else ''}placed {placement}")
        dim = placement.dim % 2
        full_shape = tuple(placeholder.shape)
        start, stop = reference.shard_bounds(full_shape[dim], mesh.size())[mesh.get_local_rank()]
        if start == stop:
            raise ValueError(f"{name}: {full_shape[dim]} {'input' if dim else 'output'} features over {mesh.size()} "
                             "ranks leave this rank none; use fewer ranks")
        if placeholder.to_local().shape[dim] != stop - start:
            raise ValueError(f"{name}: the placeholder's local shape {tuple(placeholder.to_local().shape)} is not "
                             f"rows/columns [{start}, {stop}) of {full_shape}")
        return cls(dim, start, stop, full_shape, mesh.get_group())

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)


def is_distributed(placeholder: torch.Tensor) -> bool:
    """Whether transformers placed this parameter with a tensor-parallel plan."""
    return isinstance(placeholder, DTensor)


def agree_skip_reason(reason: str, shard: WeightShard) -> str:
    """One decision for all ranks on whether a split weight stays in floating point (each saw only its slice's
    values): a rank whose slice is fine learns that another rank's was not."""
    flag = torch.tensor([1 if reason else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=shard.group)
    return reason or ("another rank's slice of it cannot be quantized" if int(flag) else "")


def quantize(value: torch.Tensor, shard: WeightShard | None, *, threshold: float, transposed: bool,
             keep_original: bool, block_size: int) -> Int8Weight:
    """Int8Weight.from_float of this rank's slice, with the codes and scales that slice has in the whole weight's.
    Every rank holding a slice of the weight calls it (a row-parallel slice all-reduces its rows' absmax)."""
    absmax = None
    if shard is not None and shard.dim == 1:
        if block_size:
            _check_block_aligned(shard, block_size)
        else:
            absmax = row_absmax(value)
            dist.all_reduce(absmax, op=dist.ReduceOp.MAX, group=shard.group)
    return Int8Weight.from_float(value, threshold=threshold, transposed=transposed, keep_original=keep_original,
                                 block_size=block_size, row_absmax=absmax)


def adopt(module: torch.nn.Module, weight: torch.nn.Parameter, shard: WeightShard | None) -> None:
    """Make the local Int8Weight `module`'s weight in place of its DTensor placeholder (so the loader sets it as it
    is), and have the plan's forward run the module on local tensors."""
    module._parameters["weight"] = weight
    setattr(module, LOCAL_TENSOR_FLAG, True)
    setattr(module, SHARD_ATTRIBUTE, shard)


def shard_of(module: torch.nn.Module) -> WeightShard | None:
    """The slice an adopted Int8Weight holds (None: the whole weight)."""
    return getattr(module, SHARD_ATTRIBUTE, None)


def gather(weight: Int8Weight, shard: WeightShard) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole weight's codes [N, K] and scales from every rank's slice. A collective: every rank calls it."""
    bounds = reference.shard_bounds(shard.full_shape[shard.dim], shard.world_size)
    codes = _all_gather(weight.codes, shard.dim, bounds, shard.group)
    if shard.dim == 0:
        return codes, _all_gather(weight.scale, 0, bounds, shard.group)
    if not weight.block_size:
        return codes, weight.scale
    block_bounds = [(start // weight.block_size, reference.block_count(stop, weight.block_size))
                    for start, stop in bounds]
    return codes, _all_gather(weight.scale, 1, block_bounds, shard.group)


def _all_gather(local: torch.Tensor, dim: int, bounds: list[tuple[int, int]], group) -> torch.Tensor:
    """Concatenate every rank's slice along `dim` (their lengths from `bounds`; all_gather takes equal shapes, so
    each is padded to the longest)."""
    longest = max(stop - start for start, stop in bounds)
    shape = list(local.shape)
    shape[dim] = longest
    padded = local.new_zeros(shape)
    padded.narrow(dim, 0, local.shape[dim]).copy_(local)
    parts = [torch.empty_like(padded) for _ in bounds]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part.narrow(dim, 0, stop - start) for part, (start, stop) in zip(parts, bounds)], dim)


def _check_block_aligned(shard: WeightShard, block_size: int) -> None:
    chunk = -(-shard.full_shape[1] // shard.world_size)
    if chunk % block_size:
        raise ValueError(f"block_size {block_size}: {shard.full_shape[1]} input features over {shard.world_size} ranks "
                         f"are slices of {chunk} columns, which do not end on block boundaries; use a block size "
                         "that divides them, or one scale per row (block_size=0)")
