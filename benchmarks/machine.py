"""Where a benchmark ran: the CPU and the instruction-set flags that decide int8 vs bf16 speed, library versions,
threads, and which int8 GEMM llmint8 used. Every benchmark stores this beside its numbers."""

from __future__ import annotations

import importlib.metadata
import platform
import re

import torch

# AVX512-VNNI and AMX-INT8 give llmint8's CPU kernel its faster GEMMs (AVX2 otherwise); AVX512-BF16/AMX-BF16 give bf16
# its native dot product. Names as torch.cpu.get_capabilities() gives them.
FLAGS = ["avx2", "f16c", "avx512_f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8"]
PEERS = ["transformers", "torchao", "bitsandbytes", "triton", "onnxruntime"]


def describe() -> dict:
    from int8pass import lowering

    capabilities = torch.cpu.get_capabilities()
    onednn = re.search(r"MKL-DNN v([\d.]+)", torch.__config__.show() + torch.__config__.parallel_info())
    versions = {"torch": torch.__version__, "oneDNN": onednn.group(1) if onednn else None}
    for name in PEERS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu": capabilities.get("cpu_name") or platform.processor() or platform.machine(),
        "flags": {flag: bool(capabilities.get(flag)) for flag in FLAGS},
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "versions": versions,
        "llmint8_cpu_path": lowering.cpu_path(),
    }


def summary(machine: dict) -> str:
    """One line for a table's caption."""
    flags = ", ".join(flag for flag, present in machine["flags"].items() if present) or "none known"
    return (f"{machine['cpu']} ({flags}); {machine['threads']} threads; torch {machine['versions']['torch']}, "
            f"oneDNN {machine['versions']['oneDNN']}; llmint8: {machine['llmint8_cpu_path']}")


if __name__ == "__main__":
    import json

    print(json.dumps(describe(), indent=2))
