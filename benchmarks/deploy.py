"""Deploying without Python: an AOTInductor package of an int8 model against the bf16 package of the same model and
against torch.compile(backend="llmint8") in the process that built it.

The model is the Llama-architecture model of cpu_model.py (HF transformers from a config, bf16, emergent features in
3 hidden dims), wrapped to return its logits for input_ids without a KV cache (the form int8pass packages take; see
int8pass/deploy.py). The output head stays bf16 in the int8 variants (the default skip). Reported:
- package sizes on disk, and the time to build each package (export and AOTInductor compile);
- the load time in a fresh process (the int8 package's process loads int8pass's extension library and nothing else of
  int8pass), its first run, and that process's RSS after it;
- prefill tokens/s (a batch-1 prompt) and the time of a 1-token forward (no KV cache: the cost of one step's linears and
  head, not a decode step with attention over a context), for the two packages and the compiled model, measured in
  one process taking turns, medians;
- the int8 package's logits against the compiled model's and bf16's.
Prints a table, writes benchmarks/results/deploy.{txt,json}.

    bash tools/dev.sh bench-deploy
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.export import Dim

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_model import build_model  # noqa: E402
from machine import describe, summary  # noqa: E402

import int8pass  # noqa: E402
from int8pass.deploy import CausalLMLogits  # noqa: E402
from int8pass.lowering import inductor_api  # noqa: E402

RESULTS = Path(__file__).parent / "results"
VOCAB = 8000

# A serving process: torch, the extension library for the int8 package, the package, one run.
LOAD = """
import json, sys, time
start = time.perf_counter()
import torch
imported = time.perf_counter()
if sys.argv[1]:
    torch.ops.load_library(sys.argv[1])
def rss():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:")) / 1024
before = rss()
runner = torch._inductor.aoti_load_package(sys.argv[2])
loaded = time.perf_counter()
with torch.no_grad():
    runner(torch.zeros(1, int(sys.argv[3]), dtype=torch.long))
ran = time.perf_counter()
after = rss()
print(json.dumps({"import_torch_s": imported - start, "load_s": loaded - imported, "first_run_s": ran - loaded,
                  "rss_mib": after, "rss_growth_mib": after - before, "int8pass_imported": "int8pass" in sys.modules}))
"""


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def fresh_load(library: str, package: Path, prompt: int) -> dict:
    done = subprocess.run([sys.executable, "-c", LOAD, library, str(package), str(prompt)], capture_output=True,
                          text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"loading {package} in a fresh process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--loads", type=int, default=3, help="fresh-process loads of each package (median)")
    args = parser.parse_args()
    torch.manual_seed(0)
    bf16 = build_model(args.layers).eval()
    example = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    shapes = ({0: Dim("batch", max=64), 1: Dim("seq", max=2048)},)
    work = Path(tempfile.mkdtemp(prefix="int8pass_deploy_"))
    build = {}
    with torch.no_grad():
        program, build["bf16 export_s"] = timed(lambda: torch.export.export(CausalLMLogits(bf16), (example,), dynamic_shapes=shapes))
        bf16_path, build["bf16 package_s"] = timed(lambda: inductor_api.aoti_compile_and_package(
            program, str(work / "bf16.pt2"), {}))  # int8pass.package's settings, so that the two differ in weights only
        int8_model = CausalLMLogits(int8pass.quantize_(copy.deepcopy(bf16)))
        program, build["int8 export_s"] = timed(lambda: int8pass.export(int8_model, (example,), dynamic_shapes=shapes))
        int8_path, build["int8 package_s"] = timed(lambda: int8pass.package(program, work / "int8.pt2"))
        del program
    library = str(int8pass.extension_library())
    sizes = {"bf16": Path(bf16_path).stat().st_size, "int8": Path(int8_path).stat().st_size}

    loads = {"llmint8 AOTI": [], "bf16 AOTI": []}
    for _ in range(args.loads):  # taking turns, so that the page cache and the host's noise treat both alike
        loads["llmint8 AOTI"].append(fresh_load(library, Path(int8_path), args.prompt))
        loads["bf16 AOTI"].append(fresh_load("", Path(bf16_path), args.prompt))
    assert not any(load["int8pass_imported"] for load in loads["llmint8 AOTI"])

    compiled = torch.compile(CausalLMLogits(copy.deepcopy(bf16)), backend="llmint8")
    variants = {"llmint8 AOTI": torch._inductor.aoti_load_package(int8_path),
                "llmint8 torch.compile": compiled,
                "bf16 AOTI": torch._inductor.aoti_load_package(bf16_path)}
    prompt = torch.randint(0, VOCAB, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    token = prompt[:, :1]
    times = {name: {"prefill": [], "token": []} for name in variants}
    logits = {}
    with torch.no_grad():
        _, compile_s = timed(lambda: compiled(prompt))
        _, compile_token_s = timed(lambda: compiled(token))
        for name, run in variants.items():  # warm-up, and the logits the variants are compared on
            run(token)
            logits[name] = run(prompt).float()
        for _ in range(args.rounds):
            for name, run in variants.items():
                times[name]["prefill"].append(timed(lambda: run(prompt))[1])
                times[name]["token"].append(timed(lambda: run(token))[1])
        eager_logits = int8_model(prompt).float()  # the noise floor: eager int8 against the compiled model
    bf16_logits = logits["bf16 AOTI"]

    def rel(a, b):
        return round(((a - b).norm() / b.norm()).item(), 4)

    rows = []
    for name in variants:
        prefill, one = statistics.median(times[name]["prefill"]), statistics.median(times[name]["token"])
        row = {"variant": name, "prefill_tokens_per_s": round(args.prompt / prefill, 1),
               "prefill_s": round(prefill, 4), "one_token_forward_ms": round(one * 1000, 2),
               "logits_rel_error_vs_bf16": rel(logits[name], bf16_logits)}
        if name in loads:
            row["package_mib"] = round(sizes["int8" if "int8" in name else "bf16"] / 2**20, 1)
            for key in ("load_s", "first_run_s", "rss_mib", "rss_growth_mib"):
                row[f"fresh_{key}"] = round(statistics.median(load[key] for load in loads[name]), 3)
        else:
            row["first_call_compile_s"] = round(compile_s, 1)
            row["first_1_token_call_s"] = round(compile_token_s, 1)
        rows.append(row)
    agreement = rel(logits["llmint8 AOTI"], logits["llmint8 torch.compile"])
    eager_agreement = rel(eager_logits, logits["llmint8 torch.compile"])

    machine = describe()
    base = rows[-1]
    lines = [f"Llama-architecture, d=2048, {args.layers} layers, ffn 5632, vocab 8000, bf16 (head bf16 in the int8 "
             f"variants); batch 1, prompt {args.prompt}; medians of {args.rounds} turns in one process. {summary(machine)}",
             "",
             "| variant | package MiB | fresh-process load s | first run s | RSS after, MiB (growth: load + run) | prefill tokens/s | "
             "1-token forward ms (no KV cache) | prefill vs bf16 AOTI | logits rel. error vs bf16 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['variant']} | {row.get('package_mib', '-')} | {row.get('fresh_load_s', '-')} | "
                     f"{row.get('fresh_first_run_s', '-')} | {row.get('fresh_rss_mib', '-')} ({row.get('fresh_rss_growth_mib', '-')}) | "
                     f"{row['prefill_tokens_per_s']} | {row['one_token_forward_ms']} | "
                     f"{row['prefill_tokens_per_s'] / base['prefill_tokens_per_s']:.2f}x | "
                     f"{row['logits_rel_error_vs_bf16']} |")
    lines += ["",
              f"int8 package / bf16 package: {sizes['int8'] / sizes['bf16']:.3f}. "
              f"Build: bf16 export {build['bf16 export_s']:.1f} s + AOTI {build['bf16 package_s']:.1f} s; "
              f"int8 export {build['int8 export_s']:.1f} s + AOTI {build['int8 package_s']:.1f} s. "
              f"torch.compile(backend='llmint8') first call {compile_s:.1f} s (1-token shape: {compile_token_s:.1f} s more). "
              f"llmint8 AOTI logits vs llmint8 torch.compile: rel. error {agreement} (eager int8 vs torch.compile: "
              f"{eager_agreement}: activation codes follow the bf16 rounding of each engine's non-linear ops)."]
    table = "\n".join(lines)
    print("\n" + table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "deploy.txt").write_text(table + "\n")
    (RESULTS / "deploy.json").write_text(json.dumps(
        {"args": vars(args), "machine": machine, "rows": rows, "sizes_bytes": sizes, "build_s": build,
         "fresh_loads": loads, "aoti_vs_compile_rel_error": agreement, "eager_vs_compile_rel_error": eager_agreement,
         "times_s": times}, indent=2) + "\n")


if __name__ == "__main__":
    main()
