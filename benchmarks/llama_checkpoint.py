"""A random-weight Llama-architecture bf16 checkpoint on disk, in transformers' sharded safetensors layout, written
tensor by tensor (so a checkpoint larger than RAM can be written): N(0, 0.02) weights, RMSNorm gains of 1 with 3
dims at 25, which gives every projection's input the few large "emergent feature" columns LLM.int8() is about."""

from __future__ import annotations

import json
from pathlib import Path

import torch

OUTLIER_GAIN = 25.0


def outlier_dims(hidden: int) -> list[int]:
    return [7, hidden // 3, hidden // 2]


def write(path: Path, *, layers: int, hidden: int, ffn: int, vocab: int, heads: int | None = None,
          kv_heads: int | None = None, shard_bytes: int = 2 * 2**30, seed: int = 0) -> Path:
    """Write the checkpoint to `path` (skipped when its config.json exists); returns `path`."""
    import transformers
    from safetensors.torch import save_file

    path = Path(path)
    if (path / "config.json").exists():
        return path
    heads = heads or max(1, hidden // 128)
    config = transformers.LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=ffn,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads or max(1, heads // 4),
                                      vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False,
                                      dtype="bfloat16", architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in transformers.LlamaForCausalLM(config).state_dict().items()}
    path.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    weight_map, shard, shard_size, total = {}, {}, 0, 0

    def flush():
        nonlocal shard, shard_size
        if shard:
            name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
            save_file(shard, path / name, metadata={"format": "pt"})
            weight_map.update({key: name for key in shard})
            shard, shard_size = {}, 0

    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=torch.bfloat16)
            tensor[outlier_dims(shape[0])] = OUTLIER_GAIN
        else:
            tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        nbytes = tensor.numel() * 2
        if shard_size and shard_size + nbytes > shard_bytes:
            flush()
        shard[name], shard_size, total = tensor, shard_size + nbytes, total + nbytes
    flush()
    count = len(set(weight_map.values()))
    renamed = {old: f"model-{int(old[6:11]):05d}-of-{count:05d}.safetensors" for old in set(weight_map.values())}
    for old, new in renamed.items():
        (path / old).rename(path / new)
    index = {"metadata": {"total_size": total}, "weight_map": {k: renamed[v] for k, v in weight_map.items()}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(path)  # last: its presence marks a complete checkpoint
    return path
