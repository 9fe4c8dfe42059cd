"""Linear-level benchmark: llmint8 against what a user would run instead, on the same weights, in one run.

Runs on CUDA when present (all docs/design.md §4 shapes, M = 1 ... 4096), else on CPU (the Llama-3.1-8B / OPT-6.7B
shapes a 2-core CPU runs in reasonable time, M = 1 ... 512). Activations with 0.5% outlier columns (|x| 20-60),
threshold 6, bf16. All ratios come from the same run. Peers run where installed:
- on CPU, the int8 engines CPU users run: PyTorch's fbgemm dynamic int8 (`torch.ao.quantization.quantize_dynamic`,
  qint8 weights) and ONNX Runtime's dynamic int8 (`onnxruntime.quantization.quantize_dynamic`) with QUInt8 weights,
  and, on CPUs with a VNNI dot product (AVX512-VNNI or AVX-VNNI), also with its default QInt8 weights (MLAS then
  multiplies u8 x s8 with vpdpbusd, or AMX tiles where the CPU has them; on CPUs without VNNI it uses vpmaddubsw,
  whose int16 pairs saturate, ~15% error, so it is not run there), all fp32 in and out; fp32 eager (MKL);
- everywhere: bf16 eager and torch.compile, bitsandbytes Linear8bitLt (threshold 6, eval) and torchao
  Int8DynamicActivationInt8WeightConfig compiled with Inductor (as torchao recommends).
Neither fbgemm nor ONNX Runtime splits off outlier columns: they do strictly less work than LLM.int8().
llmint8 runs compiled (torch.compile(backend="llmint8") of the one linear) and eagerly after int8pass.quantize_; the
ratio to the best int8 engine takes the faster of the two (a one-linear compiled graph pays Dynamo's per-call cost,
which a model's graph pays once per forward). On CPU, "llmint8 op alone" is the kernel's op called directly on the
eager variant's weight: what the calls around it cost, in the same run (not in the ratio).
On CPU it also measures the memory bandwidth (a 1 GiB copy and a 1 GiB read) and, at M = 1, the rate at which
llmint8 reads the int8 weight: in the timed calls (one weight, cached where it fits) and from memory (one call on
each of 1 GiB of distinct weights, beside an fp32 sum reading the same bytes in the same rounds); it records which GEMM kernel each M ran. On CUDA it counts the kernels one llmint8
call launches (profiler). The variants take turns, 3 rounds per shape and M; each round's time is the median of
repeats that stop once two batches agree, and the fastest round's is reported (every round's min, median and max go
to the JSON, with the machine: CPU model and ISA flags, versions, threads; and each variant's relative error against
fp32 at that M, so that a fast peer is seen to be right). Prints a markdown table and writes
benchmarks/results/{cpu,cuda}_linear.{json,md,png} (another name with --name).

    bash tools/dev.sh bench-linear
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_mlp import activations, time_stats  # noqa: E402
from machine import describe, summary  # noqa: E402

import int8pass  # noqa: E402
from int8pass.lowering import cpu_linear  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DESIGN_SHAPES = [(4096, 4096), (16384, 4096), (4096, 16384), (14336, 4096), (4096, 14336), (1024, 4096),
                 (8192, 8192), (28672, 8192), (8192, 28672), (9216, 9216), (36864, 9216)]
SHAPES = DESIGN_SHAPES if DEVICE == "cuda" else [(4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096)]
TOKENS = [1, 16, 128, 512, 2048, 4096] if DEVICE == "cuda" else [1, 4, 16, 128, 512]
RESULTS = Path(__file__).parent / "results"


def synchronized(fn):
    """Time GPU work, not its launch."""
    if DEVICE != "cuda":
        return fn

    def run(x):
        out = fn(x)
        torch.cuda.synchronize()
        return out

    return run


def cuda_kernels_per_call(fn, x) -> int:
    """CUDA kernels (and memsets) one call launches, from the profiler: the fused-kernel count of a linear."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(x)
        torch.cuda.synchronize()
    return sum(1 for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA)


def memory_bandwidth() -> dict:
    """GB/s of a 1 GiB copy (bytes read + written) and of a 1 GiB read (an fp32 sum), best of 5, this process's
    threads: the bound on reading a weight that is not in cache."""
    source = torch.ones(1 << 30, dtype=torch.uint8)
    target = torch.empty_like(source)
    values = source.view(torch.float32)
    copy_s = min(timed(lambda: target.copy_(source)) for _ in range(5))
    read_s = min(timed(values.sum) for _ in range(5))
    return {"copy_GBps": round(2 * source.numel() / copy_s / 1e9, 1), "read_GBps": round(source.numel() / read_s / 1e9, 1)}


COLD_BYTES = 1 << 30  # more than any CPU cache holds


def cold_weight_rate(n: int, k: int) -> dict:
    """GB/s at which the llmint8 kernel reads n x k int8 weights at M = 1 from memory, as a model's decode step reads
    its layers: one call on each of enough distinct weights to pass COLD_BYTES, so none is still cached when read
    again. The kernel op itself (what a compiled graph calls, with the code sums an Int8Weight keeps), without
    Dynamo's per-graph cost. Each of 3 rounds also reads the same weights with an fp32 sum, right after the kernel's
    sweep: this host's bandwidth drifts over minutes, so the kernel's share of it comes from the same round."""
    count = max(2, COLD_BYTES // (n * k))
    codes = [torch.randint(-127, 128, (n, k), dtype=torch.int8) for _ in range(count)]
    sums = [int8pass.int8_weight.code_sums(weight_q) for weight_q in codes]
    scale = torch.rand(n) + 0.5
    x = activations(1, k, torch.bfloat16, 0.005)

    def kernel_sweep():
        for weight_q, code_sums in zip(codes, sums):
            torch.ops.llmint8.cpu_linear(x, weight_q, scale, None, 6.0, code_sums=code_sums)

    def read_sweep():
        for weight_q in codes:
            weight_q.view(torch.float32).sum()

    kernel_sweep()
    rounds = [(timed(kernel_sweep), timed(read_sweep)) for _ in range(3)]
    gb = count * n * k / 1e9
    best = min(rounds)
    return {"kernel_GBps": round(gb / best[0], 1), "read_GBps": round(gb / best[1], 1),
            "kernel_over_read": round(statistics.median(read / kernel for kernel, read in rounds), 2)}


def timed(fn) -> float:
    import time

    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def fbgemm_dynamic(linear: torch.nn.Linear):
    """PyTorch's dynamic int8 linear on the fbgemm engine: per-row int8 weights, activations quantized per call."""
    torch.backends.quantized.engine = "fbgemm"
    module = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(copy.deepcopy(linear).float()),
                                                    {torch.nn.Linear}, dtype=torch.qint8)
    return lambda x: module(x.float())


def onnxruntime_dynamic(linear: torch.nn.Linear, signed_weights: bool = False):
    """ONNX Runtime's dynamic int8 MatMul (MatMulInteger + scales) of an fp32 MatMul + Add graph, QUInt8 weights
    (QInt8 with signed_weights)."""
    import tempfile

    import onnx
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    weight = linear.weight.detach().float().t().contiguous().numpy()
    bias = linear.bias.detach().float().numpy()
    k, n = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    folder = Path(tempfile.mkdtemp())
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), folder / "fp32.onnx")
    quantize_dynamic(folder / "fp32.onnx", folder / "int8.onnx",
                     weight_type=QuantType.QInt8 if signed_weights else QuantType.QUInt8)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
    session = onnxruntime.InferenceSession(str(folder / "int8.onnx"), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x.float().numpy()})[0]


def peers(linear: torch.nn.Linear) -> dict:
    """name -> callable for each peer that is installed and runs here; failures are reported, not hidden."""
    built = {}
    if DEVICE == "cpu":
        engines = [("fbgemm int8 dyn", fbgemm_dynamic), ("onnxruntime int8 dyn", onnxruntime_dynamic)]
        capabilities = torch.cpu.get_capabilities()
        if capabilities.get("avx512_vnni") or capabilities.get("avx_vnni"):  # where its u8 x s8 GEMM is exact
            engines.append((ORT_SIGNED, lambda linear: onnxruntime_dynamic(linear, signed_weights=True)))
        for name, build in engines:
            try:
                built[name] = build(linear)
            except Exception as error:  # noqa: BLE001
                print(f"{name} unavailable: {type(error).__name__}: {error}", file=sys.stderr)
    try:
        import bitsandbytes as bnb

        # it warns on every call that bf16 inputs are cast to fp16 (which is part of what it is timed doing)
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
        module = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=True,
                                     has_fp16_weights=False, threshold=6.0)
        module.load_state_dict(linear.state_dict())
        built["bitsandbytes int8 (t=6)"] = module.eval().to(DEVICE)
    except Exception as error:  # noqa: BLE001  (any failure to build a peer is reported)
        print(f"bitsandbytes unavailable: {type(error).__name__}: {error}", file=sys.stderr)
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        module = copy.deepcopy(linear)
        quantize_(module, Int8DynamicActivationInt8WeightConfig())
        built["torchao int8 dyn + compile"] = torch.compile(module, dynamic=False)
    except Exception as error:  # noqa: BLE001
        print(f"torchao unavailable: {type(error).__name__}: {error}", file=sys.stderr)
    return built


ORT_SIGNED = "onnxruntime int8 dyn (QInt8)"
INT8_PEERS = ["fbgemm int8 dyn", "onnxruntime int8 dyn", ORT_SIGNED]  # what the targets compare with on CPU
LLMINT8 = ["llmint8", "llmint8 eager (quantize_)"]  # the ratio to the best int8 engine takes the faster of the two
# The kernel's op called on the eager variant's weight with nothing around it: what the module calls cost beyond it.
# Reported, not in the ratio (a user calls modules).
OP_ALONE = "llmint8 op alone"
ROUNDS = 3


def op_alone(module: torch.nn.Linear):
    weight, bias = module.weight, module.bias
    return lambda x: torch.ops.llmint8.cpu_linear.default(x, weight.codes, weight.scale, bias, weight.threshold,
                                                          None, weight.code_sums)


ERRORS = "rel. error vs fp32"


def relative_errors(variants: dict, exact: torch.nn.Linear, x: torch.Tensor) -> dict:
    """||y - y_fp32|| / ||y_fp32|| of each variant that runs at this input (fp32: the linear in fp32 on x as given)."""
    want = exact(x.float())
    errors = {}
    for name, fn in variants.items():
        try:
            got = torch.as_tensor(fn(x)).to(want.device).float()
        except Exception:  # noqa: BLE001  (the timing loop reports the failure)
            continue
        errors[name] = round(((got - want).norm() / want.norm()).item(), 5)
    return errors


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    parser.add_argument("--min-seconds", type=float, default=1.5, help="timing per variant and M, over all rounds")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--name", default=f"{DEVICE}_linear", help="the result files' name in --results")
    args = parser.parse_args()
    # Every variant is an nn.Linear sharing one forward code object and dynamic=False recompiles per M: past
    # Dynamo's recompile limit it would silently run frames eagerly and time bf16 instead of the variant.
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 1024
    bandwidth = memory_bandwidth() if DEVICE == "cpu" else None
    if bandwidth:
        print(f"memory bandwidth: {bandwidth}", flush=True)
    rows = []
    for n, k in SHAPES:
        torch._dynamo.reset()
        torch.manual_seed(0)
        linear = torch.nn.Linear(k, n).eval().to(DEVICE, torch.bfloat16)
        with torch.no_grad():
            variants = {
                "llmint8": torch.compile(copy.deepcopy(linear), backend="llmint8", dynamic=False),
                # the same op through the Int8Weight's eager dispatch, without the Dynamo guards and wrappers a
                # one-linear graph pays per call (a model's graph pays them once per forward, not per linear)
                "llmint8 eager (quantize_)": int8pass.quantize_(torch.nn.Sequential(copy.deepcopy(linear)),
                                                                skip_modules=[]),
                **peers(linear),
                "bf16 eager": linear,
                "bf16 compile": torch.compile(copy.deepcopy(linear), dynamic=False),
            }
            exact = copy.deepcopy(linear).float()  # the errors' reference
            if DEVICE == "cpu":  # MKL's fp32 GEMM: the fast floating-point path where a CPU has no bf16 dot product
                variants["fp32 eager (x cast)"] = lambda x, exact=exact: exact(x.float())
            if DEVICE == "cpu" and cpu_linear.available():
                variants[OP_ALONE] = op_alone(variants["llmint8 eager (quantize_)"][0])
            for m in args.tokens:
                x = activations(m, k, torch.bfloat16, 0.005).to(DEVICE)
                row = {"N": n, "K": k, "M": m, ERRORS: relative_errors(variants, exact, x)}
                if DEVICE == "cpu" and cpu_linear.available():
                    row["llmint8 kernel"] = cpu_linear.kernel(m, k)
                # variants take turns, ROUNDS times: a noisy neighbour's burst then hits one round of each, and the
                # fastest round's median is kept (all rounds go to the JSON)
                for _ in range(ROUNDS):
                    for name, fn in variants.items():
                        try:
                            stats = time_stats(synchronized(fn), x, args.min_seconds / ROUNDS)
                        except Exception as error:  # noqa: BLE001  (a peer that fails at a shape is reported)
                            print(f"{name} failed at M={m} {n}x{k}: {type(error).__name__}: {error}", file=sys.stderr)
                            continue
                        row.setdefault("ms", {}).setdefault(name, []).append(stats)
                        row[name] = min(round_["median"] for round_ in row["ms"][name])
                if DEVICE == "cuda":
                    row["llmint8 kernels"] = cuda_kernels_per_call(variants["llmint8"], x)
                if m == 1 and "llmint8" in row:  # decode reads the weight once: its rate is what counts
                    row["llmint8 weight GB/s"] = round(n * k / row["llmint8"] / 1e6, 1)
                    if bandwidth and cpu_linear.available():
                        cold = cold_weight_rate(n, k)
                        row["llmint8 weight GB/s from memory"] = cold["kernel_GBps"]
                        row["read GB/s from memory"] = cold["read_GBps"]
                        row["llmint8 / read from memory"] = cold["kernel_over_read"]
                rows.append(row)
                print(" ".join(f"{key}={value}" for key, value in row.items() if key != "ms"), flush=True)

    write(rows, bandwidth, args.results / args.name)


def from_memory(row: dict) -> str:
    """The cold-weight rate cell: GB/s, and its share of an fp32 sum's read rate in the same rounds."""
    if "llmint8 weight GB/s from memory" not in row:
        return ""
    return f"{row['llmint8 weight GB/s from memory']} ({row['llmint8 / read from memory']:.2f}x read)"


def write(rows: list[dict], bandwidth: dict | None, stem: Path) -> None:
    facts = ("N", "K", "M", "ms", ERRORS, "llmint8 kernels", "llmint8 kernel", "llmint8 weight GB/s",
             "llmint8 weight GB/s from memory", "read GB/s from memory", "llmint8 / read from memory")
    names = list(dict.fromkeys(key for row in rows for key in row if key not in facts))
    peers_here = [name for name in INT8_PEERS if name in names]
    machine = describe() if DEVICE == "cpu" else {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    header = ("| N x K | M | " + " | ".join(f"{name} ms" for name in names)
              + (" | best int8 engine / faster llmint8 |" if peers_here else " |") + " llmint8 vs bf16 eager |"
              + (" llmint8 kernel | weight GB/s at M=1 | from memory |" if DEVICE == "cpu" else " llmint8 kernels/call |"))
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        cells = [f"{row[name]:.3g}" if name in row else "n/a" for name in names]
        timed_peers = [row[name] for name in peers_here if name in row]
        ours = [row[name] for name in LLMINT8 if name in row]
        best = f"{min(timed_peers) / min(ours):.2f}x" if timed_peers and ours else "n/a"
        vs_bf16 = f"{row['bf16 eager'] / row['llmint8']:.2f}x" if "bf16 eager" in row and "llmint8" in row else "n/a"
        tail = (f" {row.get('llmint8 kernel', 'n/a')} | {row.get('llmint8 weight GB/s', '')} |"
                f" {from_memory(row)} |" if DEVICE == "cpu"
                else f" {row.get('llmint8 kernels', 'n/a')} |")
        lines.append(f"| {row['N']} x {row['K']} | {row['M']} | " + " | ".join(cells)
                     + (f" | {best} |" if peers_here else " |") + f" {vs_bf16} |" + tail)
    caption = (summary(machine) if DEVICE == "cpu" else f"{machine['device']}, torch {machine['torch']}") + \
        ". Per-call times, ms: the fastest of 3 interleaved rounds' medians (all rounds in the JSON); ratios from the same run."
    if bandwidth:
        m1 = [row["llmint8 weight GB/s"] for row in rows if "llmint8 weight GB/s" in row]
        caption += (f" Memory bandwidth: {bandwidth['copy_GBps']} GB/s copying 1 GiB (read + written), "
                    f"{bandwidth['read_GBps']} GB/s reading 1 GiB; llmint8 reads the int8 weight at M = 1 at "
                    f"{min(m1)}-{max(m1)} GB/s ({min(m1) / bandwidth['read_GBps']:.2f}-"
                    f"{max(m1) / bandwidth['read_GBps']:.2f}x the read bandwidth: repeated calls of one weight, which "
                    "stays in the CPU's cache where it fits)." if m1 else "")
        cold = [row for row in rows if "llmint8 weight GB/s from memory" in row]
        caption += (" From memory (one call on each of 1 GiB of distinct weights, as a decode step reads its layers) "
                    "the kernel reads them at " + ", ".join(
                        f"{row['N']}x{row['K']} {row['llmint8 weight GB/s from memory']} GB/s"
                        f" ({row['llmint8 / read from memory']:.2f}x an fp32 sum's {row['read GB/s from memory']},"
                        " same rounds)" for row in cold) + "." if cold else "")
    table = caption + "\n\n" + "\n".join(lines)
    print("\n" + table)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(table + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"machine": machine, "bandwidth": bandwidth, "rows": rows},
                                                    indent=2) + "\n")
    print(f"\nwrote {stem}.md and .json")
    try:
        from plot import plot

        print(f"wrote {plot(stem.with_suffix('.json'), stem.with_suffix('.png'))}")
    except ImportError as error:
        print(f"no plot: {error}")


if __name__ == "__main__":
    main()
