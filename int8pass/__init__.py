"""int8pass: LLM.int8() as a torch.compile backend.

    model = torch.compile(model, backend="llmint8")

The backend is registered under the `torch_dynamo_backends` entry point, so importing int8pass is optional.
"""

from int8pass import ops  # noqa: F401  (registers the llmint8 custom ops)
from int8pass.backend import llmint8
from int8pass.options import Options
from int8pass.report import CompileReport, LayerRecord, clear_reports, last_report, reports
from int8pass.stats import LayerStats, outlier_stats, reset_stats, stats_table

__all__ = [
    "llmint8", "Options", "CompileReport", "LayerRecord", "reports", "last_report", "clear_reports",
    "LayerStats", "outlier_stats", "reset_stats", "stats_table",
]
