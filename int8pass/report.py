"""What the pass did to each linear of each compiled graph, as data and as a table."""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from dataclasses import asdict, dataclass, field

from int8pass import logging_api

log = logging.getLogger("int8pass")
logging_api.register_with_torch_logs("int8pass")


@dataclass
class LayerRecord:
    name: str  # the layer's path in the compiled module (named_modules()), e.g. "model.layers.0.mlp.up_proj";
    # "" where the module tree cannot name it (int8pass/layer_names.py)
    weight: str  # the weight's path in that module ("lm_head.weight"; a tied one: "model.embed_tokens.weight"), or
    # Dynamo's expression for it where no module holds it
    op: str  # the matched graph op: linear, addmm, mm, matmul
    out_features: int
    in_features: int
    dtype: str
    rewritten: bool
    reason: str  # why it was skipped; empty when rewritten
    weight_bytes_before: int
    weight_bytes_after: int  # int8 codes + fp32 scales for rewritten layers (shared weights: counted once)


@dataclass
class CompileReport:
    graph_id: int
    layers: list[LayerRecord] = field(default_factory=list)
    released_bytes: int = 0  # fp weight storage freed after this graph was compiled
    float32_attention: int = 0  # bf16/fp16 CPU attention calls computed in float32 (option cpu_attention)
    decode_attention: int = 0  # of those, the calls run by llmint8::cpu_decode_attention (one query token)
    fp_linears_on_cpu_kernel: list[str] = field(default_factory=list)  # linears kept in bf16/fp16 that run
    # llmint8::cpu_fp_linear (a few rows on the CPU, option cpu_fp_linears): their layer names
    linear_groups: list[list[str]] = field(default_factory=list)  # rewritten linears computed together, one
    # llmint8::linear_group (block mode: block_linear_group) each, as they share their input (e.g. q/k/v): each
    # group's layer names

    @property
    def rewritten(self) -> list[LayerRecord]:
        return [layer for layer in self.layers if layer.rewritten]

    @property
    def skipped(self) -> list[LayerRecord]:
        return [layer for layer in self.layers if not layer.rewritten]

    def as_dicts(self) -> list[dict]:
        return [asdict(layer) for layer in self.layers]

    def table(self) -> str:
        header = ("layer", "op", "N x K", "dtype", "status", "bytes before", "bytes after")
        rows = [
            (
                layer.name or f"(no module path) {layer.weight}",
                layer.op,
                f"{layer.out_features} x {layer.in_features}",
                layer.dtype,
                "int8" if layer.rewritten else f"skipped: {layer.reason}",
                f"{layer.weight_bytes_before:,}",
                f"{layer.weight_bytes_after:,}",
            )
            for layer in self.layers
        ]
        before = sum(layer.weight_bytes_before for layer in self.layers)
        after = sum(layer.weight_bytes_after for layer in self.layers)
        rows.append(("total", "", "", "", f"{len(self.rewritten)}/{len(self.layers)} rewritten", f"{before:,}", f"{after:,}"))
        widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
        lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in (header, *rows)]
        lines.insert(1, "  ".join("-" * width for width in widths))
        return "\n".join(lines)


# A long-running process recompiles (new lengths, new models): the reports kept are bounded, the ids keep counting.
MAX_REPORTS = 256

_LOCK = threading.Lock()
_REPORTS: deque[CompileReport] = deque(maxlen=MAX_REPORTS)
_GRAPH_IDS = itertools.count()


def new_report() -> CompileReport:
    with _LOCK:
        report = CompileReport(graph_id=next(_GRAPH_IDS))
        _REPORTS.append(report)
    return report


def reports() -> list[CompileReport]:
    """The graphs compiled with the llmint8 backend in this process, in compile order: the last MAX_REPORTS."""
    with _LOCK:
        return list(_REPORTS)


def last_report() -> CompileReport:
    with _LOCK:
        if not _REPORTS:
            raise LookupError("no graph has been compiled with backend='llmint8' yet")
        return _REPORTS[-1]


def clear_reports() -> None:
    with _LOCK:
        _REPORTS.clear()
