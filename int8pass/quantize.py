"""int8 weights for a plain nn.Module without compiling it: `int8pass.quantize_(model, state_dict=None, **options)`.

- A model in memory: each eligible linear weight becomes an Int8Weight in place, one at a time, so its
  floating-point storage is freed before the next is quantized.
- A model built on the meta device plus a state dict (mmap'd safetensors, `torch.load(..., mmap=True)`): every
  parameter and buffer is taken from the state dict (no copy), and eligible linear weights are quantized straight
  from it, so the floating-point model never exists in memory.
Either way the result goes straight into `torch.compile(model, backend="llmint8")`, which uses the int8 weights as
they are.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from int8pass import dynamo_api, process_memory, rules, tensor_parallel
from int8pass.int8_weight import Int8Weight
from int8pass.options import Options
from int8pass.report import log

# Options that only mean something to a compile
COMPILE_ONLY = ("stats", "dump_dir", "inductor", "cpu_attention", "cpu_fp_linears")


def load_options(options: dict) -> Options:
    """Options.parse for quantizing outside a compile (compile-only options are refused by name)."""
    for name in COMPILE_ONLY:
        if name in options:
            raise ValueError(f"llmint8 option {name!r} applies to torch.compile, not to quantizing weights")
    return Options.parse(options)


def quantize_(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor] | None = None,
              **options) -> torch.nn.Module:
    """Give `model`'s linear layers Int8Weights, in place; returns `model`. See the module docstring.

    Options as for the backend: threshold (default 6.0), skip_modules (default: the output heads), min_features,
    dtypes, keep_fp_weights, outlier_weights, block_size.
    """
    return quantize_model(model, load_options(options), state_dict)


def quantize_model(model: torch.nn.Module, opts: Options, state_dict: Mapping[str, torch.Tensor] | None = None,
                   tied_only: bool = False) -> torch.nn.Module:
    """quantize_ with parsed options. `tied_only`: only the linear weights that a module other than a linear reads
    too (an output head tied to the input embedding), which from_pretrained's loader reads for that module."""
    threshold, block_size = rules.new_weight_threshold(opts), rules.new_weight_block_size(opts)
    targets = _targets(model, opts, state_dict, tied_only)

    def int8(weight, target):
        _, transposed, keep = target
        return Int8Weight.from_float(weight, threshold=threshold, transposed=transposed, keep_original=keep,
                                     block_size=block_size)

    if state_dict is not None:
        _assign_from(model, state_dict, lambda old, value: int8(value, targets[id(old)]) if id(old) in targets else value)
    else:
        for target in targets.values():
            dynamo_api.swap_into(target[0], torch.nn.Parameter(int8(target[0], target), requires_grad=False))
            process_memory.return_freed_heap()
    process_memory.settle()
    log.info("llmint8: quantized %d %slinear weights of %s", len(targets), "tied " if tied_only else "",
             type(model).__name__)
    return model


def _targets(model, options: Options, state_dict,
             tied_only: bool = False) -> dict[int, tuple[torch.Tensor, bool, bool]]:
    """{id(weight): (weight, stored transposed, keep the original)} for the weights to quantize (tied ones once;
    with tied_only, only those that a module other than a linear reads too)."""
    owners: dict[int, list[tuple[str, torch.nn.Module]]] = {}
    params: dict[int, torch.Tensor] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        weight = module._parameters.get("weight")
        if weight is not None:
            owners.setdefault(id(weight), []).append((module_name, module))
            params[id(weight)] = weight
    targets = {}
    for key, modules in owners.items():
        linears = [(name, module) for name, module in modules if rules.linear_weight_orientation(module) is not None]
        if not linears or isinstance(params[key], Int8Weight) or (tied_only and len(linears) == len(modules)):
            continue
        name, module = linears[0]
        if tied_only and tensor_parallel.is_distributed(params[key]):
            if not options.skip_reason(name):  # asked for in int8, which this path cannot give
                log.warning("llmint8: %s stays in floating point: its weight is tied to another module's and split "
                            "over tensor-parallel ranks", name)
            continue
        if tensor_parallel.is_distributed(params[key]):
            raise ValueError(f"int8pass.quantize_: {name}.weight is a tensor-parallel DTensor; load the model with "
                             "int8pass.from_pretrained(path, tp_plan=...), which quantizes each rank's slice as the "
                             "whole weight would be (docs/design.md §1c)")
        source = params[key] if state_dict is None else state_dict.get(_join(name, "weight"), params[key])
        transposed = rules.linear_weight_orientation(module)
        in_features = source.shape[0] if transposed else source.shape[-1]
        if not source.dtype.is_floating_point or source.dim() != 2:
            continue
        if reason := rules.weight_skip_reason(name, source, in_features, options):
            log.debug("llmint8: %s stays in floating point: %s", name, reason)
            continue
        # read in floating point by something else too (a tied embedding): keep the exact values for it
        targets[key] = (params[key], transposed, rules.keeps_original(options, len(linears) < len(modules)))
    return targets


def _assign_from(model, state_dict, convert) -> None:
    """Take every parameter and buffer of `model` from `state_dict` (tied tensors stay tied), through
    `convert(old, value)`."""
    entries = []
    values: dict[int, torch.Tensor] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for kind in ("_parameters", "_buffers"):
            for name, old in getattr(module, kind).items():
                if old is None:
                    continue
                key = _join(module_name, name)
                entries.append((module, kind, name, old, key))
                if id(old) in values or key not in state_dict:
                    continue
                value = state_dict[key]
                if tuple(value.shape) != tuple(old.shape):
                    raise ValueError(f"int8pass.quantize_: {key} has shape {tuple(value.shape)} in the state dict, "
                                     f"{tuple(old.shape)} in the model")
                value = convert(old, value)
                if kind == "_parameters":
                    value = torch.nn.Parameter(value, requires_grad=False)
                values[id(old)] = value
    missing = sorted({key for _, _, _, old, key in entries if id(old) not in values and old.is_meta})
    if missing:
        raise ValueError(f"int8pass.quantize_: the state dict has no value for {len(missing)} tensors left on the meta "
                         f"device: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    for module, kind, name, old, _ in entries:
        if id(old) in values:
            getattr(module, kind)[name] = values[id(old)]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
