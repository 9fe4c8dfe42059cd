"""Plot benchmarks/results/{cpu,cuda}_linear.json (from linear.py): speed-up over bf16 eager per shape and token count, per variant.

    .venv/bin/python benchmarks/plot.py       (needs matplotlib; bash tools/dev.sh bench-linear installs it)
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def plot(json_path: Path = RESULTS / "cpu_linear.json", png_path: Path = RESULTS / "cpu_linear.png") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(json_path.read_text())
    rows = data["rows"]
    shapes = sorted({(row["N"], row["K"]) for row in rows}, key=lambda shape: -shape[0] * shape[1])
    # the timed variants: those with rounds in a row's "ms" (the rest of a row are facts about it)
    variants = list(dict.fromkeys(name for row in rows for name in row["ms"] if name != "bf16 eager"))
    fig, axes = plt.subplots(1, len(shapes), figsize=(4 * len(shapes), 3.6), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, (n, k) in zip(axes, shapes):
        shape_rows = [row for row in rows if (row["N"], row["K"]) == (n, k)]
        ms = [str(row["M"]) for row in shape_rows]
        for variant in variants:
            ax.plot(ms, [row["bf16 eager"] / row[variant] if variant in row else float("nan") for row in shape_rows],
                    marker="o", label=variant, linewidth=2.5 if variant == "llmint8" else 1.2)
        ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
        ax.set_title(f"{n} x {k}")
        ax.set_xlabel("tokens M")
    axes[0].set_ylabel("speed-up over bf16 eager")
    axes[-1].legend(fontsize=8)
    fig.suptitle(f"linear layers on {data['machine'].get('device', 'cpu')}, bf16, 0.5% outlier columns, "
                 "threshold 6 (higher is faster)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    return png_path


if __name__ == "__main__":
    print(f"wrote {plot()}")
