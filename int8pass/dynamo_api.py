"""The Dynamo internals int8pass uses, in one place (checked against torch 2.11 and 2.13).

The backend turns a floating-point parameter into an Int8Weight while Dynamo is compiling the graph that reads it.
It does so in place, keeping the parameter object (what the module, tied modules, Dynamo's graph inputs and any
reference the user holds all point to) and swapping what it contains, so every holder sees the int8 weight and the
floating-point storage is freed as soon as the swap is done. Dynamo builds its guards after the backend returns, from
that same object, so they expect the int8 weight and nothing recompiles.
"""

from __future__ import annotations

import copyreg

import torch
from torch._guards import TracingContext


def swap_into(tensor: torch.Tensor, replacement: torch.Tensor) -> None:
    """Give `tensor` the contents (class, attributes, TensorImpl) of `replacement`, and `replacement` those of
    `tensor`, as torch.utils.swap_tensors does.

    swap_tensors refuses tensors that have weak references, because weakly keyed caches would go on describing the
    old contents. While Dynamo compiles, the only such caches are its own: the fake-tensor memo and the symbolic
    contexts (the graph input's TensorWeakRef must keep pointing to this object). Those entries are dropped first,
    so the compiler fakes the new contents afresh. Anything else that holds the old TensorImpl in C++ (an autograd
    graph built by an earlier call with grad enabled) keeps it, and with it its floating-point storage.
    """
    context = TracingContext.try_get()
    if context is not None:
        context.tensor_to_context.pop(tensor, None)
        if context.fake_mode is not None:
            context.fake_mode.fake_tensor_converter.meta_converter.describer.lookup_tensor.pop(tensor, None)
    replacement.__dict__ = {**tensor.__dict__, **replacement.__dict__}  # attributes others set on the parameter
    slots = set(copyreg._slotnames(type(tensor)))  # type: ignore[attr-defined]
    if slots != set(copyreg._slotnames(type(replacement))):  # type: ignore[attr-defined]
        raise RuntimeError(f"cannot swap a {type(tensor).__name__} with a {type(replacement).__name__}")
    tensor.__class__, replacement.__class__ = replacement.__class__, tensor.__class__
    tensor.__dict__, replacement.__dict__ = replacement.__dict__, tensor.__dict__
    torch._C._swap_tensor_impl(tensor, replacement)


def fake_of(tensor: torch.Tensor) -> torch.Tensor | None:
    """A fake of `tensor` in the compile's fake mode (for the graph's metadata), or None outside a compile."""
    context = TracingContext.try_get()
    if context is None or context.fake_mode is None:
        return None
    return context.fake_mode.from_tensor(tensor, static_shapes=True)


def source_name(node: torch.fx.Node) -> str | None:
    """Dynamo's source expression for a graph input, e.g. "L['self']._modules['fc']._parameters['weight']"."""
    source = getattr(node.meta.get("grapharg"), "source", None) or getattr(node, "_dynamo_source", None)
    if source is None:
        return None
    name = source.name
    return name() if callable(name) else name


# F.linear as Dynamo records it in a graph
TRACED_LINEAR = torch._C._nn.linear
