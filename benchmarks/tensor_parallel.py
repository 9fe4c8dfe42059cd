"""Tensor parallel int8 (docs/design.md §1c): each rank's memory and the tokens/s of 1 and 2 ranks on this machine.

    python benchmarks/tensor_parallel.py          # TinyLlama's shape (22 layers, d=2048, ffn 5632, vocab 32000)
    python benchmarks/tensor_parallel.py --layers 2 --hidden 256 --ffn 512 --vocab 1000 --steps 4   # a quick check

Writes a random-weight Llama-architecture bf16 checkpoint (benchmarks/llama_checkpoint.py), then for each world size
and variant runs `torchrun --nproc-per-node W` over gloo on this machine, each rank with cores / W threads:
- memory: each rank's RSS growth over its baseline (imports, the process group up, the model built once on the meta
  device, nothing loaded) once
  `int8pass.from_pretrained(path, tp_plan="auto")` returns, against the bf16 checkpoint's bytes / W (the issue's
  target: at most 0.55 of it);
- speed: the model's forward compiled with backend="llmint8", a warm-up generate() of the same lengths first (the
  compiles), then the median of 3 timed runs: prefill tok/s from generate(max_new_tokens=1), decode tok/s from the
  extra time of generate(max_new_tokens=1 + steps).
Variants: default (output head in bf16, as bitsandbytes), int8-head (skip_modules=[]: the head in int8 too).
Results: benchmarks/results/tensor_parallel.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_checkpoint  # noqa: E402
import machine  # noqa: E402
from memory import rss_mib  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {"default": {}, "int8-head": {"skip_modules": []}}


def run_rank(checkpoint: str, variant: str, tokens: int, steps: int) -> None:
    """One rank under torchrun: load, measure, generate; rank 0 prints every rank's figures as one JSON line."""
    import torch
    import torch.distributed as dist

    import int8pass

    import transformers

    from int8pass import hf  # noqa: F401  (its imports belong in the baseline)

    world = int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(max(1, os.cpu_count() // world))
    dist.init_process_group("gloo")
    with torch.device("meta"):  # the model classes' imports in the baseline too
        transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(checkpoint))
    baseline = rss_mib()
    start = time.perf_counter()
    model = int8pass.from_pretrained(checkpoint, tp_plan="auto" if world > 1 else None, **VARIANTS[variant])
    load_s = time.perf_counter() - start
    loaded_mib = rss_mib() - baseline
    model.forward = torch.compile(model.forward, backend="llmint8")
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))

    def generate(new_tokens: int) -> tuple[float, torch.Tensor]:
        dist.barrier()
        begin = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return time.perf_counter() - begin, out

    start = time.perf_counter()
    generate(1)
    generate(1 + steps)
    warm_up_s = time.perf_counter() - start
    prefill = [generate(1)[0] for _ in range(3)]
    total = [generate(1 + steps) for _ in range(3)]
    decode = statistics.median(t for t, _ in total) - statistics.median(prefill)
    row = {"rank": dist.get_rank(), "loaded_mib": round(loaded_mib, 1), "steady_mib": round(rss_mib() - baseline, 1),
           "load_s": round(load_s, 2), "warm_up_s": round(warm_up_s, 1),
           "prefill_tok_s": round(tokens / statistics.median(prefill), 1), "decode_tok_s": round(steps / decode, 2),
           "tokens": total[0][1][0, tokens:].tolist(), "threads": torch.get_num_threads()}
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        print(json.dumps({"world_size": world, "variant": variant, "ranks": rows}))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--world-sizes", default="1,2")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--dir", default=os.environ.get("INT8PASS_BENCH_DIR", "/tmp/int8pass-bench"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tensor_parallel"))
    parser.add_argument("--rank-run", help=argparse.SUPPRESS)  # internal: one rank of a torchrun
    args = parser.parse_args()

    checkpoint = Path(args.dir) / f"llama-{args.layers}x{args.hidden}-{args.ffn}-{args.vocab}-h{args.heads}-kv{args.kv_heads}"
    if args.rank_run:
        run_rank(str(checkpoint), args.rank_run, args.tokens, args.steps)
        return

    llama_checkpoint.write(checkpoint, layers=args.layers, hidden=args.hidden, ffn=args.ffn, vocab=args.vocab,
                           heads=args.heads, kv_heads=args.kv_heads, shard_bytes=300 * 2**20)
    bf16_bytes = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
    runs = []
    for variant in args.variants.split(","):
        for world in (int(w) for w in args.world_sizes.split(",")):
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
                       "--master-addr", "127.0.0.1", "--master-port", str(29500 + world), __file__,
                       "--rank-run", variant, "--dir", args.dir, "--layers", str(args.layers),
                       "--hidden", str(args.hidden), "--ffn", str(args.ffn), "--vocab", str(args.vocab),
                       "--heads", str(args.heads), "--kv-heads", str(args.kv_heads), "--tokens", str(args.tokens),
                       "--steps", str(args.steps)]
            with tempfile.TemporaryDirectory() as cache:  # cold compiles, as a user's first run
                done = subprocess.run(command, capture_output=True, text=True,
                                      env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "OMP_NUM_THREADS": "1"})
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode != 0 or not lines:
                print(f"{variant}, {world} ranks: failed\n{done.stderr[-3000:]}", file=sys.stderr)
                runs.append({"world_size": world, "variant": variant, "error": (done.stderr.strip().splitlines() or ["failed"])[-1]})
                continue
            runs.append(json.loads(lines[-1]))

    described = machine.describe()
    lines = [f"checkpoint: {checkpoint.name} ({bf16_bytes / 2**30:.2f} GiB bf16 safetensors), prefill {args.tokens} "
             f"tokens, {args.steps} decode steps, gloo on 127.0.0.1; {machine.summary(described)}", "",
             "| variant | ranks | threads / rank | rank | weights RSS MiB | x ranks / bf16 bytes | prefill tok/s | "
             "decode tok/s | load s | warm-up s | tokens = 1 rank's |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    single = {run["variant"]: run["ranks"][0]["tokens"] for run in runs if run.get("world_size") == 1 and "ranks" in run}
    for run in runs:
        if "error" in run:
            lines.append(f"| {run['variant']} | {run['world_size']} | | | failed: {run['error']} | | | | | | |")
            continue
        for row in run["ranks"]:
            share = row["loaded_mib"] * 2**20 * run["world_size"] / bf16_bytes
            same = single.get(run["variant"])
            lines.append(f"| {run['variant']} | {run['world_size']} | {row['threads']} | {row['rank']} | "
                         f"{row['loaded_mib']:.0f} | {share:.3f} | {row['prefill_tok_s']} | {row['decode_tok_s']} | "
                         f"{row['load_s']} | {row['warm_up_s']} | "
                         f"{'' if same is None else ('yes' if row['tokens'] == same else 'no')} |")
    print("\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"machine": described, "checkpoint": checkpoint.name,
                                                    "bf16_bytes": bf16_bytes, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
