"""Deploying int8 models (int8pass/deploy.py): int8pass.export, torch.export.save/load, and AOTInductor packages run
in a fresh process that loads only the extension library, from Python and from the C++ program of
examples/aoti_run.cpp; a Hugging Face Llama end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.export import Dim

import int8pass
from int8pass import deploy
from int8pass.int8_weight import Int8Weight
from int8pass.lowering import cpu_linear, inductor_api

needs_kernel = pytest.mark.skipif(not cpu_linear.available(), reason="no int8pass CPU kernel on this machine")
ROOT = Path(__file__).resolve().parents[1]

# What a serving process runs: torch and the extension library, nothing of int8pass (or transformers).
FRESH_PROCESS = """
import json, sys, torch
torch.ops.load_library(sys.argv[1])
runner = torch._inductor.aoti_load_package(sys.argv[2])
inputs = torch.load(sys.argv[3])
outputs = {name: runner(x) for name, x in inputs.items()}
if "greedy" in inputs:  # greedy tokens, recomputing the whole sequence each step (the package has no KV cache)
    ids = inputs["greedy"]
    for _ in range(4):
        ids = torch.cat([ids, runner(ids)[:, -1:].argmax(-1)], dim=1)
    outputs["greedy"] = ids
torch.save(outputs, sys.argv[4])
print(json.dumps(sorted(name for name in ("int8pass", "transformers") if name in sys.modules)))
"""


def mlp() -> torch.nn.Module:
    """A bf16 MLP: its first linear in LLM.int8()'s layout, its second in block mode (both int8 ops)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 128)).to(torch.bfloat16)
    int8pass.quantize_(model[0])
    int8pass.quantize_(model[2], block_size=32)
    return model.eval()


def batch(rows: int) -> torch.Tensor:
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
    x[:, 3] *= 40  # an outlier column: the fp path runs too
    return x


def run_fresh(library: Path, package: Path, inputs: dict, tmp_path: Path) -> dict:
    """Run a package in a new Python process that loads only torch and `library`; its outputs by input name."""
    torch.save(inputs, tmp_path / "inputs.pt")
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(library), str(package), str(tmp_path / "inputs.pt"),
                           str(tmp_path / "outputs.pt")], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []  # neither int8pass nor transformers was imported
    return torch.load(tmp_path / "outputs.pt")


@pytest.fixture(scope="module")
def mlp_program():
    model = mlp()
    return model, int8pass.export(model, (batch(4),), dynamic_shapes=({0: Dim("batch")},))


@pytest.fixture(scope="module")
def mlp_package(mlp_program, tmp_path_factory):
    model, program = mlp_program
    path = int8pass.package(program, tmp_path_factory.mktemp("mlp") / "mlp.pt2")
    return model, Path(path)


def test_export_graph_calls_the_int8_ops_on_int8_parameters(mlp_program):
    model, program = mlp_program
    targets = [node.target for node in program.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.llmint8.linear.default) == 1
    assert targets.count(torch.ops.llmint8.block_linear.default) == 1
    assert not {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.linear.default} & set(targets)
    state = program.state_dict
    assert not any(isinstance(value, Int8Weight) for value in state.values())
    codes = {name: value for name, value in state.items() if value.dtype == torch.int8}
    assert {tuple(value.shape) for value in codes.values()} == {(512, 256), (128, 512)}
    assert torch.equal(codes["0.parametrizations.weight.original0"], model[0].weight.codes)
    assert state["2.parametrizations.weight.original1"].dtype == torch.bfloat16  # block scales
    # the code sums the CPU kernel takes off travel with the codes (none in block mode)
    assert torch.equal(state["0.parametrizations.weight.original2"], model[0].weight.codes.sum(1, dtype=torch.int32))
    assert "2.parametrizations.weight.original2" not in state
    weights = {tuple(value.shape) for value in codes.values()}
    assert not [name for name, value in state.items() if value.is_floating_point() and tuple(value.shape) in weights]
    with torch.no_grad():
        for rows in (4, 7):  # a dynamic batch
            assert torch.equal(program.module()(batch(rows)), model(batch(rows)))


def test_export_save_load_matches_the_compiled_model(mlp_program, tmp_path):
    model, program = mlp_program
    torch.export.save(program, tmp_path / "mlp.pt2")
    loaded = torch.export.load(tmp_path / "mlp.pt2").module()
    compiled = torch.compile(model, backend="llmint8")
    with torch.no_grad():
        for rows in (1, 9):
            want = compiled(batch(rows))
            got = loaded(batch(rows))
            assert torch.equal(got, model(batch(rows)))
            # the compiled GELU rounds once, eager's in bf16 twice: the second linear may see inputs 1 ulp apart
            torch.testing.assert_close(got, want, rtol=0.02, atol=0.02 * want.abs().max().item())


def test_export_of_a_compiled_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 128)).to(torch.bfloat16)
    compiled = torch.compile(model, backend="llmint8")
    with torch.no_grad():
        want = compiled(batch(4))  # the compile quantizes the weights in place
    program = int8pass.export(compiled, (batch(4),), dynamic_shapes=({0: Dim("batch")},))
    assert deploy.int8_linears(program) == 2
    with torch.no_grad():
        torch.testing.assert_close(program.module()(batch(4)), want, rtol=0.02, atol=0.02 * want.abs().max().item())


def test_export_refuses_a_model_without_int8_weights():
    with pytest.raises(ValueError, match="no Int8Weight; quantize it first"):
        int8pass.export(torch.nn.Linear(8, 8), (torch.randn(2, 8),))


@needs_kernel
def test_package_runs_in_a_fresh_process_with_only_the_extension_library(mlp_package, tmp_path):
    model, path = mlp_package
    inputs = {"rows 4": batch(4), "rows 13": batch(13)}
    outputs = run_fresh(int8pass.extension_library(), path, inputs, tmp_path)
    runner = torch._inductor.aoti_load_package(str(path))
    with torch.no_grad():
        for name, x in inputs.items():
            assert torch.equal(outputs[name], runner(x))
            want = model(x)
            torch.testing.assert_close(outputs[name], want, rtol=0.02, atol=0.02 * want.abs().max().item())


def build_cpp_runner() -> Path:
    """examples/aoti_run.cpp, built against the torch wheel's libtorch by torch.utils.cpp_extension."""
    from torch.utils import cpp_extension

    build = cpu_linear.cache_dir() / "aoti_run"
    build.mkdir(parents=True, exist_ok=True)
    return Path(cpp_extension.load(name="aoti_run", sources=[str(ROOT / "examples" / "aoti_run.cpp")],
                                   build_directory=str(build), is_standalone=True, is_python_module=False,
                                   extra_cflags=["-O1"]))


def run_cpp(runner: Path, package: Path, x: torch.Tensor, tmp_path: Path) -> torch.Tensor:
    dtype = {torch.bfloat16: "bfloat16", torch.int64: "int64"}[x.dtype]
    raw = (x.float() if x.is_floating_point() else x).contiguous().clone()
    (tmp_path / "x.bin").write_bytes(bytes(raw.untyped_storage()))
    done = subprocess.run([str(runner), str(int8pass.extension_library()), str(package), str(tmp_path / "x.bin"),
                           *map(str, x.shape), dtype, str(tmp_path / "y.bin")], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.frombuffer(bytearray((tmp_path / "y.bin").read_bytes()), dtype=torch.float32)


@needs_kernel
def test_cpp_program_runs_the_package(mlp_package, tmp_path):
    _, path = mlp_package
    runner = build_cpp_runner()
    x = batch(5)
    got = run_cpp(runner, path, x, tmp_path)
    want = torch._inductor.aoti_load_package(str(path))(x)
    assert torch.equal(got.reshape(want.shape), want.float())


@needs_kernel
def test_package_holds_int8_weights(tmp_path):
    """The package's size against the bf16 package of the same model: the int8 codes and scales, no fp weight."""
    torch.manual_seed(0)
    bf16 = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(4)]).to(torch.bfloat16).eval()
    x = torch.randn(2, 2048, dtype=torch.bfloat16)
    shapes = ({0: Dim("batch")},)
    # int8pass.package's settings, so that the two packages differ in their weights only
    bf16_path = inductor_api.aoti_compile_and_package(torch.export.export(bf16, (x,), dynamic_shapes=shapes),
                                                      str(tmp_path / "bf16.pt2"), {})
    int8_path = int8pass.package(int8pass.export(int8pass.quantize_(bf16), (x,), dynamic_shapes=shapes),
                                 tmp_path / "int8.pt2")
    ratio = Path(int8_path).stat().st_size / Path(bf16_path).stat().st_size
    assert ratio <= 0.55, ratio


@needs_kernel
def test_hf_llama_from_pretrained_export_package_fresh_process(tmp_path):
    pytest.importorskip("transformers")
    from tests.helpers import tiny_llama

    tiny_llama(vocab=1000).to(torch.bfloat16).save_pretrained(tmp_path / "llama")
    model = deploy.CausalLMLogits(int8pass.from_pretrained(tmp_path / "llama"))
    ids = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(0))
    program = int8pass.export(model, (ids,), dynamic_shapes=({0: Dim("batch"), 1: Dim("seq", max=64)},))
    assert deploy.int8_linears(program) == 14  # 7 per layer; the head stays bf16 (the default skip)
    path = int8pass.package(program, tmp_path / "llama.pt2")

    inputs = {"2 x 10": ids, "1 x 17": ids[:1].repeat(1, 2)[:, :17], "greedy": ids[:1, :5]}
    outputs = run_fresh(int8pass.extension_library(), Path(path), inputs, tmp_path)
    runner = torch._inductor.aoti_load_package(path)
    compiled = torch.compile(model, backend="llmint8")
    with torch.no_grad():
        for name in ("2 x 10", "1 x 17"):
            assert torch.equal(outputs[name], runner(inputs[name]))
            want = compiled(inputs[name]).float()
            assert (outputs[name].float() - want).abs().max() < 0.05 * want.abs().max()
        greedy = inputs["greedy"]
        for _ in range(4):
            greedy = torch.cat([greedy, runner(greedy)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(outputs["greedy"], greedy)
    got = run_cpp(build_cpp_runner(), Path(path), ids, tmp_path)
    assert torch.equal(got.reshape(2, 10, -1), outputs["2 x 10"].float())
