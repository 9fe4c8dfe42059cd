"""The `llmint8` torch.compile backend: our FX pass, then Inductor with our lowerings."""

from __future__ import annotations

from typing import Any

import torch

import lowering
from int8pass import fx_pass, inspect, weights
from int8pass.options import Options
from int8pass.report import log, new_report

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def llmint8(gm: torch.fx.GraphModule, example_inputs, *, options: dict[str, Any] | None = None, mode: str | None = None):
    """torch.compile backend: `torch.compile(model, backend="llmint8", options={...})`."""
    from torch._inductor.compile_fx import compile_fx

    opts = Options.parse(options)
    if mode is not None and mode not in MODES:
        raise ValueError(f"llmint8: unknown mode {mode!r}; accepted: {', '.join(MODES)}")
    config_patches = dict(torch._inductor.list_mode_options(mode)) if mode not in (None, "default") else {}
    # Inductor's on-disk graph caches key on the graph and its config, not on our lowerings: a hit could
    # return code from another int8pass version (seen on torch 2.11). Kernel-level caches stay on.
    config_patches["fx_graph_cache"] = False
    config_patches.update(opts.inductor)

    report = new_report()
    before = inspect.readable(gm) if opts.dump_dir else ""
    result = fx_pass.rewrite_linears(gm, example_inputs, opts, report)
    if opts.dump_dir:
        config_patches.update(inspect.inductor_trace_patches(opts.dump_dir, report))
    with torch._inductor.config.patch(config_patches):  # the kernels' weight layout, chosen once (a constant)
        for _, _, qweight in result.quantized:
            lowering.prepare_weight(qweight.weight_q)
    compiled = compile_fx(gm, example_inputs, config_patches=config_patches, decompositions=lowering.decompositions())
    for param, name in result.releasable.values():
        report.released_bytes += weights.release_fp_storage(param, name)
    if opts.dump_dir:
        log.info("llmint8 graph %d dumped to %s", report.graph_id,
                 inspect.write_dump(opts.dump_dir, report, before, inspect.readable(gm)))
    log.info("llmint8 graph %d: %d/%d linears rewritten, %d fp weight bytes released\n%s",
             report.graph_id, len(report.rewritten), len(report.layers), report.released_bytes, report.table())
    return _refreshing(compiled, result, config_patches)


def _refreshing(compiled, result: fx_pass.RewriteResult, config_patches: dict):
    """Wrap the compiled graph so a weight changed after compiling (in place, `.data =`) is re-quantized before
    the call instead of silently running on stale int8 codes. Costs a few attribute reads per weight."""
    if not result.quantized:
        return compiled

    def run(*args):
        for param, stored_transposed, qweight in result.quantized:
            if not weights.is_current(param, qweight) and weights.refresh(param, stored_transposed, qweight):
                log.warning("llmint8: a rewritten weight changed after compiling; re-quantized it")
                with torch._inductor.config.patch(config_patches):  # the new fp storage is the user's: it stays
                    lowering.prepare_weight(qweight.weight_q)
        return compiled(*args)

    run._boxed_call = getattr(compiled, "_boxed_call", False)
    return run
