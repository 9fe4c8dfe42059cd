"""Int8Weight on its own: the codes match the reference bit for bit, and every use of the tensor works."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F

import int8pass
from int8pass import int8_weight, reference
from int8pass.int8_weight import Int8Weight
from tests.helpers import assert_close_to_reference, outlier_activation

def make(n=24, k=40, dtype=torch.bfloat16, seed=0, **kwargs):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(n, k, generator=g) * 0.05).to(dtype)
    return weight, Int8Weight.from_float(weight, **kwargs)


@pytest.mark.parametrize("transposed", [False, True])
def test_codes_and_scales_are_the_reference_bit_for_bit(transposed, monkeypatch):
    monkeypatch.setattr(int8_weight, "_QUANTIZE_BLOCK_ELEMENTS", 3 * 40)  # several row blocks
    weight, w = make()
    stored = weight.t().contiguous() if transposed else weight
    w = Int8Weight.from_float(stored, transposed=transposed)
    want_codes, want_scale = reference.quantize_weight(weight)
    assert torch.equal(w.codes, want_codes) and torch.equal(w.scale, want_scale)
    assert w.code_sums.dtype == torch.int32 and torch.equal(w.code_sums, want_codes.sum(1, dtype=torch.int32))
    assert w.shape == stored.shape and w.dtype == torch.bfloat16 and not w.requires_grad
    assert w.out_features == 24 and w.in_features == 40
    assert torch.equal(w.dequantize(), ((want_codes.float() * (want_scale / 127)[:, None]).to(torch.bfloat16).t()
                                        if transposed else (want_codes.float() * (want_scale / 127)[:, None]).to(torch.bfloat16)))


@pytest.mark.parametrize("shape", [(5, 40), (2, 3, 40), (1, 40)])
def test_eager_linear_runs_the_llmint8_math(shape):
    weight, w = make()
    bias = torch.randn(24).to(torch.bfloat16)
    x = outlier_activation(shape[0] * (shape[1] if len(shape) == 3 else 1), 40, torch.bfloat16, outlier_cols=[3]).reshape(shape)
    w_q, s_w = reference.quantize_weight(weight)
    assert_close_to_reference(F.linear(x, w), x, w_q, s_w, None, 6.0)
    if len(shape) == 2:  # addmm: the bias inside the llmint8 epilogue
        assert_close_to_reference(F.linear(x, w, bias), x, w_q, s_w, bias, 6.0)
    # GPT-2's Conv1D: the weight stored [in, out], y = addmm(b, x, W)
    conv = Int8Weight.from_float(weight.t().contiguous(), transposed=True)
    assert_close_to_reference(torch.addmm(bias, x.reshape(-1, 40), conv), x.reshape(-1, 40), w_q, s_w, bias, 6.0)


def test_eager_cpu_calls_are_the_custom_op_and_fake_tensors_still_trace():
    from torch._subclasses.fake_tensor import FakeTensorMode

    weight, w = make()
    x = outlier_activation(5, 40, torch.bfloat16, outlier_cols=[3])
    # eagerly on CPU, F.linear calls llmint8::linear's CPU kernel itself (skipping the custom op's Python layers)
    assert torch.equal(F.linear(x, w), torch.ops.llmint8.linear(x, w.codes, w.scale, None, w.threshold))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:  # tracing: the op (and its fake), not the kernel
        y = F.linear(mode.from_tensor(x), w)
    assert y.shape == (5, 24) and y.dtype == torch.bfloat16


def test_eager_linear_skips_the_aten_ops_and_traced_linear_still_reaches_them(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    weight, w = make()
    x = outlier_activation(5, 40, torch.bfloat16, outlier_cols=[3])
    bias = torch.nn.Parameter(torch.randn(24).to(torch.bfloat16), requires_grad=False)  # as nn.Linear holds it
    dispatched = []
    handle = Int8Weight.__torch_dispatch__.__func__

    def counting(cls, func, types, args=(), kwargs=None):
        dispatched.append(func)
        return handle(cls, func, types, args, kwargs)

    monkeypatch.setattr(Int8Weight, "__torch_dispatch__", classmethod(counting))
    # eagerly, F.linear is the weight's linear itself: no aten.t / aten.addmm round trip through __torch_dispatch__
    y = F.linear(x, w, bias)
    assert dispatched == []
    assert torch.equal(y, torch.ops.llmint8.linear(x, w.codes, w.scale, bias, w.threshold, None, w.code_sums))
    # with a gradient to record, the same op with its autograd formula
    x_grad = x.clone().requires_grad_()
    F.linear(x_grad, w, bias).float().sum().backward()
    assert dispatched == [] and x_grad.grad.shape == x.shape
    # traced (a dispatch mode on, as under AOT autograd and torch.export): the aten ops, as the FX pass expects
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        F.linear(mode.from_tensor(x), w, bias)
    assert torch.ops.aten.addmm.default in dispatched


@pytest.mark.parametrize("block_size", [0, 32])
def test_a_trainable_bias_gets_its_gradient_eagerly(block_size):
    # a frozen int8 weight with a trainable bias (or adapters trained on its output), the input needing none: the
    # bias's gradient is the output gradient summed over the rows, as for any linear
    weight, w = make(k=64, block_size=block_size)
    bias = torch.nn.Parameter(torch.randn(24))
    x = outlier_activation(5, 64, torch.float32, outlier_cols=[3])
    grad = torch.randn(5, 24)
    F.linear(x, w, bias).backward(grad)
    assert bias.grad is not None and torch.allclose(bias.grad, grad.sum(0))
    with torch.no_grad():  # nothing to record: the kernel itself
        assert F.linear(x, w, bias).grad_fn is None


def test_reads_see_dequantized_values_or_the_kept_original():
    weight, w = make()
    dequantized = w.dequantize()
    assert torch.equal(w.sum(), dequantized.sum()) and torch.equal(w[3], dequantized[3])
    assert type(w.view(-1)) is torch.Tensor and torch.equal(w.view(-1), dequantized.view(-1))
    # a new face dtype over the same codes: the values are dequantized in it
    fp32 = w.codes.float() * (w.scale / 127)[:, None]
    assert w.float().dtype == torch.float32 and torch.equal(w.float().sum(), fp32.sum())
    assert type(w.int()) is torch.Tensor
    assert "Int8Weight(shape=(24, 40)" in repr(w) and "Int8Weight" in repr(torch.nn.Parameter(w, requires_grad=False))
    assert torch.equal(F.embedding(torch.tensor([1, 5]), w), dequantized[[1, 5]])
    _, kept = make(keep_original=True)
    assert torch.equal(kept.sum(), weight.sum()) and torch.equal(F.embedding(torch.tensor([2]), kept), weight[[2]])


def test_in_place_writes_requantize_into_the_same_tensors():
    weight, w = make()
    scale, codes = w.scale, w.codes
    w.mul_(2)
    assert torch.equal(w.codes, reference.quantize_weight(w.dequantize())[0])
    new = torch.randn(24, 40).to(torch.bfloat16)
    w.copy_(new)
    want_codes, want_scale = reference.quantize_weight(new)
    assert torch.equal(w.codes, want_codes) and torch.equal(w.scale, want_scale)
    sums = w.code_sums
    assert torch.equal(sums, want_codes.sum(1, dtype=torch.int32))
    assert w.scale is scale and w.codes is codes  # compiled graphs read these same tensors
    other = Int8Weight.from_float(weight)
    w.copy_(other)  # int8 into int8: the codes as they are
    assert torch.equal(w.codes, other.codes) and torch.equal(w.scale, other.scale)
    assert w.code_sums is sums and torch.equal(sums, other.code_sums)
    with pytest.raises(RuntimeError, match="cannot write into an Int8Weight"):
        w.resize_(3, 3)
    with pytest.raises(RuntimeError, match="cannot write into an Int8Weight"):
        torch.add(torch.ones(24, 40), 1, out=w)


def test_copies_moves_and_serialization_round_trip(tmp_path):
    weight, w = make(threshold=4.0)
    half = w.to(torch.float16)
    assert isinstance(half, Int8Weight) and half.dtype == torch.float16 and torch.equal(half.codes, w.codes)
    for twin in (copy.deepcopy(w), w.clone()):
        assert torch.equal(twin.codes, w.codes) and twin.scale is not w.scale and twin.threshold == 4.0
        twin.mul_(0)
        assert w.codes.abs().sum() > 0  # independent of the original
    buffer = io.BytesIO()
    torch.save({"w": w}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)["w"]  # weights_only=True, the default
    assert isinstance(loaded, Int8Weight) and torch.equal(loaded.codes, w.codes) and torch.equal(loaded.scale, w.scale)
    assert loaded.dtype == w.dtype and loaded.threshold == 4.0


def test_compile_cache_key_is_the_layout_not_the_values():
    """AOT autograd's cache key (_stable_hash_for_caching): two weights of one layout share it, whatever their
    values, so a second model of the same shapes reuses the compiled graph; any static difference changes it."""
    _, w = make(seed=0)
    _, same_layout = make(seed=1)
    assert not torch.equal(w.codes, same_layout.codes)
    assert w._stable_hash_for_caching() == same_layout._stable_hash_for_caching()
    others = [make(threshold=4.0)[1], make(n=16)[1], make(dtype=torch.float16)[1], make(block_size=32)[1],
              make(keep_original=True)[1]]
    keys = {w._stable_hash_for_caching()} | {other._stable_hash_for_caching() for other in others}
    assert len(keys) == 1 + len(others)


def test_module_state_dict_round_trips_and_loads_fp_weights():
    torch.manual_seed(0)
    linear = torch.nn.Linear(40, 24).to(torch.bfloat16)
    int8pass.quantize_(linear)
    assert isinstance(linear.weight, Int8Weight) and isinstance(linear.weight, torch.nn.Parameter)
    x = outlier_activation(4, 40, torch.bfloat16)
    y = linear(x)
    state = linear.state_dict()
    fresh = torch.nn.Linear(40, 24).to(torch.bfloat16)
    fresh.load_state_dict(state, assign=True)
    assert isinstance(fresh.weight, Int8Weight) and torch.equal(fresh(x), y)
    # an fp state dict into int8 weights: re-quantized
    fp = torch.nn.Linear(40, 24).to(torch.bfloat16)
    linear.load_state_dict(fp.state_dict())
    assert torch.equal(linear.weight.codes, reference.quantize_weight(fp.weight.detach())[0])
