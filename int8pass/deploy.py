"""Deploying an int8 model without the Python that built it: torch.export, then an AOTInductor package.

    program = int8pass.export(model, (x,), dynamic_shapes=({0: Dim("batch")},))
    torch.export.save(program, "model.pt2")                 # torch.export.load after `import int8pass`
    int8pass.package(program, "model_aoti.pt2")             # AOTInductor: a .so of the whole model and its weights
    shutil.copy(int8pass.extension_library(), "libint8pass_ops.so")

and where it is served, with no int8pass installed (the same torch release, an x86-64 CPU with AVX2):

    torch.ops.load_library("libint8pass_ops.so")            # C++: dlopen it, then AOTIModelPackageLoader
    runner = torch._inductor.aoti_load_package("model_aoti.pt2")

A Hugging Face causal LM returns a ModelOutput, which only transformers can rebuild from a package's flat outputs: wrap
it in `CausalLMLogits(model)` (its logits for input_ids, without a KV cache) before exporting.

`model` holds Int8Weights (from `quantize_`, `from_pretrained`, or a model compiled with backend="llmint8" and run
once). The exported program is decomposed to core ATen: each int8 linear is one llmint8::linear (or
llmint8::block_linear) node on the weight's codes and scales, which torch.export lifts from the Int8Weight into plain
int8 codes, fp32 scales (bf16 in block mode) and int32 code sums (none in block mode): the parameters
`<layer>.parametrizations.weight.original0`, `original1` and `original2`. The
floating-point weight is not in it, except where the Int8Weight keeps its original (`keep_fp_weights`,
`outlier_weights="original"`, a weight also read in floating point).

AOTInductor compiles llmint8::linear as it does in torch.compile: one call of llmint8::cpu_linear, the C++ op of
lowering/cpu_linear.cpp, which `extension_library()` registers with PyTorch's dispatcher when loaded. So a package of
a CPU program needs that library and nothing else of int8pass. CUDA programs are refused for now: their linears
include Python-registered Triton ops (quantize_activation), which a package cannot call without Python.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from int8pass import dynamo_api
from int8pass.int8_weight import Int8Weight
from int8pass.lowering import cpu_linear, inductor_api
from int8pass.report import log

INT8_OPS = (torch.ops.llmint8.linear.default, torch.ops.llmint8.block_linear.default)


class CausalLMLogits(torch.nn.Module):
    """A Hugging Face causal LM as a function from input_ids to logits, without a KV cache: a plain tensor out, so
    the process that serves its package needs no transformers."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, use_cache=False).logits


def export(model: torch.nn.Module, args: tuple = (), kwargs: dict[str, Any] | None = None, *,
           dynamic_shapes=None, strict: bool = False) -> torch.export.ExportedProgram:
    """torch.export.export of a model with Int8Weights (arguments as torch.export.export's), decomposed so that its
    graph calls the llmint8 ops on int8 parameters. `model` may be the torch.compile'd module."""
    model = dynamo_api.uncompiled(model)
    weights = sum(isinstance(p, Int8Weight) for p in model.parameters())
    if weights == 0:
        raise ValueError(f"int8pass.export: {type(model).__name__} has no Int8Weight; quantize it first "
                         "(int8pass.quantize_, int8pass.from_pretrained, or a run of torch.compile(backend='llmint8'))")
    program = torch.export.export(model, tuple(args), kwargs, dynamic_shapes=dynamic_shapes,
                                  strict=strict).run_decompositions()
    left = [name for name, value in program.state_dict.items() if isinstance(value, Int8Weight)]
    if left:
        raise RuntimeError(f"int8pass.export: torch.export kept these Int8Weights whole: {', '.join(left)}")
    linears = int8_linears(program)
    log.info("llmint8: exported %s with %d int8 linears on %d Int8Weights", type(model).__name__, linears, weights)
    return program


def int8_linears(program: torch.export.ExportedProgram) -> int:
    """How many llmint8 linear nodes the program's graph has."""
    return sum(node.target in INT8_OPS for node in program.graph.nodes)


def package(program: torch.export.ExportedProgram, path: str | Path, **inductor_configs) -> str:
    """An AOTInductor package (.pt2) of an exported int8 program, at `path`; returns its path. Its int8 linears call
    the C++ op of `extension_library()`, which the process that loads it must load first. `inductor_configs` go to
    torch._inductor.aoti_compile_and_package; by default the weights are stored beside the package's .so, so that a
    loaded package holds them in memory once."""
    devices = {node.meta["val"].device.type for node in program.graph.nodes
               if node.target in INT8_OPS and isinstance(node.meta.get("val"), torch.Tensor)}
    if devices - {"cpu"}:
        raise NotImplementedError(f"int8pass.package: int8 linears on {', '.join(sorted(devices - {'cpu'}))} cannot be "
                                  "packaged yet: their quantization step is a Python-registered Triton op, which an "
                                  "AOTInductor package cannot call without Python")
    if devices and not cpu_linear.available():
        raise RuntimeError("int8pass.package: this machine has no int8pass CPU kernel (see the log for why), so the int8 "
                           "linears would compile to Python ops, which an AOTInductor package cannot call")
    return inductor_api.aoti_compile_and_package(program, str(path), inductor_configs)


def extension_library() -> Path:
    """The int8pass C++ op library (built on first use): what a process that runs a package loads
    (torch.ops.load_library in Python, dlopen in C++). It is built for this torch release, for x86-64 CPUs with AVX2."""
    path = cpu_linear.library_path()
    if path is None:
        raise RuntimeError("int8pass.extension_library: the int8pass CPU kernel cannot be built on this machine "
                           "(see the log for why)")
    return path
