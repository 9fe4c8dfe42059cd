"""Hugging Face transformers: load checkpoints straight into int8, save them in the bitsandbytes layout.

- `int8pass.from_pretrained(path, dtype=torch.bfloat16, **options)`: the model class the checkpoint's config names,
  built on the meta device by transformers, its safetensors shards streamed tensor by tensor, each eligible linear
  weight quantized as it arrives (the floating-point model never exists in memory). A bitsandbytes LLM.int8()
  checkpoint (`weight` int8 + `SCB` + `weight_format`) loads as it is.
- `int8pass.save_pretrained(model, path)`: that bitsandbytes layout, with a config.json whose quantization_config a
  transformers + bitsandbytes user can load (`load_in_8bit`), so models move both ways. Block-mode weights
  (block_size, docs/design.md §1b) have no bitsandbytes equivalent: they are saved as `weight` int8 + `weight_block_scale`
  bf16 [N, ceil(K / block_size)] under quant_method "int8pass", which int8pass.from_pretrained loads.
- transformers' own convention: `AutoModelForCausalLM.from_pretrained(path, quantization_config=Int8PassConfig())`
  (registered under quant_method "int8pass" when this module is imported).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from int8pass import process_memory, rules, tensor_parallel
from int8pass.int8_weight import Int8Weight
from int8pass.options import DEFAULT_THRESHOLD, OUTPUT_HEADS
from int8pass.quantize import load_options, quantize_model
from int8pass.report import log

try:
    from transformers import AutoConfig
    from transformers.core_model_loading import ConversionOps
    from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
    from transformers.utils.quantization_config import QuantizationConfigMixin
except ImportError as error:  # transformers is an optional extra
    raise ImportError("int8pass.from_pretrained / save_pretrained need transformers (pip install 'int8pass[models]')") from error

QUANT_METHOD = "int8pass"
# bitsandbytes' serialized row-major layout (bitsandbytes.utils: 0 == "row")
ROW_MAJOR = 0


class Int8PassConfig(QuantizationConfigMixin):
    """quantization_config for transformers' `from_pretrained`: LLM.int8() weights as int8pass.Int8Weight.

    The options of `int8pass.quantize_`: threshold (None: the mode's default), skip_modules (module names: exact, a
    prefix ending in '.', or fnmatch patterns; they are saved in config.json, so no predicates), min_features, dtypes,
    keep_fp_weights, outlier_weights, block_size.
    """

    def __init__(self, threshold: float | None = None, skip_modules: list[str] | None = None,
                 min_features: int = 0, dtypes=None, keep_fp_weights: bool = False,
                 outlier_weights: str = "dequantized", block_size: int = 0, **kwargs):
        skip_modules = list(OUTPUT_HEADS if skip_modules is None else skip_modules)
        if not all(isinstance(rule, str) for rule in skip_modules):
            raise ValueError("int8pass.from_pretrained: skip_modules takes module names or patterns (they are saved "
                             "in config.json); for a predicate, load the model, then call int8pass.quantize_")
        options = {"threshold": threshold, "skip_modules": skip_modules, "min_features": min_features,
                   "keep_fp_weights": keep_fp_weights, "outlier_weights": outlier_weights, "block_size": block_size}
        if dtypes is not None:
            options["dtypes"] = dtypes
        self.options = load_options(options)
        self.quant_method = QUANT_METHOD
        self.threshold = rules.new_weight_threshold(self.options)
        self.skip_modules = skip_modules
        self.min_features = min_features
        self.dtypes = [str(dtype).replace("torch.", "") for dtype in self.options.dtypes]
        self.keep_fp_weights = keep_fp_weights
        self.outlier_weights = outlier_weights
        self.block_size = rules.new_weight_block_size(self.options)

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "threshold": self.threshold, "skip_modules": self.skip_modules,
                "min_features": self.min_features, "dtypes": self.dtypes, "keep_fp_weights": self.keep_fp_weights,
                "outlier_weights": self.outlier_weights, "block_size": self.block_size}

    @classmethod
    def from_bitsandbytes(cls, config: dict[str, Any]) -> "Int8PassConfig":
        """Ours for a checkpoint saved by bitsandbytes' LLM.int8() (or by save_pretrained below)."""
        if not config.get("load_in_8bit"):
            raise ValueError("int8pass loads bitsandbytes checkpoints saved with load_in_8bit=True (LLM.int8()), "
                             f"not this one: {config}")
        skip = config.get("llm_int8_skip_modules")
        return cls(threshold=config.get("llm_int8_threshold", DEFAULT_THRESHOLD),
                   skip_modules=list(OUTPUT_HEADS) if skip is None else skip)


def checkpoint_config(model: torch.nn.Module) -> dict[str, Any]:
    """The quantization_config saved with a model's int8 weights as they are: their threshold and the linear layers
    left in floating point, as transformers + bitsandbytes read it (BitsAndBytesConfig(load_in_8bit=True)); for
    block-mode weights, int8pass's own (Int8PassConfig), with their block_size."""
    weights = [value for value in model.state_dict().values() if isinstance(value, Int8Weight)]
    thresholds = {weight.threshold for weight in weights}
    block_sizes = {weight.block_size for weight in weights}
    skipped = sorted({name for name, module in model.named_modules()
                      if rules.linear_weight_orientation(module) is not None and not isinstance(module.weight, Int8Weight)})
    if block_sizes - {0}:
        if len(block_sizes) > 1:
            raise ValueError(f"int8pass: the model's int8 weights mix block sizes {sorted(block_sizes)} (0: one scale "
                             "per row); a checkpoint records one")
        threshold = thresholds.pop() if len(thresholds) == 1 else None
        return Int8PassConfig(threshold=threshold, skip_modules=skipped, block_size=block_sizes.pop()).to_dict()
    return {"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False,
            "llm_int8_threshold": thresholds.pop() if len(thresholds) == 1 else DEFAULT_THRESHOLD,
            "llm_int8_skip_modules": skipped, "llm_int8_has_fp16_weight": False,
            "llm_int8_enable_fp32_cpu_offload": False}


class QuantizeWeight(ConversionOps):
    """transformers' loader calls this with each floating-point linear weight as it is read."""

    def __init__(self, hf_quantizer: "Int8PassQuantizer"):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, model=None, full_layer_name=None, **kwargs):
        options = self.hf_quantizer.quantization_config.options
        result = {}
        for name, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            module_name = name.rpartition(".")[0]
            module = model.get_submodule(module_name)
            transposed = bool(rules.linear_weight_orientation(module))
            placeholder = model.get_parameter_or_buffer(name)
            distributed = tensor_parallel.is_distributed(placeholder)  # tp_plan: `value` is this rank's slice
            shard = tensor_parallel.WeightShard.of(name, placeholder, transposed) if distributed else None
            # the rules again, now on the values (param_needs_quantization saw the meta placeholder)
            reason = rules.weight_skip_reason(module_name, value, value.shape[0 if transposed else 1], options)
            if shard is not None:
                reason = tensor_parallel.agree_skip_reason(reason, shard)
            if reason:
                log.warning("llmint8: %s stays in floating point: %s", module_name, reason)
                result[name] = torch.nn.Parameter(value, requires_grad=False)
                continue
            # a view of the mmap'd file when no cast was needed: read, never written
            int8 = tensor_parallel.quantize(value, shard, threshold=rules.new_weight_threshold(options),
                                            transposed=transposed, keep_original=rules.keeps_original(options, False),
                                            block_size=rules.new_weight_block_size(options))
            result[name] = torch.nn.Parameter(int8, requires_grad=False)
            if distributed:
                tensor_parallel.adopt(module, result[name], shard)
                # `value` was copied from the file's pages, which stay resident: the whole weight's, for columns
                process_memory.release_file_pages(".safetensors")
        process_memory.return_freed_heap()  # the quantization's temporaries: the next weight must not add to them
        return result


class LoadBitsAndBytesWeight(ConversionOps):
    """transformers' loader calls this with a bitsandbytes int8 weight's tensors: weight (CB), SCB, weight_format; or
    with a block-mode weight's: weight and weight_block_scale."""

    def __init__(self, hf_quantizer: "Int8PassQuantizer"):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, model=None, full_layer_name=None, **kwargs):
        if len(input_dict) == 1:  # a floating-point weight (a skipped module) under the same name pattern
            return input_dict
        values = {key: value[0] if isinstance(value, list) else value for key, value in input_dict.items()}
        layout = values.get("weight_format")
        if layout is not None and int(layout) != ROW_MAJOR:
            raise ValueError(f"{full_layer_name}: bitsandbytes weight_format {int(layout)} is not row-major; "
                             "only row-major int8 checkpoints load")
        module = model.get_submodule(full_layer_name.rpartition(".")[0])
        placeholder = model.get_parameter_or_buffer(full_layer_name)  # on the meta device, in the load dtype
        config = self.hf_quantizer.quantization_config
        block_scale = values.get("weight_block_scale")
        if block_scale is not None and not config.block_size:
            raise ValueError(f"{full_layer_name}: the checkpoint holds block scales but its quantization_config has no "
                             "block_size")
        int8 = Int8Weight.from_codes(values["weight"], values["SCB"] if block_scale is None else block_scale,
                                     dtype=self.hf_quantizer.dtype or placeholder.dtype,
                                     transposed=bool(rules.linear_weight_orientation(module)),
                                     threshold=config.threshold, block_size=0 if block_scale is None else config.block_size)
        return {"weight": torch.nn.Parameter(int8, requires_grad=False)}

    @property
    def reverse_op(self) -> ConversionOps:
        return KeepBitsAndBytesLayout()


class KeepBitsAndBytesLayout(ConversionOps):
    """The reverse of LoadBitsAndBytesWeight when transformers saves: the quantizer's state dict (below) already is
    the bitsandbytes layout."""

    def convert(self, input_dict, **kwargs):
        return input_dict


class Int8PassQuantizer(HfQuantizer):
    """Loads linear weights as int8pass.Int8Weight: quantized on the fly from floating-point checkpoints, as they
    are from bitsandbytes int8 ones. Saves the bitsandbytes layout."""

    requires_calibration = False
    serialized_names = {"weight": ["weight", "SCB", "weight_format", "weight_block_scale"]}

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.dtype = None

    def update_dtype(self, dtype):
        self.dtype = dtype
        return dtype

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module_name, _, name = param_name.rpartition(".")
        module = model.get_submodule(module_name)
        transposed = rules.linear_weight_orientation(module)
        if name != "weight" or transposed is None:
            return False
        weight = module.weight
        in_features = weight.shape[0 if transposed else 1]
        return not rules.weight_skip_reason(module_name, weight, in_features, self.quantization_config.options)

    def get_quantize_ops(self):
        return QuantizeWeight(self)

    def get_load_operations(self):
        return {"deserialize": LoadBitsAndBytesWeight}

    def _process_model_after_weight_loading(self, model, **kwargs):
        # a linear weight tied to another module's (an output head tied to the input embedding) was read as that
        # module's, which is no linear: quantized now as quantize_ does it, the exact values kept for the embedding;
        # quantize_model then settles the process's memory (the weights cast to the load dtype, quantized and freed)
        quantize_model(model, self.quantization_config.options, tied_only=True)
        # what save_pretrained writes: the bitsandbytes layout and config (block mode: int8pass's)
        model.config.quantization_config = checkpoint_config(model)
        return model

    def get_state_dict_and_metadata(self, model):
        return checkpoint_state_dict(model), {}

    def is_serializable(self, safe_serialization=None):
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def checkpoint_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """model.state_dict() with each Int8Weight as bitsandbytes writes it: `weight` int8 [N, K], `SCB` fp32 [N],
    `weight_format` uint8 0 (row-major); a block-mode one as `weight` and `weight_block_scale` bf16 [N, blocks].
    A tensor-parallel model's int8 weights are gathered whole (every rank calls this, as transformers'
    save_pretrained does). A weight tied to a module that is no linear (an output head tied to the input embedding)
    is written in floating point, as that module reads it: from_pretrained quantizes the head again."""
    read_in_fp = {id(module.weight) for module in model.modules()
                  if isinstance(getattr(module, "weight", None), Int8Weight)
                  and rules.linear_weight_orientation(module) is None}
    tied = {key for key, param in model.named_parameters(remove_duplicate=False) if id(param) in read_in_fp}
    state = {}
    for key, value in model.state_dict().items():
        if key in tied:
            state[key] = value.values()
        elif isinstance(value, Int8Weight):
            prefix = key[: -len("weight")]  # "model.layers.0.mlp.up_proj." (or "" for a bare linear)
            shard = tensor_parallel.shard_of(model.get_submodule(prefix[:-1])) if prefix else None
            codes, scale = (value.codes, value.scale) if shard is None else tensor_parallel.gather(value, shard)
            state[key] = codes
            if value.block_size:
                state[prefix + "weight_block_scale"] = scale
                continue
            state[prefix + "SCB"] = scale
            state[prefix + "weight_format"] = torch.tensor(ROW_MAJOR, dtype=torch.uint8)
        else:
            state[key] = value
    return state


if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:  # registration is global and refuses a second time
    register_quantization_config(QUANT_METHOD)(Int8PassConfig)
    register_quantizer(QUANT_METHOD)(Int8PassQuantizer)


def from_pretrained(path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16, **options):
    """A transformers model from a checkpoint folder, with its eligible linear weights as Int8Weights.

    Options: threshold, skip_modules, min_features, dtypes, keep_fp_weights, outlier_weights, block_size (as
    quantize_'s).
    Other keyword arguments go to transformers' from_pretrained (e.g. `revision`, `attn_implementation`, and
    `tp_plan="auto"` under torchrun: each rank reads and quantizes only its slice of each linear, docs/design.md §1c;
    floating-point checkpoints only).
    """
    import transformers

    option_names = ("threshold", "skip_modules", "min_features", "dtypes", "keep_fp_weights", "outlier_weights",
                    "block_size")
    quantization = {name: options.pop(name) for name in option_names if name in options}
    if options.get("tp_plan") is not None and "distributed_config" not in options:
        # transformers' own spelling now (a bare tp_plan is deprecated there): the same plan, without the warning
        options["distributed_config"] = transformers.DistributedConfig(tp_plan=options.pop("tp_plan"),
                                                                       tp_size=options.pop("tp_size", None))
    config = AutoConfig.from_pretrained(path)
    saved = getattr(config, "quantization_config", None)
    if saved is not None:
        if any(options.get(name) is not None for name in ("tp_plan", "tp_size", "distributed_config")):
            # transformers' loader slices every tensor stored under a planned weight like it, and SCB (one scale per
            # row) and weight_format (a scalar) have fewer dimensions
            raise ValueError(f"{path} holds int8 weights: int8pass.from_pretrained splits floating-point checkpoints "
                             "over tensor-parallel ranks (each rank quantizes its slice), not int8 ones; load the "
                             "floating-point checkpoint with tp_plan, or this one in a single process")
        saved = saved if isinstance(saved, dict) else saved.to_dict()
        if saved.get("quant_method") == "bitsandbytes":
            base = Int8PassConfig.from_bitsandbytes(saved).to_dict()
        elif saved.get("quant_method") == QUANT_METHOD:
            base = saved
        else:
            raise ValueError(f"{path} is quantized with {saved.get('quant_method')!r}; int8pass loads floating-point "
                             "and bitsandbytes LLM.int8() checkpoints")
        config.quantization_config = {**base, **quantization, "quant_method": QUANT_METHOD}
        quantization_config = None
    else:
        quantization_config = Int8PassConfig(**quantization)
    architectures = getattr(config, "architectures", None) or []
    model_class = next((getattr(transformers, name) for name in architectures if hasattr(transformers, name)), None)
    if model_class is None:
        raise ValueError(f"{path}: its config names no transformers model class ({architectures})")
    return model_class.from_pretrained(path, config=config, dtype=dtype, quantization_config=quantization_config,
                                       **options)


def save_pretrained(model, path: str | os.PathLike, **kwargs) -> None:
    """Save a transformers model whose linear weights are Int8Weights (loaded by from_pretrained, or converted by
    torch.compile(model, backend="llmint8")) in the bitsandbytes LLM.int8() layout (block mode: int8pass's, see the
    module docstring). Keyword arguments go to transformers' save_pretrained (e.g. `max_shard_size`)."""
    if not any(isinstance(value, Int8Weight) for value in model.state_dict().values()):
        raise ValueError("int8pass.save_pretrained: the model has no int8 weights; use model.save_pretrained")
    previous = getattr(model.config, "quantization_config", None)
    model.config.quantization_config = checkpoint_config(model)
    try:
        model.save_pretrained(path, state_dict=checkpoint_state_dict(model), **kwargs)
    finally:
        if previous is None:
            del model.config.quantization_config
        else:
            model.config.quantization_config = previous
