"""The `llmint8` torch.compile backend: our FX pass, then Inductor with our lowerings."""

from __future__ import annotations

from typing import Any

import torch

from int8pass import fx_pass, weights
from int8pass.options import Options
from int8pass.report import log, new_report

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def llmint8(gm: torch.fx.GraphModule, example_inputs, *, options: dict[str, Any] | None = None, mode: str | None = None):
    """torch.compile backend: `torch.compile(model, backend="llmint8", options={...})`."""
    import int8pass.ops  # noqa: F401  (registers the custom ops)
    import lowering
    from torch._inductor.compile_fx import compile_fx

    opts = Options.parse(options)
    if mode is not None and mode not in MODES:
        raise ValueError(f"llmint8: unknown mode {mode!r}; accepted: {', '.join(MODES)}")
    config_patches = dict(torch._inductor.list_mode_options(mode)) if mode not in (None, "default") else {}
    config_patches.update(opts.inductor)

    report = new_report()
    result = fx_pass.rewrite_linears(gm, example_inputs, opts, report)
    for qweight in result.quantized:  # the kernels' weight layout, chosen once now (the weights are constants)
        lowering.prepare_weight(qweight.weight_q)
    compiled = compile_fx(gm, example_inputs, config_patches=config_patches, decompositions=lowering.decompositions())
    for param, name in result.releasable.values():
        report.released_bytes += weights.release_fp_storage(param, name)
    log.info("llmint8 graph %d: %d/%d linears rewritten, %d fp weight bytes released\n%s",
             report.graph_id, len(report.rewritten), len(report.layers), report.released_bytes, report.table())
    return compiled
