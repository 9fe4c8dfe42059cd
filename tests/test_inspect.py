"""What users see: the per-layer report, the dump files, TORCH_LOGS, and runtime outlier statistics."""

import json
import os
import subprocess
import sys

import torch

import int8pass
from tests.helpers import outlier_activation


class Mixed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(32, 64)
        self.down = torch.nn.Linear(64, 32)
        self.tiny = torch.nn.Linear(32, 4)
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x):
        h = self.down(torch.relu(self.up(x)))
        return self.head(h), self.tiny(h)


def test_report_accounts_for_every_linear_with_reasons():
    with torch.no_grad():
        torch.compile(Mixed().eval(), backend="llmint8", options={"skip_modules": ["head"], "min_features": 8})(torch.randn(3, 32))
    report = int8pass.last_report()
    by_name = {layer.name: layer for layer in report.layers}
    assert set(by_name) == {"up", "down", "tiny", "head"}
    assert by_name["up"].rewritten and by_name["down"].rewritten
    assert by_name["head"].reason == "skipped by option skip_modules"
    assert by_name["tiny"].reason == "too small: min(N, K) = 4 < min_features = 8"
    assert by_name["up"].weight_bytes_before == 64 * 32 * 4
    assert by_name["up"].weight_bytes_after == 64 * 32 + 64 * 4 + 64 * 4  # codes, scales, code sums
    assert by_name["head"].weight_bytes_after == by_name["head"].weight_bytes_before
    table = report.table()
    for name in by_name:
        assert name in table
    assert "2/4 rewritten" in table
    assert [d["name"] for d in report.as_dicts()] == [layer.name for layer in report.layers]


def _check_dump(root):
    graph = root / f"graph_{int8pass.last_report().graph_id:03d}"  # graph ids count up across the process
    before, after = (graph / "before.py").read_text(), (graph / "after.py").read_text()
    assert "torch._C._nn.linear" in before and "llmint8.linear" not in before
    assert "llmint8.linear" in after
    layers = json.loads((graph / "layers.json").read_text())
    assert [layer["name"] for layer in layers["layers"]] == ["up", "down", "head", "tiny"]
    assert "4/4 rewritten" in (graph / "layers.txt").read_text()
    kernels = list((graph / "inductor").rglob("output_code.py"))
    assert kernels
    assert any(gemm in kernels[0].read_text() for gemm in ("llmint8.cpu_linear", "_int_mm"))


def test_dump_dir_option(tmp_path):
    with torch.no_grad():
        torch.compile(Mixed().eval(), backend="llmint8", options={"dump_dir": str(tmp_path)})(torch.randn(3, 32))
    _check_dump(tmp_path)


def test_dump_dir_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("INT8PASS_DUMP_DIR", str(tmp_path))
    with torch.no_grad():
        torch.compile(Mixed().eval(), backend="llmint8")(torch.randn(3, 32))
    _check_dump(tmp_path)


def test_torch_logs_turns_on_the_report():
    code = (
        "import torch\n"
        "with torch.no_grad():\n"
        "    torch.compile(torch.nn.Linear(32, 16).eval(), backend='llmint8')(torch.randn(4, 32))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TORCH_LOGS": "int8pass"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "1/1 linears rewritten" in out.stderr and "1/1 rewritten" in out.stderr


def test_outlier_statistics_on_known_columns():
    int8pass.reset_stats()
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Linear(48, 16)).eval()
    with torch.no_grad():
        model[0].weight.mul_(0.1)  # keep the second layer's inputs below the threshold
        compiled = torch.compile(model, backend="llmint8", options={"stats": True})
        for call, cols in enumerate([[3, 40], [3], [3, 40, 63]]):
            compiled(outlier_activation(5, 64, outlier_cols=cols, magnitude=50.0, seed=call))
    first, second = int8pass.outlier_stats()
    assert (first.name, second.name) == ("0", "1")
    assert first.counts == [2, 1, 3] and second.counts == [0, 0, 0]
    assert first.recurring(2) == [(3, 1.0), (40, 2 / 3)]
    assert "3(100%)" in int8pass.stats_table()


def test_statistics_are_off_by_default():
    int8pass.reset_stats()
    with torch.no_grad():
        torch.compile(torch.nn.Linear(16, 8).eval(), backend="llmint8")(torch.randn(2, 16))
    assert int8pass.outlier_stats() == []


def test_statistics_are_keyed_by_layer_and_survive_a_reset():
    int8pass.reset_stats()
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 16)).eval()
    x = outlier_activation(5, 64, outlier_cols=[7], magnitude=50.0)
    with torch.no_grad():
        compiled = torch.compile(model, backend="llmint8", options={"stats": True})
        compiled(x)
        compiled(x[:2])  # another length, another graph: the same layers' entries
        assert [(layer.name, layer.calls) for layer in int8pass.outlier_stats()] == [("0", 2), ("2", 2)]
        int8pass.reset_stats()  # the compiled graphs go on recording, into fresh entries
        compiled(x)
    assert [(layer.name, layer.calls) for layer in int8pass.outlier_stats()] == [("0", 1), ("2", 1)]
    assert int8pass.outlier_stats()[0].column_calls == {7: 1}


def test_reports_kept_are_bounded(monkeypatch):
    from collections import deque

    from int8pass import report

    monkeypatch.setattr(report, "_REPORTS", deque(maxlen=2))
    ids = [report.new_report().graph_id for _ in range(3)]
    assert ids == sorted(set(ids)) and [r.graph_id for r in int8pass.reports()] == ids[1:]
