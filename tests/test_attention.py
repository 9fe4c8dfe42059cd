"""Option cpu_attention: bf16/fp16 scaled_dot_product_attention on CPU computed in float32 (int8pass/attention.py),
and llmint8::cpu_decode_attention, which computes its decode calls."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import int8pass
from int8pass import attention, cpu_api
from int8pass.lowering import cpu_linear


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


# ---- llmint8::cpu_decode_attention: the decode calls of the float32 rewrite ----------------------------------------

needs_kernel = pytest.mark.skipif(not cpu_linear.available(), reason="needs an x86-64 CPU with AVX2 and a C++ compiler")


def decode_attention(q, k, v, mask=None, scale=None):
    return torch.ops.llmint8.cpu_decode_attention(q, k, v, mask, q.shape[-1] ** -0.5 if scale is None else scale)


@needs_kernel
@settings(max_examples=50, deadline=None)
@given(batch=st.integers(1, 3), kv_heads=st.integers(1, 3), group=st.integers(1, 5), keys=st.integers(1, 700),
       dim=st.sampled_from([8, 20, 64, 128]), value_dim=st.sampled_from([None, 24]),
       dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]), threads=st.sampled_from([1, 2, 4]),
       mask_kind=st.sampled_from([None, "bool", "float"]), mask_batch=st.booleans(), mask_heads=st.booleans(),
       seed=st.integers(0, 2**16))
def test_decode_attention_is_float32_attention_rounded_once(batch, kv_heads, group, keys, dim, value_dim, dtype,
                                                            threads, mask_kind, mask_batch, mask_heads, seed):
    """Against float64 attention: the float32 arithmetic's error (the keys are split into chunks, merged by
    rescaling) plus one rounding to the dtype, for any grouping, head dims, thread count, cache length and mask
    (boolean or added, broadcast over batch and heads or not)."""
    generator = torch.Generator().manual_seed(seed)
    heads = kv_heads * group
    q = (torch.randn(batch, heads, 1, dim, generator=generator) * 2).to(dtype)
    k = (torch.randn(batch, kv_heads, keys, dim, generator=generator) * 2).to(dtype)
    v = torch.randn(batch, kv_heads, keys, value_dim or dim, generator=generator).to(dtype)
    mask = None
    if mask_kind:
        shape = (batch if mask_batch else 1, heads if mask_heads else 1, 1, keys)
        mask = torch.rand(shape, generator=generator) > 0.3
        if mask_kind == "float":
            mask = torch.where(mask, torch.randn(shape, generator=generator), float("-inf")).to(dtype)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = decode_attention(q, k, v, mask)
    finally:
        torch.set_num_threads(previous)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=True,
                                           attn_mask=None if mask is None else mask if mask_kind == "bool"
                                           else mask.double())
    assert out.dtype == dtype and out.shape == exact.shape and out.is_contiguous()
    bound = torch.finfo(dtype).eps * exact.abs() + 1e-5 * v.double().abs().max()
    assert ((out.double() - exact).abs() <= bound).all()


@needs_kernel
@pytest.mark.parametrize("kind", ["bool", "float", "scores"])
def test_a_row_with_every_key_left_out_is_zero_as_in_pytorch(kind):
    """Every key masked out (or scoring -inf): 0, as PyTorch's attention gives, not NaN; the other rows unchanged."""
    torch.manual_seed(6)
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 300, 16), torch.randn(1, 2, 300, 16)
    mask = torch.ones(1, 4, 1, 300, dtype=torch.bool)
    mask[0, 1] = False
    if kind == "float":
        mask = torch.zeros(1, 4, 1, 300).masked_fill(~mask, float("-inf"))
    elif kind == "scores":
        mask, q[0, 1, 0, 0], k[0, 0, :, 0] = None, float("-inf"), 1.0
    out = decode_attention(q, k, v, mask)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True))
    assert (out[0, 1] == 0).all()


@needs_kernel
def test_decode_attention_reads_strided_caches_in_place():
    """A slice of a larger cache (as a static cache is read), and a query whose head dim is strided (copied first),
    give the contiguous result."""
    torch.manual_seed(2)
    cache_k, cache_v = torch.randn(2, 3, 64, 40, dtype=torch.bfloat16), torch.randn(2, 3, 64, 40, dtype=torch.bfloat16)
    q = torch.randn(2, 6, 1, 80, dtype=torch.bfloat16)[..., ::2]
    k, v = cache_k[:, :, 5:50], cache_v[:, :, 5:50]
    assert not k.is_contiguous() and q.stride(3) == 2
    torch.testing.assert_close(decode_attention(q, k, v), decode_attention(q.contiguous(), k.contiguous(),
                                                                           v.contiguous()), rtol=0, atol=0)


@needs_kernel
def test_decode_attention_nan_and_inf_propagate_as_in_float32():
    torch.manual_seed(3)
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 300, 16), torch.randn(1, 2, 300, 16)
    k[0, 0, 250, 3] = float("nan")  # every head of group 0 scores NaN there
    v[0, 1, 10, 0] = float("inf")  # group 1: an infinite value
    q[0, 3, 0, 5] = float("inf")  # head 3 (group 1): infinite scores
    for dtype in (torch.bfloat16, torch.float32):
        args = (q.to(dtype), k.to(dtype), v.to(dtype))
        out = decode_attention(*args).float()
        expected = F.scaled_dot_product_attention(*(t.float() for t in args), enable_gqa=True)
        torch.testing.assert_close(out.isnan(), expected.isnan(), rtol=0, atol=0)
        torch.testing.assert_close(out.isinf(), expected.isinf(), rtol=0, atol=0)
        assert out[0, :2].isnan().all() and out[0, 3].isnan().all() and out[0, 2].isinf().any()


@needs_kernel
@pytest.mark.parametrize("args, message", [
    ((torch.randn(1, 4, 2, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)), "one token per head"),
    ((torch.randn(1, 3, 1, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)), r"multiple of the key/value heads"),
    ((torch.randn(1, 4, 1, 8), torch.randn(1, 2, 0, 8), torch.randn(1, 2, 0, 8)), "cache is empty"),
    ((torch.randn(1, 4, 1, 8), torch.randn(1, 2, 5, 8).bfloat16(), torch.randn(1, 2, 5, 8)), "one dtype"),
    ((torch.randn(1, 4, 1, 8), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 8)), "must match query"),
    ((torch.randn(4, 1, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8)), "must be 4-D"),
    ((torch.randn(1, 2, 1, 8).double(),) * 3, "must be float32, bfloat16 or float16"),
    ((torch.randn(1, 4, 1, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8),
      torch.ones(1, 1, 1, 6, dtype=torch.bool)),
     r"attn_mask must be a CPU tensor broadcastable to \[1, 4, 1, 5\]"),
    ((torch.randn(1, 4, 1, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.zeros(1, 1, 1, 5).bfloat16()),
     "attn_mask must be boolean or in the query's dtype"),
])
def test_decode_attention_bad_input_is_a_clear_error(args, message):
    with pytest.raises(RuntimeError, match=message):
        decode_attention(*args)


def compiled_report(model, args, **options):
    out, _ = compiled_attention(model, args, **options)
    report = int8pass.last_report()
    return out, report.float32_attention, report.decode_attention


@needs_kernel
@pytest.mark.parametrize("queries, kind, decode", [(1, None, 1), (1, "bool", 1), (1, "float", 1), (3, None, 0),
                                                   (3, "bool", 0)])
def test_decode_calls_run_the_kernel(queries, kind, decode):
    """One query token, with or without a mask: the kernel; a prefill keeps the float32 casts. Either way the output
    is the float32 call rounded once (bit for bit where the casts stay)."""
    torch.manual_seed(4)
    keys = 300
    mask = torch.rand(1, 1, queries, keys) > 0.3 if kind else None
    if kind == "float":
        mask = torch.randn(1, 1, queries, keys).to(torch.bfloat16).masked_fill(~mask, float("-inf"))
    model = Attention(mask=mask).to(torch.bfloat16).eval()
    args = inputs(t=queries, keys=keys)
    out, count, decoded = compiled_report(model, args, cpu_attention="float32", skip_modules=["q"])
    assert (count, decoded) == (1, decode)
    expected = float32_attention(model, *args, mask=mask)
    if decode:
        torch.testing.assert_close(out, expected, rtol=2 * torch.finfo(torch.bfloat16).eps, atol=1e-5)
    else:
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


@needs_kernel
@pytest.mark.parametrize("padded", [False, True])
def test_a_hf_llama_decoding_with_its_cache_runs_the_kernel_in_every_layer(padded):
    """A transformers Llama compiled whole, decoding token by token with its DynamicCache (the cache grows, so the
    decode graph has a dynamic length), one sequence or a left-padded batch of two (then each step has a mask):
    each layer's attention runs the kernel, and the logits of every step are the float32 model's within bf16
    rounding (the linears are left in bf16 here, so only attention changed)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=256, intermediate_size=512,
                                      num_attention_heads=4, num_key_value_heads=1, vocab_size=300)
    config._attn_implementation = "sdpa"
    torch.manual_seed(5)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 300, (2 if padded else 1, 14))
    attention = torch.ones_like(ids)
    if padded:
        attention[1, :3] = 0  # the second sequence is 3 tokens shorter, padded on the left
    with torch.no_grad():
        exact = model(ids, attention_mask=attention).logits[:, 9:]
        model = model.to(torch.bfloat16)
        forward = torch.compile(model.forward, backend="llmint8",
                                options={"cpu_attention": "float32", "min_features": 10**6})
        cache = transformers.DynamicCache()
        steps = [forward(input_ids=ids[:, :10], attention_mask=attention[:, :10], past_key_values=cache,
                         use_cache=True).logits[:, -1]]
        for position in range(10, 14):
            steps.append(forward(input_ids=ids[:, position:position + 1], attention_mask=attention[:, :position + 1],
                                 past_key_values=cache, use_cache=True).logits[:, -1])
            if position == 10:
                assert int8pass.last_report().decode_attention == 2
    error = (torch.stack(steps, 1).float() - exact).abs().max()
    assert error <= 0.03 * exact.abs().max()
