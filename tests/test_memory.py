"""Process memory as `ps` shows it, compiling 8 bf16 linears 4096 x 4096 (256 MiB), in a fresh process each: the
model in memory, or mmap'd from a file. Margins are generous: benchmarks/memory.py measures real models."""

import json
import subprocess
import sys

import pytest
import torch

CODE = r"""
import json, os, sys
import torch, int8pass

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

def peak():
    return next(int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))

def build():
    with torch.device("meta"):
        return torch.nn.Sequential(*[torch.nn.Linear(4096, 4096, bias=False) for _ in range(8)]).to(torch.bfloat16).eval()

with torch.no_grad():  # Inductor's own start-up is not the model's
    torch.compile(torch.nn.Linear(64, 64).to(torch.bfloat16).eval(), backend="llmint8")(torch.randn(2, 64, dtype=torch.bfloat16))
torch._dynamo.reset()
source, path = sys.argv[1], sys.argv[2]
if source == "file":
    torch.manual_seed(0)
    model = build().to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    torch.save(model.state_dict(), path)
    del model, p
base = rss()
model = build()
if source == "file":
    model.load_state_dict(torch.load(path, mmap=True), assign=True)
else:
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        del p
x = torch.randn(4, 4096, dtype=torch.bfloat16)
with torch.no_grad():
    model(x)  # every weight read once: the bf16 model's own footprint
    own = rss() - base
    open("/proc/self/clear_refs", "w").write("5")  # the peak from here on
    y = torch.compile(model, backend="llmint8")(x)
assert all(isinstance(layer.weight, int8pass.Int8Weight) for layer in model)
print(json.dumps({"own": own, "steady": rss() - base, "peak": peak() - base}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("source", ["memory", "file"])
def test_compiling_halves_process_memory(source, tmp_path):
    done = subprocess.run([sys.executable, "-c", CODE, source, str(tmp_path / "weights.pt")], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    mib = json.loads(done.stdout.strip().splitlines()[-1])
    assert mib["own"] > 240, mib  # the bf16 weights are resident
    # the int8 codes are half; on top, a fixed allowance for the compiled graph and the first call (~20 MiB here)
    assert mib["steady"] < 0.5 * mib["own"] + 32, mib
    # quantized weight by weight: one weight's fp and its codes at most coexist (1/8 of this model)
    assert mib["peak"] < 1.15 * mib["own"] + 32, mib
