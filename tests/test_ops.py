"""The llmint8 custom ops: opcheck, static fake shapes, and agreement with the reference."""

import pytest
import torch

import int8pass  # noqa: F401
from int8pass import reference
from tests.helpers import outlier_activation

ops = torch.ops.llmint8


def weight_and_activation(m=5, n=7, k=33, dtype=torch.bfloat16):
    x = outlier_activation(m, k, dtype, outlier_cols=[2, 30])
    weight = torch.randn(n, k).to(dtype)
    w_q, s_w = reference.quantize_weight(weight)
    return x, weight, w_q, s_w


@pytest.mark.parametrize("m", [0, 1, 5])
def test_opcheck_quantize_activation(m):
    x, *_ = weight_and_activation(m=m)
    torch.library.opcheck(ops.quantize_activation.default, (x, 6.0))


def test_opcheck_outlier_matmul():
    x, _, w_q, s_w = weight_and_activation()
    _, _, indices, count = reference.quantize_activation(x, 6.0)
    torch.library.opcheck(ops.outlier_matmul.default, (x, indices, count, w_q, s_w))


def test_opcheck_record_outliers():
    from int8pass import stats

    x, *_ = weight_and_activation()
    stats.reset_stats()
    torch.library.opcheck(ops.record_outliers.default, (x.view(1, 5, 33), 6.0, "layer"))
    (layer,) = stats.outlier_stats()  # opcheck runs the op several times: each call records columns 2 and 30
    assert layer.name == "layer" and layer.calls >= 1 and layer.column_calls[2] == layer.column_calls[30] == layer.calls


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("shape", [(5, 33), (2, 3, 33), (33,)])
def test_opcheck_linear(with_bias, shape):
    _, weight, w_q, s_w = weight_and_activation()
    x = torch.randn(shape).to(torch.bfloat16)
    bias = torch.randn(7).to(torch.bfloat16) if with_bias else None
    torch.library.opcheck(ops.linear.default, (x, w_q, s_w, bias, 6.0))
    torch.library.opcheck(ops.linear.default, (x, w_q, s_w, bias, 6.0, weight))


@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck_int8_mm_dequant(with_bias):
    x, weight, w_q, s_w = weight_and_activation()
    x_q, s_x, indices, count = reference.quantize_activation(x, 6.0)
    bias = torch.randn(7).to(torch.bfloat16) if with_bias else None
    torch.library.opcheck(ops.int8_mm_dequant.default, (x, x_q, s_x, indices, count, w_q, s_w, bias))
    torch.library.opcheck(ops.int8_mm_dequant.default, (x, x_q, s_x, indices, count, w_q, s_w, bias, weight))


@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck_fused_linear(with_bias):
    x, weight, w_q, s_w = weight_and_activation()
    bias = torch.randn(7).to(torch.bfloat16) if with_bias else None
    torch.library.opcheck(ops.fused_linear.default, (x, w_q, s_w, bias, 6.0))
    torch.library.opcheck(ops.fused_linear.default, (x, w_q, s_w, bias, 6.0, weight))


def test_ops_match_reference_bit_exactly():
    x, weight, w_q, s_w = weight_and_activation()
    for got, want in zip(ops.quantize_activation(x, 6.0), reference.quantize_activation(x, 6.0)):
        assert torch.equal(got, want)
    _, _, indices, count = reference.quantize_activation(x, 6.0)
    assert torch.equal(ops.outlier_matmul(x, indices, count, w_q, s_w), reference.outlier_matmul(x, indices, count, w_q, s_w))
    assert torch.equal(ops.linear(x, w_q, s_w, None, 6.0), reference.linear(x, w_q, s_w, None, 6.0))
    y = ops.int8_mm_dequant(x, *reference.quantize_activation(x, 6.0), w_q, s_w, None)
    assert torch.equal(y, reference.linear(x, w_q, s_w, None, 6.0))
    assert torch.equal(ops.fused_linear(x, w_q, s_w, None, 6.0), reference.linear(x, w_q, s_w, None, 6.0))


def test_fake_shapes_are_static():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(11, 64, dtype=torch.float16)
        x_q, s_x, indices, count = ops.quantize_activation(x, 6.0)
        assert (x_q.shape, s_x.shape, indices.shape, count.shape) == ((11, 64), (11,), (64,), (1,))
        y = ops.linear(torch.empty(2, 11, 64, dtype=torch.float16), torch.empty(9, 64, dtype=torch.int8), torch.empty(9), None, 6.0)
        assert y.shape == (2, 11, 9) and y.dtype == torch.float16


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.randn(3, 8), torch.randn(4, 8), torch.ones(4), None, 6.0), "int8"),
        ((torch.randn(3, 9), torch.zeros(4, 8, dtype=torch.int8), torch.ones(4), None, 6.0), "does not end in K=8"),
        ((torch.randn(3, 8), torch.zeros(4, 8, dtype=torch.int8), torch.ones(3), None, 6.0), "weight scale"),
        ((torch.randn(3, 8), torch.zeros(4, 8, dtype=torch.int8), torch.ones(4), torch.ones(5), 6.0), "bias"),
        ((torch.ones(3, 8, dtype=torch.int64), torch.zeros(4, 8, dtype=torch.int8), torch.ones(4), None, 6.0), "floating"),
    ],
)
def test_linear_rejects_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        ops.linear(*args)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("shape", [(5, 33), (2, 3, 33)])
def test_linear_group_is_each_linear(with_bias, shape):
    x = torch.randn(shape).to(torch.bfloat16)
    x[..., 2] = 30.0
    members = [reference.quantize_weight(torch.randn(n, 33).to(torch.bfloat16)) for n in (7, 1, 20)]
    weight_q, weight_scale = [w for w, _ in members], [s for _, s in members]
    bias = [torch.randn(w.shape[0]).to(torch.bfloat16) for w in weight_q] if with_bias else []
    sums = [w.sum(1, dtype=torch.int32) for w in weight_q]
    torch.library.opcheck(ops.linear_group.default, (x, weight_q, weight_scale, bias, 6.0, sums))
    group = ops.linear_group(x, weight_q, weight_scale, bias, 6.0, [])
    for i, y in enumerate(group):
        assert torch.equal(y, ops.linear(x, weight_q[i], weight_scale[i], bias[i] if bias else None, 6.0))


def test_linear_group_rejects_bad_lists():
    x, _, w_q, s_w = weight_and_activation()
    with pytest.raises(ValueError, match="at least one weight"):
        ops.linear_group(x, [], [], [], 6.0, [])
    with pytest.raises(ValueError, match="2 weights but 1 weight_scale"):
        ops.linear_group(x, [w_q, w_q], [s_w], [], 6.0, [])
    with pytest.raises(ValueError, match="2 weights but 1 code_sums"):
        ops.linear_group(x, [w_q, w_q], [s_w, s_w], [], 6.0, [w_q.sum(1, dtype=torch.int32)])
    with pytest.raises(ValueError, match="does not end in K=33"):
        ops.linear_group(x[:, :32], [w_q], [s_w], [], 6.0, [])
