"""Shared test helpers."""

import torch


def outlier_activation(m, k, dtype=torch.float32, outlier_cols=(), magnitude=40.0, seed=0):
    """N(0, 1) activations with the given columns scaled to |x| ~ magnitude (the paper's emergent features)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    for col in outlier_cols:
        x[:, col] *= magnitude
    return x.to(dtype)


class Conv1D(torch.nn.Module):
    """GPT-2's Conv1D: weight stored [in, out], y = addmm(b, x, W)."""

    def __init__(self, k, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(k, n) * 0.05)
        self.bias = torch.nn.Parameter(torch.randn(n))

    def forward(self, x):
        size_out = x.size()[:-1] + (self.weight.shape[1],)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class AttentionBlock(torch.nn.Module):
    """A pre-norm transformer block: causal attention (q, k, v projections, k and v without bias; SDPA) and a GELU MLP."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.q, self.out = torch.nn.Linear(d, d), torch.nn.Linear(d, d)
        self.k, self.v = torch.nn.Linear(d, d, bias=False), torch.nn.Linear(d, d, bias=False)
        self.up, self.down = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def forward(self, x):
        b, s, d = x.shape
        h = self.norm1(x)
        q, k, v = (proj(h).view(b, s, self.heads, d // self.heads).transpose(1, 2) for proj in (self.q, self.k, self.v))
        attn = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(attn.transpose(1, 2).reshape(b, s, d))
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm2(x))))


def within_bound(y, x, weight, bias, threshold):
    """Assert |y - (x W^T + b)| <= the docs/design.md bound, elementwise, with a useful message."""
    from int8pass import reference

    exact = x.reshape(-1, x.shape[-1]).double() @ weight.double().t()
    if bias is not None:
        exact = exact + bias.double()
    exact = exact.reshape(*x.shape[:-1], weight.shape[0])
    bound = reference.error_bound(x, weight, bias, threshold)
    err = (y.double() - exact).abs()
    bad = ~(err <= bound)
    assert not bad.any(), f"{int(bad.sum())} elements out of bound; worst err {err[bad].max():.4g} vs bound {bound[bad].min():.4g}"


def assert_close_to_reference(y, x, w_q, s_w, bias, threshold, outlier_weight=None):
    """Y against reference.linear: the same math, so only the fp32 summation order over the outlier columns
    (and FMA contraction on a GPU) may differ, each by at most one rounding of |X| |W^|^T; then one rounding
    to X's dtype (the interpreter truncates to bf16 instead of rounding: under one ulp either way)."""
    from int8pass import reference

    want = reference.linear(x, w_q, s_w, bias, threshold, outlier_weight)
    x2d = x.reshape(-1, w_q.shape[1])
    count = int(reference.quantize_activation(x2d, threshold)[3])
    w_abs = w_q.float().abs() * (s_w / reference.Q_MAX)[:, None]
    magnitude = x2d.float().abs().nan_to_num(0.0, 0.0, 0.0) @ w_abs.t()
    atol = (count + 2) * 2.0**-24 * float(magnitude.max()) + 1e-7 if magnitude.numel() else 0.0
    eps = torch.finfo(x.dtype).eps
    torch.testing.assert_close(y, want, rtol=2 * eps, atol=atol, equal_nan=True)


def tiny_llama(vocab: int, ffn: int = 128):
    """A 2-layer d=64 Hugging Face Llama from a config, seeded, in eval mode (needs transformers)."""
    import transformers

    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=ffn, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()
