"""Runtime outlier statistics (options={"stats": True}): per rewritten layer, how many outlier columns each
call had and which columns recur — the paper's emergent-feature analysis for any model.

Recorded by the op implementations where the outlier set is already on the host (the CPU kernels read the
outlier count to size their gather), so collecting costs a dict update per linear per call there; a device
path would pay one device-to-host copy of the count and indices per linear per call. Off by default: then
nothing is recorded and no op does any extra work.
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
_LAYERS: list[LayerStats] = []


def register(name: str, in_features: int) -> int:
    with _LOCK:
        _LAYERS.append(LayerStats(name, in_features))
        return len(_LAYERS) - 1


def record(stats_id: int, columns: list[int]) -> None:
    if stats_id < 0:
        return
    with _LOCK:
        layer = _LAYERS[stats_id]
        layer.counts.append(len(columns))
        layer.column_calls.update(columns)


def record_indices(stats_id: int, indices, count) -> None:
    """Record an outlier set given as the ops' (index buffer, count tensor): one device-to-host copy."""
    if stats_id < 0:
        return
    record(stats_id, indices[: int(count.item())].tolist())


def record_activation(stats_id: int, x2d, threshold: float) -> None:
    """Record the outlier columns of X [M, K] (for kernels that do not expose their outlier set)."""
    if stats_id < 0:
        return
    record(stats_id, outlier_columns(x2d, threshold).nonzero().flatten().tolist())


def outlier_stats() -> list[LayerStats]:
    """Statistics of every layer compiled with stats on, in compile order."""
    with _LOCK:
        return list(_LAYERS)


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
