"""Options of the llmint8 backend, validated up front with one-line errors naming the option."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import torch

from int8pass.reference import BLOCK_SIZES

# Output projections to the vocabulary stay in floating point by default, as bitsandbytes and transformers do:
# their logits feed a softmax over the whole vocabulary and are the most sensitive to quantization noise.
OUTPUT_HEADS = ("lm_head", "*.lm_head", "embed_out", "*.embed_out")
DEFAULT_THRESHOLD = 6.0
# Block mode (docs/design.md §1b) needs no outlier split: an outlier column costs only its own blocks' resolution
BLOCK_DEFAULT_THRESHOLD = 0.0
DTYPE_NAMES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
OUTLIER_WEIGHTS = ("dequantized", "original")
CPU_ATTENTION = ("auto", "float32", "native")
CPU_FP_LINEARS = ("auto", "aten")

ModulePredicate = Callable[[str], bool]


@dataclass(frozen=True)
class Options:
    """What `torch.compile(model, backend="llmint8", options={...})` accepts (docs/design.md §2).

    threshold: outlier threshold tau; columns with max |x| >= tau take the fp path. <= 0 disables outliers.
        None (the default): each int8 weight's own threshold (set when it was quantized), DEFAULT_THRESHOLD for
        the weights this compile quantizes.
    skip_modules: module names (exact, or a prefix ending in '.', or fnmatch patterns) or predicates
        `f(module_path) -> bool`; matching linears stay in floating point. Default: OUTPUT_HEADS (lm_head,
        embed_out); pass [] to rewrite those too.
    min_features: linears with in_features or out_features below this stay in floating point.
    dtypes: activation/weight dtypes to rewrite.
    outlier_weights: "dequantized" (W^ from the int8 weight, no fp copy kept) or "original" (keeps the fp
        weight for the outlier columns; costs the fp weight's memory).
    keep_fp_weights: keep each rewritten weight's floating-point tensor inside its Int8Weight (`original`), at
        its memory cost; floating-point reads of the weight then see the exact original values.
    block_size: 0 (the default: LLM.int8(), one scale per row of W and of X), or 32, 64 or 128: block mode
        (docs/design.md §1b), one scale per block of that many consecutive input features of each weight row and of
        each activation row, calibrate-free; its threshold defaults to BLOCK_DEFAULT_THRESHOLD (no outlier split).
    cpu_attention: "auto" (the default), "float32" or "native": how scaled_dot_product_attention on bf16/fp16 CPU
        tensors runs. "float32" computes it in float32 (decode calls by llmint8::cpu_decode_attention on the cache as
        it is stored, other calls on float32 casts of q, k and v), "native" leaves PyTorch's kernel, "auto" is
        "float32" on CPUs without AMX, where PyTorch's reduced-precision kernel is slow at decode
        (int8pass/attention.py).
    cpu_fp_linears: "auto" (the default) or "aten": how the linears kept in floating point (the output head, by
        default) run on the CPU. "auto": in bf16/fp16 for up to lowering/cpu_linear.FP_LINEAR_MAX_ROWS rows
        (decode), by llmint8::cpu_fp_linear, float32 sums like PyTorch's but reading the weight at the memory's speed,
        where PyTorch's bf16 matmul reorders it on every call; "aten" leaves them to PyTorch (int8pass/fx_pass.py).
    stats: collect runtime outlier statistics per layer (int8pass.outlier_stats(); cost in int8pass/stats.py).
    dump_dir: directory for graph/report dumps (default: $INT8PASS_DUMP_DIR if set).
    inductor: extra Inductor config patches, passed through to compile_fx.
    """

    threshold: float | None = None
    skip_modules: tuple[str | ModulePredicate, ...] = OUTPUT_HEADS
    min_features: int = 0
    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
    outlier_weights: str = "dequantized"
    keep_fp_weights: bool = False
    block_size: int = 0
    cpu_attention: str = "auto"
    cpu_fp_linears: str = "auto"
    stats: bool = False
    dump_dir: str | None = None
    inductor: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, options: dict[str, Any] | None) -> "Options":
        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise ValueError(f"llmint8 options must be a dict, got {type(options).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"llmint8: unknown option {unknown[0]!r}; accepted: {', '.join(sorted(known))}")
        values = dict(options)
        parsed = cls(
            threshold=_threshold(values.get("threshold")),
            skip_modules=_skip_modules(values.get("skip_modules", OUTPUT_HEADS)),
            min_features=_non_negative_int("min_features", values.get("min_features", 0)),
            dtypes=_dtypes(values.get("dtypes", cls.dtypes)),
            outlier_weights=_choice("outlier_weights", values.get("outlier_weights", "dequantized"), OUTLIER_WEIGHTS),
            keep_fp_weights=_bool("keep_fp_weights", values.get("keep_fp_weights", False)),
            block_size=_choice("block_size", values.get("block_size", 0), (0, *BLOCK_SIZES)),
            cpu_attention=_choice("cpu_attention", values.get("cpu_attention", "auto"), CPU_ATTENTION),
            cpu_fp_linears=_choice("cpu_fp_linears", values.get("cpu_fp_linears", "auto"), CPU_FP_LINEARS),
            stats=_bool("stats", values.get("stats", False)),
            dump_dir=_dump_dir(values.get("dump_dir", os.environ.get("INT8PASS_DUMP_DIR"))),
            inductor=_inductor(values.get("inductor", {})),
        )
        if parsed.block_size and parsed.outlier_weights == "original":
            raise ValueError("llmint8 option outlier_weights='original' applies to LLM.int8()'s row scales, not to "
                             "block_size: block mode multiplies its outlier columns by the dequantized weight")
        return parsed

    def skip_reason(self, module_path: str) -> str:
        """Why skip_modules leaves this module in floating point, or "" if it does not."""
        from fnmatch import fnmatchcase

        for rule in self.skip_modules:
            if callable(rule):
                matched = rule(module_path)
            else:
                matched = module_path == rule or (rule.endswith(".") and module_path.startswith(rule)) or fnmatchcase(module_path, rule)
            if matched:
                if self.skip_modules == OUTPUT_HEADS:
                    return "output head, skipped by default as in bitsandbytes (skip_modules=[] rewrites it)"
                return "skipped by option skip_modules"
        return ""


def _threshold(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"llmint8 option 'threshold' must be a number (not NaN), got {value!r}")
    return float(value)


def _non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"llmint8 option {name!r} must be an int >= 0, got {value!r}")
    return value


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"llmint8 option {name!r} must be True or False, got {value!r}")
    return value


def _choice(name: str, value: Any, accepted: tuple) -> Any:
    if value not in accepted:
        raise ValueError(f"llmint8 option {name!r} must be one of {', '.join(map(repr, accepted))}, got {value!r}")
    return value


def _skip_modules(value: Any) -> tuple[str | ModulePredicate, ...]:
    items = (value,) if isinstance(value, str) or callable(value) else value
    if not isinstance(items, (list, tuple, set, frozenset)) or not all(
        isinstance(item, str) or callable(item) for item in items
    ):
        raise ValueError(
            f"llmint8 option 'skip_modules' must be a module name, a predicate, or a list of them, got {value!r}"
        )
    return tuple(items)


def _dtypes(value: Any) -> tuple[torch.dtype, ...]:
    items = (value,) if isinstance(value, (str, torch.dtype)) else value
    accepted = ", ".join(DTYPE_NAMES)
    if not isinstance(items, (list, tuple, set, frozenset)) or not items:
        raise ValueError(f"llmint8 option 'dtypes' must be a non-empty list of {accepted}, got {value!r}")
    dtypes = []
    for item in items:
        dtype = DTYPE_NAMES.get(item) if isinstance(item, str) else item
        if dtype not in DTYPE_NAMES.values():
            raise ValueError(f"llmint8 option 'dtypes' accepts {accepted}, got {item!r}")
        dtypes.append(dtype)
    return tuple(dtypes)


def _dump_dir(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise ValueError(f"llmint8 option 'dump_dir' must be a path, got {value!r}")
    return str(value)


def _inductor(value: Any) -> dict[str, Any]:
    from int8pass.lowering import inductor_api

    if not isinstance(value, dict):
        raise ValueError(f"llmint8 option 'inductor' must be a dict of Inductor config patches, got {value!r}")
    valid = inductor_api.config_keys()
    for key in value:
        if key not in valid:
            raise ValueError(f"llmint8 option 'inductor' has an unknown Inductor config key {key!r}")
    return dict(value)
