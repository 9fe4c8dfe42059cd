"""Compile time of a llmint8 model in a first process and in a second one that finds Inductor's FX graph cache
written by the first (same model, a cache directory fresh for this run).

    python benchmarks/compile_cache.py      # the 4-layer d=2048 Llama checkpoint of benchmarks/memory.py's kind

Each process: int8pass.from_pretrained, torch.compile(model.forward, backend="llmint8"), one 64-token call (which
compiles); prints seconds, Inductor's cache counters and the output's sum (equal in both). Writes
benchmarks/results/compile_cache.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_checkpoint  # noqa: E402
import memory  # noqa: E402  (the machine description)

ROOT = Path(__file__).resolve().parent.parent
ONE_PROCESS = """
import json, sys, time, torch, int8pass
from torch._dynamo.utils import counters
model = int8pass.from_pretrained(sys.argv[1], dtype=torch.bfloat16).eval()
ids = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    model.forward = torch.compile(model.forward, backend="llmint8")
    started = time.perf_counter()
    logits = model(ids).logits
    seconds = time.perf_counter() - started
print(json.dumps({"compile_s": round(seconds, 2), "fxgraph_cache_hit": counters["inductor"]["fxgraph_cache_hit"],
                  "fxgraph_cache_miss": counters["inductor"]["fxgraph_cache_miss"],
                  "output_sum": float(logits.float().sum())}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dir", default=os.environ.get("INT8PASS_BENCH_DIR", "/tmp/int8pass-bench"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compile_cache.json"))
    args = parser.parse_args()
    checkpoint = llama_checkpoint.write(Path(args.dir) / f"llama-{args.layers}x2048-5632-8000", layers=args.layers,
                                        hidden=2048, ffn=5632, vocab=8000)
    runs = []
    with tempfile.TemporaryDirectory() as cache:
        for name in ("first process", "second process"):
            done = subprocess.run([sys.executable, "-c", ONE_PROCESS, str(checkpoint)], capture_output=True, text=True,
                                  env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}, check=True)
            runs.append({"run": name, **json.loads(done.stdout.strip().splitlines()[-1])})
            print(runs[-1], flush=True)
    Path(args.out).write_text(json.dumps({"machine": memory.machine(), "checkpoint": str(checkpoint), "runs": runs},
                                         indent=2) + "\n")


if __name__ == "__main__":
    main()
