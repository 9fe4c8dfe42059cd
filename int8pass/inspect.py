"""Dumps of what the pass did (options={"dump_dir": PATH} or INT8PASS_DUMP_DIR=PATH).

Layout, one folder per compiled graph, numbered in compile order:
    PATH/graph_000/before.py      the Dynamo FX graph as our pass received it (readable Python)
    PATH/graph_000/after.py       the same graph after the rewrite (llmint8::linear calls)
    PATH/graph_000/layers.txt     the per-layer table (rewritten or skipped and why, bytes before/after)
    PATH/graph_000/layers.json    the same as data
    PATH/graph_000/inductor/      what Inductor generated for the graph (output_code.py holds the kernels)
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from int8pass.report import CompileReport


def graph_dir(dump_dir: str, report: CompileReport) -> Path:
    path = Path(dump_dir) / f"graph_{report.graph_id:03d}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def readable(gm: torch.fx.GraphModule) -> str:
    return gm.print_readable(print_output=False)


def inductor_trace_patches(dump_dir: str, report: CompileReport) -> dict:
    """Inductor config that writes its generated code for this graph under graph_NNN/inductor/ (generated on
    every compile: a graph served by the FX graph cache would write none, so dumping turns that cache off)."""
    return {"trace.enabled": True, "trace.debug_dir": str(graph_dir(dump_dir, report) / "inductor"),
            "fx_graph_cache": False}


def write_dump(dump_dir: str, report: CompileReport, before: str, after: str) -> Path:
    path = graph_dir(dump_dir, report)
    (path / "before.py").write_text(before)
    (path / "after.py").write_text(after)
    (path / "layers.txt").write_text(report.table() + "\n")
    summary = {"graph_id": report.graph_id, "released_bytes": report.released_bytes, "layers": [asdict(l) for l in report.layers]}
    (path / "layers.json").write_text(json.dumps(summary, indent=2) + "\n")
    return path
