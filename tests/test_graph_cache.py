"""Inductor's FX graph cache serves llmint8 graphs to a new process, keyed on int8pass's own sources."""

import os
import subprocess
import sys

from int8pass.lowering.inductor_api import SourceKey

COMPILE = """
import torch, int8pass
from torch._dynamo.utils import counters
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32)).eval().to(torch.bfloat16)
with torch.no_grad():
    y = torch.compile(m, backend="llmint8")(torch.randn(5, 64, dtype=torch.bfloat16))
print(counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"], float(y.float().sum()))
"""


def test_a_new_process_reuses_the_compiled_graph(tmp_path):
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", COMPILE], capture_output=True, text=True, timeout=300,
                             env={**os.environ, **env})
        assert out.returncode == 0, out.stderr[-2000:]
        runs.append(out.stdout.split())
    (hit1, miss1, y1), (hit2, miss2, y2) = runs
    assert (hit1, miss1) == ("0", "1") and (hit2, miss2) == ("1", "0") and y1 == y2


def test_the_key_follows_the_sources_and_the_machine(tmp_path):
    one, two = tmp_path / "one.py", tmp_path / "two.py"
    one.write_text("A = 1\n")
    two.write_text("A = 2\n")
    def key(path, machine="cpu kernel"):
        return SourceKey([str(path)], lambda: machine).uuid()

    assert key(one) == key(one)
    assert key(one) != key(two)
    assert key(one) != key(one, machine="reference steps")  # how the machine runs CPU linears decides the graph


def test_a_users_own_post_grad_pass_is_kept_and_the_cache_stays_off():
    import torch
    from torch._dynamo.utils import counters

    class Count(SourceKey):  # a user's pass: it runs, and holds the slot our key would take
        calls = 0

        def __call__(self, graph):
            Count.calls += 1

    counters.clear()
    model = torch.nn.Linear(32, 16).eval()
    with torch.no_grad():
        torch.compile(model, backend="llmint8", options={"inductor": {"post_grad_custom_post_pass": Count([], str)}})(
            torch.randn(3, 32))
    assert Count.calls == 1
    assert counters["inductor"]["fxgraph_cache_hit"] == counters["inductor"]["fxgraph_cache_miss"] == 0
