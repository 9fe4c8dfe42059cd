"""Attention on CPUs: bfloat16/float16 scaled_dot_product_attention computed in float32 (option cpu_attention).

PyTorch's CPU flash attention multiplies reduced-precision q, k and v with the BLAS's bf16 GEMV/GEMM. Without AMX
that path is slow at decode: on a Zen 4 EPYC (AVX512-BF16, no AMX), 2 threads, one query token of 5 heads x 128
against 1 KV head took 113 us at 128 keys and 699 us at 1024, against 56 and 185 us for the same call in float32,
casts included (2.0-4.9x over the shapes of benchmarks/cpu_attention.py; a prefill costs 0.84-1.02x as much either
way). So on such CPUs the backend casts q, k, v (and a floating-point mask) to float32 and the result back.
The softmax and both products then round as fp32 throughout, which is at least as accurate as the bf16 kernel
(whose accumulators are fp32 too); the output is rounded to the inputs' dtype once, as before.

A decode call (one query token, no dropout, not causal; with or without a mask) runs llmint8::cpu_decode_attention
instead: the same float32 arithmetic, on the cache as it is stored. The casts write a float32 copy of the whole KV
cache on every call, and PyTorch's kernel with enable_gqa first expands the key/value heads to the query heads, so at
a long context those copies, not the products, were the cost: ~1.2 ms a layer in a compiled decode step of
benchmarks/llamacpp.py's 18-layer model after 1024 tokens, where the kernel, which reads each cached row once for
all the query heads of its group, takes ~38 us. Elsewhere (prefill, or without the C++ library) the casts stay.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from int8pass import cpu_api, dynamo_api
from int8pass.fx_pass import argument, example_value
from int8pass.lowering import cpu_linear
from int8pass.report import log

SDPA_FUNCTIONS = {dynamo_api.TRACED_SDPA, torch.nn.functional.scaled_dot_product_attention,
                  torch.ops.aten.scaled_dot_product_attention.default}
REDUCED = (torch.bfloat16, torch.float16)


def runs_in_float32(choice: str) -> bool:
    """Whether CPU attention on reduced-precision inputs is computed in float32 under cpu_attention=`choice`:
    "float32" always, "native" never, "auto" where the CPU has no AMX (whose bf16 tiles PyTorch's kernel uses)."""
    return choice == "float32" or (choice == "auto" and not cpu_api.has_amx())


def _is_decode(node: fx.Node, query: torch.Tensor) -> bool:
    """Whether the attention call `node` is what llmint8::cpu_decode_attention computes: one query token per head, no
    dropout, not causal, key and value 4-D in the query's dtype with as many heads or grouped (enable_gqa), and no
    mask or one of [1 or B, 1 or H, 1, S], boolean or in the query's dtype (the op checks S when it runs)."""
    key, value = example_value(argument(node, 1, "key")), example_value(argument(node, 2, "value"))
    mask_node = argument(node, 3, "attn_mask")
    mask = example_value(mask_node)
    if key is None or value is None or query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return False
    if mask_node is not None and (mask is None or mask.dim() != 4 or mask.dtype not in (torch.bool, query.dtype)):
        return False
    plain = (argument(node, 4, "dropout_p", 0.0) == 0.0 and argument(node, 5, "is_causal", False) is False
             and isinstance(argument(node, 6, "scale"), (float, int, type(None))))
    # only static sizes are compared: a symbolic one would add a guard after Dynamo has finished tracing
    sizes = (query.shape[0], query.shape[1], query.shape[2], query.shape[3], key.shape[1], key.shape[3],
             *(mask.shape[:3] if mask is not None else ()))
    if not all(type(size) is int for size in sizes):
        return False
    heads_match = key.shape[1] == query.shape[1] or argument(node, 7, "enable_gqa", False) is True
    shapes = (query.shape[2] == 1 and key.shape[3] == query.shape[3] and key.dtype == value.dtype == query.dtype
              and key.device.type == value.device.type == "cpu")
    if mask is not None:
        shapes = shapes and mask.shape[0] in (1, query.shape[0]) and mask.shape[1] in (1, query.shape[1]) \
            and mask.shape[2] == 1
    return plain and heads_match and shapes and cpu_linear.available()


def compute_in_float32(gm: fx.GraphModule, choice: str, graph_id: int) -> tuple[int, int]:
    """Rewrite each CPU scaled_dot_product_attention of `gm` on bf16/fp16 inputs to run in float32 (see the module
    docstring) when cpu_attention=`choice` says so; returns how many were rewritten, and how many of them run
    llmint8::cpu_decode_attention."""
    if not runs_in_float32(choice):
        return 0, 0
    graph, count, decode = gm.graph, 0, 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in SDPA_FUNCTIONS:
            continue
        query = example_value(argument(node, 0, "query"))
        if query is None or query.device.type != "cpu" or query.dtype not in REDUCED:
            continue
        with graph.inserting_before(node):
            if _is_decode(node, query):
                scale = argument(node, 6, "scale")
                operands = tuple(argument(node, index, name)
                                 for index, name in enumerate(("query", "key", "value", "attn_mask")))
                result = graph.call_function(torch.ops.llmint8.cpu_decode_attention.default,
                                             (*operands, float(query.shape[3] ** -0.5 if scale is None else scale)))
                decode += 1
            else:
                result = _cast_to_float32(graph, node, query.dtype)
        result.meta.update(node.meta)
        node.replace_all_uses_with(result)
        graph.erase_node(node)
        count += 1
    if count:
        log.info("llmint8 graph %d: %d CPU attention calls on bf16/fp16 inputs computed in float32, %d of them by "
                 "llmint8::cpu_decode_attention (cpu_attention=%r)", graph_id, count, decode, choice)
        graph.lint()
        gm.recompile()
    return count, decode


def _cast_to_float32(graph: fx.Graph, node: fx.Node, dtype: torch.dtype) -> fx.Node:
    """The attention call `node` on float32 casts of its q, k, v (and floating-point mask), rounded back to `dtype`."""
    args, kwargs = list(node.args), dict(node.kwargs)
    for index, name in enumerate(("query", "key", "value", "attn_mask")):
        operand = argument(node, index, name)
        value = example_value(operand)
        if value is None or not value.is_floating_point():
            continue  # no mask, or a boolean one
        cast = graph.call_method("to", (operand, torch.float32))
        if len(args) > index:
            args[index] = cast
        else:
            kwargs[name] = cast
    upcast = graph.call_function(node.target, tuple(args), kwargs)
    return graph.call_method("to", (upcast, dtype))
