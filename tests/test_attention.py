"""Option cpu_attention: bf16/fp16 scaled_dot_product_attention on CPU computed in float32 (int8pass/attention.py)."""

import pytest
import torch
import torch.nn.functional as F

import int8pass
from int8pass import attention, cpu_api


class Attention(torch.nn.Module):
    """Grouped-query attention after a linear, as a decoder layer calls it (the linear is rewritten too)."""

    def __init__(self, heads=4, kv_heads=2, head_dim=32, mask=None):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.mask = heads, kv_heads, head_dim, mask
        self.q = torch.nn.Linear(heads * head_dim, heads * head_dim)

    def forward(self, x, k, v):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, enable_gqa=True)


def inputs(dtype=torch.bfloat16, t=3, keys=17):
    torch.manual_seed(0)
    return torch.randn(1, t, 128, dtype=dtype), torch.randn(1, 2, keys, 32, dtype=dtype), torch.randn(1, 2, keys, 32, dtype=dtype)


def compiled_attention(model, args, **options):
    """The compiled model's output, and how many attention calls the backend moved to float32 (its report's count)."""
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend="llmint8", fullgraph=True, options=options)(*args)
    return out, int8pass.last_report().float32_attention


def float32_attention(model, x, k, v, mask=None):
    """The eager model with its attention in float32 and the result rounded to x's dtype: what the rewrite computes."""
    with torch.no_grad():
        q = model.q(x).view(1, x.shape[1], 4, 32).transpose(1, 2)
    mask = mask.float() if mask is not None and mask.is_floating_point() else mask
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_attention_is_the_float32_call_rounded_once(dtype):
    model = Attention().to(dtype).eval()
    args = inputs(dtype)
    out, count = compiled_attention(model, args, cpu_attention="float32", skip_modules=["q"])
    assert count == 1 and out.dtype == dtype
    torch.testing.assert_close(out, float32_attention(model, *args), rtol=0, atol=0)


def test_native_attention_is_left_as_it_is():
    model = Attention().to(torch.bfloat16).eval()
    args = inputs()
    out, count = compiled_attention(model, args, cpu_attention="native", skip_modules=["q"])
    assert count == 0
    with torch.no_grad():
        torch.testing.assert_close(out, model(*args), rtol=0, atol=0)


def test_float32_attention_inputs_are_not_touched():
    _, count = compiled_attention(Attention().eval(), inputs(torch.float32), cpu_attention="float32")
    assert count == 0


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.bfloat16])
def test_masks_a_boolean_one_kept_a_floating_one_cast(mask_dtype):
    torch.manual_seed(1)
    mask = torch.rand(1, 1, 3, 17) > 0.3 if mask_dtype == torch.bool else torch.randn(1, 1, 3, 17).to(mask_dtype)
    model = Attention(mask=mask).to(torch.bfloat16).eval()
    args = inputs()
    out, count = compiled_attention(model, args, cpu_attention="float32", skip_modules=["q"])
    assert count == 1
    torch.testing.assert_close(out, float32_attention(model, *args, mask=mask), rtol=0, atol=0)


def test_auto_is_float32_without_amx(monkeypatch):
    for amx in (False, True):
        monkeypatch.setattr(cpu_api, "has_amx", lambda amx=amx: amx)
        assert attention.runs_in_float32("auto") is not amx
        _, count = compiled_attention(Attention().to(torch.bfloat16).eval(), inputs())
        assert count == (0 if amx else 1)
    assert attention.runs_in_float32("float32") and not attention.runs_in_float32("native")


def test_with_int8_linears_the_output_stays_within_bf16_attention_noise():
    """The whole compiled block (int8 q projection, float32 attention) against the eager bf16 model."""
    model = Attention().to(torch.bfloat16).eval()
    args = inputs(t=1, keys=200)
    out, count = compiled_attention(model, args)
    with torch.no_grad():
        ref = model(*args).float()
    assert count == (0 if cpu_api.has_amx() else 1)
    assert (out.float() - ref).abs().max() <= 0.05 * ref.abs().max()


def test_quantize_refuses_the_compile_option():
    with pytest.raises(ValueError, match="'cpu_attention' applies to torch.compile"):
        int8pass.quantize_(torch.nn.Linear(8, 8), cpu_attention="native")
