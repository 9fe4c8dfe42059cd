"""The Dynamo internals int8pass uses, in one place (checked against torch 2.11 and 2.13).

The backend turns a floating-point parameter into an Int8Weight while Dynamo is compiling the graph that reads it.
It does so in place, keeping the parameter object (what the module, tied modules, Dynamo's graph inputs and any
reference the user holds all point to) and swapping what it contains, so every holder sees the int8 weight and the
floating-point storage is freed as soon as the swap is done. Dynamo builds its guards after the backend returns, from
that same object, so they expect the int8 weight and nothing recompiles.
"""

from __future__ import annotations

import builtins
import copyreg
import re

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


def _source(node: torch.fx.Node):
    return getattr(node.meta.get("grapharg"), "source", None) or getattr(node, "_dynamo_source", None)


def _name(source) -> str:
    name = source.name  # a method in older releases, a property since
    return name() if callable(name) else name


def source_name(node: torch.fx.Node) -> str | None:
    """Dynamo's source expression for a graph input, e.g. "L['self']._modules['fc']._parameters['weight']"."""
    source = _source(node)
    return None if source is None else _name(source)


def outermost_module(node: torch.fx.Node, values: dict[str, object]) -> tuple[torch.nn.Module, str] | None:
    """The first nn.Module on the way from the compiled frame's locals or globals to this graph input: the module a
    user compiled (`torch.compile(model)`, `torch.compile(model.forward)`, a decorated forward whose `self` is
    `args[0]`, a wrapper module), whose named_modules() name its layers, with Dynamo's expression for it. None
    outside a Dynamo compile or where the way cannot be followed.

    Each step of the input's source is evaluated in the frame's scope, as Dynamo evaluates its guards; `values`
    caches them by expression for one graph.
    """
    source = _source(node)
    frame = _compiled_frame()
    if source is None or frame is None:
        return None
    chain = []
    while source is not None:
        chain.append(source)
        source = getattr(source, "base", None)
    scope = {"L": frame.f_locals, "G": frame.f_globals}
    for step in reversed(chain):
        expression = _name(step)
        if expression not in values:
            try:
                values[expression] = eval(expression, {"__builtins__": builtins}, scope)  # noqa: S307 (Dynamo's own)
            except Exception:  # a step only Dynamo's guard scope can evaluate: try the next one
                values[expression] = None
        if isinstance(values[expression], torch.nn.Module):
            return values[expression], expression
    return None


def _compiled_frame():
    """The instruction translator of the frame Dynamo is compiling (its f_locals and f_globals), or None."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    try:
        tx = InstructionTranslator.current_tx()
    except AttributeError:  # not inside a Dynamo compile
        return None
    return None if tx is None else tx.output.root_tx


def calling_module(node: torch.fx.Node, root_expression: str) -> tuple[str, type] | None:
    """The innermost module whose forward made this call: its path below the module that `root_expression` reaches
    ("" for that module itself) and its class, as Dynamo's nn_module_stack records them; None when it records none
    below that module. Dynamo writes `._modules['a']` as `.a`, so the path is a candidate for the caller to check
    against the module tree."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    if not stack:
        return None
    shown, cls = stack[-1]
    root = re.sub(r"\._(?:modules|parameters|buffers)\[(['\"])([^'\"\]]+)\1\]", r".\2", root_expression)
    if shown == root:
        return "", cls
    return (shown[len(root) + 1:], cls) if shown.startswith(root + ".") else None


# F.linear and F.scaled_dot_product_attention as Dynamo records them in a graph
TRACED_LINEAR = torch._C._nn.linear
TRACED_SDPA = torch._C._nn.scaled_dot_product_attention


def uncompiled(module: torch.nn.Module) -> torch.nn.Module:
    """The module a torch.compile'd module wraps (itself if it is not one)."""
    return module._orig_mod if isinstance(module, torch._dynamo.eval_frame.OptimizedModule) else module
