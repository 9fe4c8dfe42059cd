"""Attention on CPUs: bfloat16/float16 scaled_dot_product_attention computed in float32 (option cpu_attention).

PyTorch's CPU flash attention multiplies reduced-precision q, k and v with the BLAS's bf16 GEMV/GEMM. Without AMX
that path is slow at decode: on a Zen 4 EPYC (AVX512-BF16, no AMX), 2 threads, one query token of 5 heads x 128
against 1 KV head took 113 us at 128 keys and 699 us at 1024, against 56 and 185 us for the same call in float32,
casts included (2.0-4.9x over the shapes of benchmarks/cpu_attention.py; a prefill costs 0.84-1.02x as much either
way). So on such CPUs the backend casts q, k, v (and a floating-point mask) to float32 and the result back.
The softmax and both products then round as fp32 throughout, which is at least as accurate as the bf16 kernel
(whose accumulators are fp32 too); the output is rounded to the inputs' dtype once, as before.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from int8pass import cpu_api, dynamo_api
from int8pass.fx_pass import argument, example_value
from int8pass.report import log

SDPA_FUNCTIONS = {dynamo_api.TRACED_SDPA, torch.nn.functional.scaled_dot_product_attention,
                  torch.ops.aten.scaled_dot_product_attention.default}
REDUCED = (torch.bfloat16, torch.float16)


def runs_in_float32(choice: str) -> bool:
    """Whether CPU attention on reduced-precision inputs is computed in float32 under cpu_attention=`choice`:
    "float32" always, "native" never, "auto" where the CPU has no AMX (whose bf16 tiles PyTorch's kernel uses)."""
    return choice == "float32" or (choice == "auto" and not cpu_api.has_amx())


def compute_in_float32(gm: fx.GraphModule, choice: str, graph_id: int) -> int:
    """Rewrite each CPU scaled_dot_product_attention of `gm` on bf16/fp16 inputs to run in float32 (see the module
    docstring) when cpu_attention=`choice` says so; returns how many were rewritten."""
    if not runs_in_float32(choice):
        return 0
    graph, count = gm.graph, 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in SDPA_FUNCTIONS:
            continue
        query = example_value(argument(node, 0, "query"))
        if query is None or query.device.type != "cpu" or query.dtype not in REDUCED:
            continue
        args, kwargs = list(node.args), dict(node.kwargs)
        with graph.inserting_before(node):
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
            result = graph.call_method("to", (upcast, query.dtype))
        result.meta.update(node.meta)
        node.replace_all_uses_with(result)
        graph.erase_node(node)
        count += 1
    if count:
        log.info("llmint8 graph %d: %d CPU attention calls on bf16/fp16 inputs computed in float32 (cpu_attention=%r)",
                 graph_id, count, choice)
        graph.lint()
        gm.recompile()
    return count
