"""LLM.int8()'s headline on this machine: a bf16 checkpoint larger than the machine's RAM, loaded with int8pass,
compiled, and run.

    python benchmarks/big_model.py                 # 44 layers of Llama-2-13B's shape: 26.6 GiB of bf16 weights
    python benchmarks/big_model.py --layers 2      # the same flow, small

Writes the random-weight checkpoint (sharded safetensors, benchmarks/llama_checkpoint.py) unless it exists, checking
the disk first; then, in this process: int8pass.from_pretrained (int8 as each weight is read), torch.compile with the
llmint8 backend, and 16 greedy tokens after a 16-token prompt, twice (the first generate compiles the decode
graphs). Prints peak and steady RSS (as `ps` shows it, no malloc_trim from here), load and compile seconds and
decode tokens/s, and writes benchmarks/results/big_model.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_checkpoint  # noqa: E402
import machine  # noqa: E402
import memory  # noqa: E402  (RSS readers)

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=44)
    parser.add_argument("--hidden", type=int, default=5120)
    parser.add_argument("--ffn", type=int, default=13824)
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--dir", default=os.environ.get("INT8PASS_BENCH_DIR", "/tmp/int8pass-bench"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "big_model"))
    args = parser.parse_args()

    params = args.layers * (4 * args.hidden**2 + 3 * args.hidden * args.ffn) + 2 * args.vocab * args.hidden
    checkpoint = Path(args.dir) / f"llama-{args.layers}x{args.hidden}-{args.ffn}-{args.vocab}"
    if not (checkpoint / "config.json").exists():
        free = shutil.disk_usage(Path(args.dir).parent if not Path(args.dir).exists() else args.dir).free
        if free < 2 * params * 1.05:
            sys.exit(f"{2 * params / 2**30:.1f} GiB checkpoint, only {free / 2**30:.1f} GiB free under {args.dir}")
        started = time.perf_counter()
        llama_checkpoint.write(checkpoint, layers=args.layers, hidden=args.hidden, ffn=args.ffn, vocab=args.vocab,
                               heads=args.heads, kv_heads=args.heads)
        print(f"wrote {checkpoint} in {time.perf_counter() - started:.0f} s", flush=True)
    size = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    # a cold compile, as a user's first: a fresh Inductor cache (read when Inductor first compiles)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="int8pass-big-")
    import torch

    import int8pass

    baseline = memory.rss_mib()
    memory.reset_peak()
    started = time.perf_counter()
    model = int8pass.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    load_s = time.perf_counter() - started
    loaded, loaded_peak = memory.rss_mib() - baseline, memory.peak_mib() - baseline
    print(f"loaded in {load_s:.0f} s: RSS +{loaded:.0f} MiB, peak +{loaded_peak:.0f} MiB", flush=True)
    ids = torch.randint(0, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.forward = torch.compile(model.forward, backend="llmint8")
        started = time.perf_counter()
        model(ids)  # compiles the prompt's graph
        compile_s = time.perf_counter() - started
        started = time.perf_counter()
        model(ids)
        prefill_s = time.perf_counter() - started
        print(f"compiled in {compile_s:.0f} s; prefill of {args.prompt} tokens {prefill_s:.1f} s", flush=True)
        started = time.perf_counter()
        out = model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
        generate_s = time.perf_counter() - started
    # the decode steps' own time: a second generate, its graphs compiled by the first
    with torch.no_grad():
        started = time.perf_counter()
        again = model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
        warm_s = time.perf_counter() - started
    assert torch.equal(out, again)
    result = {
        "checkpoint": str(checkpoint), "checkpoint_gib": round(size / 2**30, 2), "parameters": params,
        "ram_gib": round(ram / 2**30, 1), "machine": machine.describe(),
        "load_s": round(load_s, 1), "compile_s": round(compile_s, 1), "prefill_s": round(prefill_s, 2),
        "first_generate_s": round(generate_s, 1), "generate_s": round(warm_s, 1),
        # generate's first token comes from the prompt's forward: the other tokens/(time - prefill) are decode steps
        "decode_tokens_per_s": round((args.tokens - 1) / (warm_s - prefill_s), 3),
        "rss_loaded_mib": round(loaded, 0), "rss_steady_mib": round(memory.rss_mib() - baseline, 0),
        "rss_peak_mib": round(memory.peak_mib() - baseline, 0), "generated": out[0, args.prompt:].tolist(),
    }
    lines = [
        f"bf16 checkpoint: {result['checkpoint_gib']} GiB ({params / 1e9:.1f} B parameters, {args.layers} layers, "
        f"d={args.hidden}, ffn={args.ffn}); machine RAM {result['ram_gib']} GiB; {json.dumps(result['machine'])}",
        "",
        "| load s | compile s | prefill s | first generate s (compiles decode) | generate s | decode tokens/s | "
        "RSS loaded MiB | RSS steady MiB | RSS peak MiB |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {result['load_s']} | {result['compile_s']} | {result['prefill_s']} | {result['first_generate_s']} | "
        f"{result['generate_s']} | {result['decode_tokens_per_s']} | {result['rss_loaded_mib']:.0f} | "
        f"{result['rss_steady_mib']:.0f} | {result['rss_peak_mib']:.0f} |",
    ]
    print("\n".join(lines))
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out_path.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
