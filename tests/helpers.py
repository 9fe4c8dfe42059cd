"""Shared test helpers."""

import torch


def outlier_activation(m, k, dtype=torch.float32, outlier_cols=(), magnitude=40.0, seed=0):
    """N(0, 1) activations with the given columns scaled to |x| ~ magnitude (the paper's emergent features)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    for col in outlier_cols:
        x[:, col] *= magnitude
    return x.to(dtype)


def within_bound(y, x, weight, bias, threshold):
    """Assert |y - (x W^T + b)| <= the DESIGN.md bound, elementwise, with a useful message."""
    from int8pass import reference

    exact = x.reshape(-1, x.shape[-1]).double() @ weight.double().t()
    if bias is not None:
        exact = exact + bias.double()
    exact = exact.reshape(*x.shape[:-1], weight.shape[0])
    bound = reference.error_bound(x, weight, bias, threshold)
    err = (y.double() - exact).abs()
    bad = ~(err <= bound)
    assert not bad.any(), f"{int(bad.sum())} elements out of bound; worst err {err[bad].max():.4g} vs bound {bound[bad].min():.4g}"
