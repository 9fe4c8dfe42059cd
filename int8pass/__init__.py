"""int8pass: LLM.int8() as a torch.compile backend.

    model = torch.compile(model, backend="llmint8")

The backend is registered under the `torch_dynamo_backends` entry point, so importing int8pass is optional.
"""

from int8pass import lowering  # noqa: F401  (registers the llmint8 custom ops)
from int8pass.int8_weight import Int8Weight
from int8pass.backend import llmint8
from int8pass.options import Options
from int8pass.report import CompileReport, LayerRecord, clear_reports, last_report, reports
from int8pass.quantize import quantize_
from int8pass.deploy import export, extension_library, package
from int8pass.stats import LayerStats, outlier_stats, reset_stats, stats_table


def from_pretrained(path, dtype=None, **options):
    """A transformers model with int8 linear weights, loaded without the floating-point model (int8pass.hf)."""
    from int8pass import hf

    return hf.from_pretrained(path, **({} if dtype is None else {"dtype": dtype}), **options)


def save_pretrained(model, path, **kwargs) -> None:
    """Save a transformers model with int8 weights in the bitsandbytes LLM.int8() layout (int8pass.hf)."""
    from int8pass import hf

    hf.save_pretrained(model, path, **kwargs)


__all__ = [
    "llmint8", "Int8Weight", "quantize_", "export", "package", "extension_library", "from_pretrained", "save_pretrained", "Options", "CompileReport", "LayerRecord", "reports", "last_report", "clear_reports",
    "LayerStats", "outlier_stats", "reset_stats", "stats_table",
]
