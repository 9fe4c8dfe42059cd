"""Runtime outlier statistics (options={"stats": True}): per rewritten layer, how many outlier columns each
call had and which columns recur — the paper's emergent-feature analysis for any model.

Recorded by its own graph node, llmint8::record_outliers(x, threshold, layer), which the FX pass puts before each
rewritten linear only when stats are on: it finds X's outlier columns (one more pass over X) and copies them to the
host (a device-to-host copy and sync on GPUs), per linear per call. Off by default: then the graphs hold no such node
and nothing is recorded. Statistics are keyed by layer name, so graphs compiled for one layer (prefill, decode)
add to the same entry, and a graph compiled before `reset_stats()` starts a new one.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

from int8pass.reference import outlier_columns


@dataclass
class LayerStats:
    name: str
    in_features: int
    counts: list[int] = field(default_factory=list)  # outlier columns per call
    column_calls: Counter = field(default_factory=Counter)  # column -> number of calls it was an outlier in

    @property
    def calls(self) -> int:
        return len(self.counts)

    def recurring(self, top: int = 8) -> list[tuple[int, float]]:
        """The most frequent outlier columns with the fraction of calls they appeared in."""
        return [(col, hits / max(1, self.calls)) for col, hits in self.column_calls.most_common(top)]


_LOCK = threading.Lock()
_LAYERS: dict[str, LayerStats] = {}


def record(layer: str, x, threshold: float) -> None:
    """Record the outlier columns of X [..., K] for `layer`."""
    in_features = x.shape[-1]
    columns = outlier_columns(x.reshape(-1, in_features), threshold).nonzero().flatten().tolist()
    with _LOCK:
        stats = _LAYERS.setdefault(layer, LayerStats(layer, in_features))
        stats.counts.append(len(columns))
        stats.column_calls.update(columns)


def outlier_stats() -> list[LayerStats]:
    """Statistics of every layer that ran with stats on since the last reset, in the order they first ran."""
    with _LOCK:
        return list(_LAYERS.values())


def reset_stats() -> None:
    with _LOCK:
        _LAYERS.clear()


def stats_table(top: int = 5) -> str:
    rows = [("layer", "calls", "mean cols", "max cols", "% of K", f"top {top} recurring columns (share of calls)")]
    for layer in outlier_stats():
        if not layer.calls:
            continue
        mean = sum(layer.counts) / layer.calls
        rows.append((
            layer.name,
            str(layer.calls),
            f"{mean:.1f}",
            str(max(layer.counts)),
            f"{100 * mean / max(1, layer.in_features):.2f}",
            " ".join(f"{col}({share:.0%})" for col, share in layer.recurring(top)),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
