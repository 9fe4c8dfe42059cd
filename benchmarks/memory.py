"""Process memory as `ps` shows it (RSS), loading a bf16 Llama checkpoint from disk and running it, per variant.

    python benchmarks/memory.py                      # 12 layers, d=2048, vocab 8000 (1.1 GiB bf16): all variants
    python benchmarks/memory.py --layers 2 --hidden 256 --ffn 512 --vocab 1000 --variants bf16,int8pass

Writes a random-weight Llama-architecture checkpoint (sharded safetensors, benchmarks/llama_checkpoint.py: RMSNorm
gains x25 in 3 dims give the emergent outlier features LLM.int8() is about), then runs each variant in its own process:
imports and a warm-up compile of a tiny model first (so Inductor's own start-up is in the baseline), then the
baseline RSS, then load, compile where the variant compiles, a 64-token prefill and 8 greedy decode steps.
Reported per variant: RSS growth over the baseline when loaded, its peak while loading, at the end (steady) and its
peak over the whole run (VmHWM, reset at the baseline), with load and compile seconds; steady and peak also as ratios
of bf16 eager's steady growth from the same run. No malloc_trim or any other help from the measuring side.

Variants:
  bf16                 transformers from_pretrained(dtype=bf16), eager
  bf16-inductor        the same model, then torch.compile(model.forward) (Inductor's own compiled state)
  llmint8              the same model, then torch.compile(model.forward, backend="llmint8")
  int8pass             int8pass.from_pretrained(path) (int8 while loading), then the same compile
  int8pass-eager       int8pass.from_pretrained(path), eager (no compile)
  bitsandbytes         transformers from_pretrained(quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                       device_map="cpu") (needs bitsandbytes and accelerate)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_checkpoint  # noqa: E402
import machine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("bf16", "bf16-inductor", "llmint8", "int8pass", "int8pass-eager", "bitsandbytes")


def rss_mib() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
        f.write("5")


def run_variant(variant: str, checkpoint: str, tokens: int, steps: int) -> dict:
    import torch
    import transformers

    import int8pass

    with torch.no_grad():  # Inductor's own start-up, outside the measured growth
        torch.compile(torch.nn.Linear(64, 64).to(torch.bfloat16).eval(), backend="llmint8")(
            torch.randn(2, 64, dtype=torch.bfloat16))
    torch._dynamo.reset()
    baseline = rss_mib()
    reset_peak()
    started = time.perf_counter()
    if variant in ("bf16", "bf16-inductor", "llmint8"):
        model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    elif variant in ("int8pass", "int8pass-eager"):
        model = int8pass.from_pretrained(checkpoint, dtype=torch.bfloat16)
    elif variant == "bitsandbytes":
        config = transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
        model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16,
                                                                  quantization_config=config, device_map="cpu")
    else:
        raise ValueError(variant)
    model.eval()
    load_s = time.perf_counter() - started
    loaded, load_peak = rss_mib() - baseline, peak_mib() - baseline
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    compile_s = 0.0
    with torch.no_grad():
        if variant in ("bf16-inductor", "llmint8", "int8pass"):
            backend = "inductor" if variant == "bf16-inductor" else "llmint8"
            model.forward = torch.compile(model.forward, backend=backend)
            started = time.perf_counter()
            model(ids)  # the first call compiles
            compile_s = time.perf_counter() - started
        started = time.perf_counter()
        out = model.generate(ids, max_new_tokens=steps, do_sample=False, min_new_tokens=steps)
        generate_s = time.perf_counter() - started
    return {
        "variant": variant, "baseline_mib": round(baseline, 1), "loaded_mib": round(loaded, 1),
        "load_peak_mib": round(load_peak, 1),
        "steady_mib": round(rss_mib() - baseline, 1), "peak_mib": round(peak_mib() - baseline, 1),
        "load_s": round(load_s, 2), "compile_s": round(compile_s, 2), "generate_s": round(generate_s, 2),
        "tokens": out.shape[1] - tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--shard-mib", type=int, default=300, help="largest safetensors shard")
    parser.add_argument("--dir", default=os.environ.get("INT8PASS_BENCH_DIR", "/tmp/int8pass-bench"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory"))
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = parser.parse_args()

    checkpoint = Path(args.dir) / f"llama-{args.layers}x{args.hidden}-{args.ffn}-{args.vocab}"
    if args.variant:
        print(json.dumps(run_variant(args.variant, str(checkpoint), args.tokens, args.steps)))
        return

    llama_checkpoint.write(checkpoint, layers=args.layers, hidden=args.hidden, ffn=args.ffn, vocab=args.vocab,
                           shard_bytes=args.shard_mib * 2**20)
    size = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
    rows = []
    for variant in args.variants.split(","):
        command = [sys.executable, __file__, "--variant", variant, "--dir", args.dir, "--layers", str(args.layers),
                   "--hidden", str(args.hidden), "--ffn", str(args.ffn), "--vocab", str(args.vocab),
                   "--tokens", str(args.tokens), "--steps", str(args.steps)]
        with tempfile.TemporaryDirectory() as cache:  # a cold compile, as a user's first: no Inductor cache
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache})
        if done.returncode != 0:
            print(f"{variant}: failed\n{done.stderr[-3000:]}", file=sys.stderr)
            rows.append({"variant": variant, "error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"})
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    described = machine.describe()
    reference = next((row for row in rows if row.get("variant") == "bf16" and "steady_mib" in row), None)
    lines = [f"checkpoint: {checkpoint} ({size / 2**30:.2f} GiB bf16 safetensors), prefill {args.tokens} tokens + "
             f"{args.steps} decode steps; {machine.summary(described)}", "",
             "| variant | loaded MiB | load peak MiB | steady MiB | peak MiB | steady / bf16 | peak / bf16 | load s | "
             "compile s | generate s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['variant']} | failed: {row['error']} | | | | | | | | |")
            continue
        ratio = (lambda v: f"{v / reference['steady_mib']:.2f}x") if reference else (lambda v: "")
        lines.append(f"| {row['variant']} | {row['loaded_mib']:.0f} | {row['load_peak_mib']:.0f} | {row['steady_mib']:.0f} | "
                     f"{row['peak_mib']:.0f} | "
                     f"{ratio(row['steady_mib'])} | {ratio(row['peak_mib'])} | {row['load_s']} | {row['compile_s']} | "
                     f"{row['generate_s']} |")
    print("\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"machine": described, "checkpoint_bytes": size, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
