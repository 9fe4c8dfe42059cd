"""Everything a user can still do with a module after torch.compile(model, backend="llmint8") works, or raises a clear
Python exception. Each action runs in its own process, so that a crash fails its test instead of the whole run."""

import subprocess
import sys
import textwrap

import pytest

SETUP = """
import copy, io
import torch, int8pass
from int8pass import Int8Weight

def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32)).eval().to(torch.bfloat16)

model = make_model()
x = torch.randn(5, 64, dtype=torch.bfloat16)
compiled = torch.compile(model, backend="llmint8")
with torch.no_grad():
    y = compiled(x)
assert isinstance(model[0].weight, Int8Weight) and isinstance(model[2].weight, Int8Weight)

def same(a, b):  # compiled and eager run the same math; only the fp32 epilogue order may differ
    torch.testing.assert_close(a, b, rtol=0.016, atol=1e-3)
"""

ACTIONS = {
    "read": """
        w = model[0].weight
        total, first = w.sum(), w[0, 0].item()
        assert torch.isfinite(total) and abs(first) < 1 and w.shape == (128, 64) and w.dtype == torch.bfloat16
        assert torch.equal(w.float().sum(), (w.codes.float() * (w.scale / 127)[:, None]).sum())
        print("OK", float(total))
    """,
    "print": """
        text = repr(model) + repr(model[0].weight) + str(model.state_dict())
        assert "Int8Weight(shape=(128, 64)" in text
        print("OK")
    """,
    "eager_forward": """
        with torch.no_grad():
            same(model(x), y)
        print("OK")
    """,
    "state_dict_save_and_load": """
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        assert 128 * 64 <= buffer.tell() < 2 * 128 * 64 * 2  # the int8 codes, not an empty file
        buffer.seek(0)
        state = torch.load(buffer)
        fresh = make_model(seed=1)
        fresh.load_state_dict(state, assign=True)
        with torch.no_grad():
            assert torch.equal(fresh(x), model(x))
            model.load_state_dict(state)  # int8 into int8: nothing changes
            assert torch.equal(compiled(x), y)
        print("OK")
    """,
    "load_state_dict_of_new_fp_weights": """
        new = make_model(seed=1)
        model.load_state_dict(new.state_dict())  # re-quantized into the same tensors
        with torch.no_grad():
            got = compiled(x)
            expected = torch.compile(copy.deepcopy(new), backend="llmint8")(x)
        assert not torch.equal(got, y)
        same(got, expected)
        print("OK")
    """,
    "in_place_writes": """
        with torch.no_grad():
            model[0].weight.mul_(-1)
            same(compiled(x), model(x))
            model[2].weight.data = torch.randn(32, 128, dtype=torch.bfloat16) * 0.1
            same(compiled(x), model(x))
            model[0].weight.zero_()
            assert torch.equal(compiled(x), model(x))
        try:
            model[0].weight.resize_(3, 3)
        except RuntimeError as error:
            print("OK", error)
    """,
    "to_dtype": """
        model.to(torch.float32)
        assert isinstance(model[0].weight, Int8Weight) and model[0].weight.dtype == torch.float32
        with torch.no_grad():
            same(compiled(x.float()), model(x.float()))
        print("OK")
    """,
    "eager_fallback_after_recompile_limit": """
        torch._dynamo.config.recompile_limit = 1
        static = torch.compile(model, backend="llmint8", dynamic=False)
        with torch.no_grad():
            for rows in (3, 4, 5, 6):  # past the limit Dynamo runs the frame eagerly, on the int8 weights
                xs = torch.randn(rows, 64, dtype=torch.bfloat16)
                same(static(xs), model(xs))
        print("OK")
    """,
    "deepcopy_and_a_second_compile": """
        twin = copy.deepcopy(model)
        with torch.no_grad():
            assert torch.equal(twin(x), model(x))
            same(torch.compile(twin, backend="llmint8")(x), y)
        print("OK")
    """,
    "safetensors_save_raises": """
        from safetensors.torch import save
        try:
            save(model.state_dict())
        except RuntimeError as error:
            print("OK", error)
    """,
}


@pytest.mark.parametrize("action", ACTIONS)
def test_user_action_after_compiling(action):
    code = SETUP + textwrap.dedent(ACTIONS[action])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode >= 0, f"killed by signal {-done.returncode}\n{done.stderr[-3000:]}"
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("OK") or "\nOK" in done.stdout, done.stdout + done.stderr[-2000:]
