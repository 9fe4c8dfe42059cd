"""The Inductor internals int8pass uses (the backend, the options and the lowerings), in one place.

Inductor has no stable extension API: these names moved between releases before, and may again. Each one is
imported here and nowhere else; all were checked against torch 2.11 (the GPU machines) and 2.13 (ours).
"""

from __future__ import annotations

import importlib.util

from typing import Callable

import torch
from torch._inductor import config
from torch._inductor.compile_fx import compile_fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._inductor.decomposition import register_decomposition, select_decomp_table
from torch._inductor.ir import FixedLayout
from torch._inductor.lowering import fallback_handler, register_lowering
from torch._inductor.select_algorithm import SymbolicGridFn, TritonTemplate, realize_inputs
from torch._inductor.select_algorithm import autotune_select_algorithm as _autotune_select_algorithm
from torch._inductor.virtualized import V

HAS_TRITON = importlib.util.find_spec("triton") is not None

__all__ = [
    "AOTI_WEIGHTS_BESIDE_SO", "FixedLayout", "SourceKey", "SymbolicGridFn", "TritonTemplate", "V", "aoti_compile_and_package", "autotune_select_algorithm", "compile_fx", "config",
    "config_keys", "cpp_wrapper", "fallback", "max_autotune", "mode_options", "realize_inputs", "register_decomposition", "register_op_lowering",
    "select_decomp_table", "size_hint", "statically_at_most", "uses_triton",
]


def mode_options(mode: str) -> dict:
    """The config patches torch.compile's `mode=` stands for (e.g. max-autotune's)."""
    return dict(torch._inductor.list_mode_options(mode))


def config_keys() -> set[str]:
    """Every Inductor config key, for validating user patches."""
    return set(config.get_config_copy())


def uses_triton(device: torch.device) -> bool:
    """Whether Inductor generates Triton for `device` under the current config: always on CUDA, and on CPU
    when the user chose cpu_backend="triton" (which is also how CI runs the template in the interpreter)."""
    if not HAS_TRITON:
        return False
    return device.type == "cuda" or (device.type == "cpu" and config.cpu_backend == "triton")


def autotune_select_algorithm(name, choices, input_nodes, layout):
    """The fastest choice's output node (benchmarked only when there is more than one choice).

    torch 2.13 returns (node, choice); 2.11 returns the node.
    """
    selected = _autotune_select_algorithm(name, choices, input_nodes, layout)
    return selected[0] if isinstance(selected, tuple) else selected


# The weights in one file of the package beside its .so, not inside the .so: a process that loads the package then
# holds them once (read into memory), not twice (that copy plus the .so's mapped pages: measured in process RSS)
AOTI_WEIGHTS_BESIDE_SO = ({"aot_inductor.package_constants_in_so": False,
                           "aot_inductor.package_constants_on_disk_format": "binary_blob"}
                          if hasattr(config.aot_inductor, "package_constants_on_disk_format") else {})


def aoti_compile_and_package(program: torch.export.ExportedProgram, path: str, configs: dict) -> str:
    """AOTInductor: compile an exported program into a .pt2 package at `path` (torch._inductor's entry point), its
    weights beside the .so unless `configs` says otherwise."""
    return torch._inductor.aoti_compile_and_package(program, package_path=path,
                                                    inductor_configs={**AOTI_WEIGHTS_BESIDE_SO, **configs})


def max_autotune() -> bool:
    return bool(config.max_autotune or config.max_autotune_gemm)


def cpp_wrapper() -> bool:
    """Whether Inductor writes the graph's calls in C++ (config cpp_wrapper). A torch.compile graph there calls an op
    whose schema it can pass as stable values or boxed IValues through the dispatcher, but one returning Tensor[] back
    through Python (torch 2.13: cpp_wrapper_cpu._generate_fallback_kernel_jit)."""
    return bool(config.cpp_wrapper)


def register_op_lowering(op):
    """Register a lowering for a custom op; its arguments are passed through without type promotion."""
    return register_lowering(op, type_promotion_kind=None)


def fallback(op, *args, **kwargs):
    """The op as an extern kernel call (its registered device kernel), as Inductor does for unlowered ops."""
    return fallback_handler(op, add_to_fallback_set=False)(*args, **kwargs)


def statically_at_most(expr, bound: int) -> bool:
    """Whether a (possibly symbolic) size is known to be <= bound without adding a guard."""
    return V.graph.sizevars.statically_known_leq(expr, bound)


def size_hint(expr) -> int:
    """A concrete value for a (possibly symbolic) size: what the shape was when compiling."""
    return V.graph.sizevars.optimization_hint(expr, fallback=config.unbacked_symint_fallback)


class SourceKey(CustomGraphPass):
    """A post-grad pass that changes nothing: its uuid() puts the hash of the given source files into Inductor's FX
    graph cache key (CustomGraphPass.uuid() is how the key covers code outside the graph and Inductor's config), so a
    cached graph is reused only by the same lowerings and kernels; `extra()` adds what else decides them (called at
    the first compile)."""

    def __init__(self, paths: list[str], extra: Callable[[], str]):
        self.paths = tuple(sorted(paths))
        self.extra = extra
        self._uuid = None

    def __call__(self, graph: torch.fx.Graph) -> None:
        return None

    def uuid(self) -> bytes:
        if self._uuid is None:
            self._uuid = get_hash_for_files(self.paths, extra=f"{torch.__version__} {self.extra()}")
        return self._uuid
