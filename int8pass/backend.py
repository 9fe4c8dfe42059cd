"""The `llmint8` torch.compile backend: our FX pass, then Inductor with our lowerings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from int8pass import lowering
from int8pass.lowering import inductor_api as inductor
from int8pass import attention, fx_pass, inspect, process_memory
from int8pass.options import Options
from int8pass.report import log, new_report

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SOURCE_KEY = inductor.SourceKey([str(path) for root in (Path(__file__).parent, Path(lowering.__file__).parent)
                                 for path in root.glob("*.py")], lowering.cpu_path)


def llmint8(gm: torch.fx.GraphModule, example_inputs, *, options: dict[str, Any] | None = None, mode: str | None = None):
    """torch.compile backend: `torch.compile(model, backend="llmint8", options={...})`."""
    opts = Options.parse(options)
    if mode is not None and mode not in MODES:
        raise ValueError(f"llmint8: unknown mode {mode!r}; accepted: {', '.join(MODES)}")
    config_patches = inductor.mode_options(mode) if mode not in (None, "default") else {}
    config_patches.update(opts.inductor)
    # Inductor's on-disk graph cache keys on the graph and its config, not on our lowerings and kernels: SOURCE_KEY, a
    # pass that changes nothing, adds a hash of int8pass's sources to the key. Where the user's own pass holds that
    # slot, the cache stays off for these graphs rather than risk serving one built by another int8pass.
    if config_patches.get("post_grad_custom_post_pass", inductor.config.post_grad_custom_post_pass) is None:
        config_patches["post_grad_custom_post_pass"] = SOURCE_KEY
    else:
        config_patches["fx_graph_cache"] = False

    report = new_report()
    before = inspect.readable(gm) if opts.dump_dir else ""
    with inductor.config.patch(config_patches):  # new int8 weights take the layout this compile reads
        fx_pass.rewrite_linears(gm, example_inputs, opts, report)
    report.float32_attention, report.decode_attention = attention.compute_in_float32(gm, opts.cpu_attention,
                                                                                     report.graph_id)
    if opts.dump_dir:
        config_patches.update(inspect.inductor_trace_patches(opts.dump_dir, report))
    compiled = inductor.compile_fx(gm, example_inputs, config_patches=config_patches)
    # what quantizing freed (floating-point weights), and Inductor's compile state: its graphs, IR and scheduler are
    # left as reference cycles (~170k objects for 4 Llama layers), which the next graph's compile should reuse
    process_memory.settle()
    if opts.dump_dir:
        log.info("llmint8 graph %d dumped to %s", report.graph_id,
                 inspect.write_dump(opts.dump_dir, report, before, inspect.readable(gm)))
    log.info("llmint8 graph %d: %d/%d linears rewritten, %d fp weight bytes replaced by int8\n%s",
             report.graph_id, len(report.rewritten), len(report.layers), report.released_bytes, report.table())
    return compiled
