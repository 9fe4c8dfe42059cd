"""Layer names from the module tree: a linear is named by its path in the module the user compiled, as
`named_modules()`, `named_parameters()` and `state_dict()` spell it ("model.layers.0.mlp.down_proj"), whatever form
Dynamo saw: `torch.compile(model)`, `torch.compile(model.forward)`, a forward wrapped by a decorator, a wrapper module
(whose own tree then names the layers, "inner.model.layers.0..."). `skip_modules`, the report, the dumps and the
outlier statistics all use these names.

Dynamo's expressions for the weights are only followed to find that module (dynamo_api.outermost_module); the names
themselves are looked up in its tree, by the identity of the weight tensors. Where no module holds a weight, or
several hold it and the call does not say which one runs it, the name is "" and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from int8pass import dynamo_api
from int8pass.rules import linear_weight_orientation


@dataclass(frozen=True)
class Holder:
    path: str  # the module's path in the tree ("" for the root)
    attribute: str  # the parameter or buffer's name in that module ("weight")
    module: torch.nn.Module

    @property
    def layer(self) -> str:
        """The layer's name: the module's path for its `weight`, else the tensor's own path ("mlp.w1")."""
        return self.path if self.attribute == "weight" else _join(self.path, self.attribute)


class ModuleTree:
    """One root module's parameters and buffers, by tensor identity, and its modules by path."""

    def __init__(self, root: torch.nn.Module):
        self.modules: dict[str, torch.nn.Module] = {}
        self.holders: dict[int, list[Holder]] = {}  # in named_modules() order
        for path, module in root.named_modules(remove_duplicate=False):
            self.modules.setdefault(path, module)
            for store in (module._parameters, module._buffers):
                for attribute, tensor in store.items():
                    if tensor is not None:
                        self.holders.setdefault(id(tensor), []).append(Holder(path, attribute, module))

    def holds(self, tensor: torch.Tensor) -> bool:
        return id(tensor) in self.holders

    def weight_path(self, tensor: torch.Tensor) -> str:
        """The tensor's first path in the tree (the one state_dict() lists first), or ""."""
        holders = self.holders.get(id(tensor))
        return _join(holders[0].path, holders[0].attribute) if holders else ""

    def layer_name(self, tensor: torch.Tensor, caller: tuple[str, type] | None) -> str:
        """The name of the layer that applies `tensor` as its weight, `caller` being the module Dynamo saw making the
        call (a path to check, and its class); "" when the tree cannot tell."""
        holders = self.holders.get(id(tensor), [])
        calling = None
        if caller is not None and type(self.modules.get(caller[0])) is caller[1]:
            calling = self.modules[caller[0]]
        # a module reachable by several paths is one layer, named by its first path (named_modules()' choice)
        distinct: dict[tuple[int, str], Holder] = {}
        for holder in holders:
            distinct.setdefault((id(holder.module), holder.attribute), holder)
        held_by_caller = [holder for holder in distinct.values() if holder.module is calling]
        linears = [holder for holder in distinct.values()
                   if holder.attribute == "weight" and linear_weight_orientation(holder.module) is not None]
        if len(held_by_caller) == 1:
            return held_by_caller[0].layer
        if len(linears) == 1:  # a tied weight: the linear layer, not the embedding that shares it
            return linears[0].layer
        if calling is not None and not linears:  # a module applying a weight it does not hold
            return caller[0]
        if len(distinct) == 1:
            return next(iter(distinct.values())).layer
        return ""


class GraphNames:
    """Names for the weights of one Dynamo graph: each placeholder's module tree, built once per root module."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self._values: dict[str, object] = {}  # Dynamo expressions evaluated so far
        self._trees: dict[int, tuple[ModuleTree, str]] = {}

    def tree(self, node: fx.Node) -> tuple[ModuleTree, str] | None:
        """The tree of the module a weight node comes from, and Dynamo's expression for that module."""
        if node.op == "get_attr":  # a graph that holds its weights itself (not from Dynamo)
            found = (self.gm, "")
        else:
            found = dynamo_api.outermost_module(node, self._values)
        if found is None:
            return None
        root, expression = found
        if id(root) not in self._trees:
            self._trees[id(root)] = (ModuleTree(root), expression)
        return self._trees[id(root)]

    def describe(self, weight_node: fx.Node, weight: torch.Tensor, call: fx.Node) -> tuple[str, str]:
        """(layer name or "", the weight's path in its tree, else Dynamo's expression for it)."""
        found = self.tree(weight_node)
        if found is None or not found[0].holds(weight):
            return "", dynamo_api.source_name(weight_node) or weight_node.name
        tree, expression = found
        caller = dynamo_api.calling_module(call, expression) if expression else None
        return tree.layer_name(weight, caller), tree.weight_path(weight)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
