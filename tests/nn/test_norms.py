"""LayerNorm, RMSNorm and ScaleNorm against their formulas computed by hand in float64."""

import math

import pytest
import torch

from memlm.nn.norms import RMSNorm, ScaleNorm, make_norm


def layernorm_ref(x, weight, bias, eps):
    x = x.double()
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps) * weight.double()
    return y if bias is None else y + bias.double()


def rmsnorm_ref(x, weight, eps):
    x = x.double()
    return x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + eps) * weight.double()


def scalenorm_ref(x, g, eps):
    x = x.double()
    norm = torch.sqrt((x ** 2).sum(-1, keepdim=True))
    return float(g) * x / torch.clamp(norm, min=eps)


def randomise(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))
    return module


# a (B, T, W) input whose T differs from W, and whose rows have small and large scales, so that
# an eps of 0.5 matters in some rows and not in others
X = torch.randn(2, 3, 6) * torch.tensor([0.05, 1.0, 4.0])[None, :, None]


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_from_make_norm_matches_formula(bias):
    norm = randomise(make_norm("layernorm", 6, 0.5, bias))
    assert (norm.bias is not None) == bias
    assert norm.weight.shape == (6,)
    out = norm(X)
    ref = layernorm_ref(X, norm.weight.detach(), None if norm.bias is None else norm.bias.detach(), 0.5)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("eps", [0.5, 1e-3])
def test_rmsnorm_from_make_norm_matches_formula(eps):
    norm = randomise(make_norm("rmsnorm", 6, eps, bias=True))
    assert isinstance(norm, RMSNorm)
    assert [name for name, _ in norm.named_parameters()] == ["weight"]  # no bias, whatever `bias` says
    out = norm(X)
    torch.testing.assert_close(out.double(), rmsnorm_ref(X, norm.weight.detach(), eps), atol=1e-5, rtol=1e-5)


def test_rmsnorm_starts_as_plain_rms_division_with_default_eps():
    norm = RMSNorm(6)
    torch.testing.assert_close(norm.weight.detach(), torch.ones(6))
    # rows of size ~1e-3: mean(x^2) ~ 1e-6, below the default eps of 1e-5, which then dominates
    x = torch.randn(2, 3, 6) * torch.tensor([1e-3, 3e-3, 1.0])[None, :, None]
    torch.testing.assert_close(norm(x).double(), rmsnorm_ref(x, torch.ones(6), 1e-5), atol=1e-6, rtol=1e-5)


def test_rmsnorm_normalises_the_last_dimension_only():
    norm = randomise(RMSNorm(5))
    x = torch.randn(4, 3, 2, 5)
    out = norm(x)
    for idx in [(0, 0, 0), (3, 2, 1), (1, 1, 0)]:
        row = x[idx].double()
        expect = row / math.sqrt((row ** 2).mean().item() + 1e-5) * norm.weight.detach().double()
        torch.testing.assert_close(out[idx].double(), expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("eps", [2.0, 1e-3])
def test_scalenorm_from_make_norm_matches_formula(eps):
    norm = make_norm("scalenorm", 6, eps, bias=True)
    assert isinstance(norm, ScaleNorm)
    assert [name for name, _ in norm.named_parameters()] == ["scale"]
    assert norm.scale.shape == ()
    torch.testing.assert_close(norm.scale.detach().double(), torch.tensor(math.sqrt(6), dtype=torch.float64))
    # rows of norm ~0.1, ~2.4 and ~10: an eps of 2.0 clamps the first only
    out = norm(X)
    torch.testing.assert_close(out.double(), scalenorm_ref(X, math.sqrt(6), eps), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        norm.scale.fill_(-0.7)
    torch.testing.assert_close(norm(X).double(), scalenorm_ref(X, -0.7, eps), atol=1e-5, rtol=1e-5)


def test_scalenorm_output_norm_is_g_and_default_eps_clamps_tiny_rows():
    norm = ScaleNorm(9)
    x = torch.randn(3, 9)
    torch.testing.assert_close(norm(x).norm(dim=-1), torch.full((3,), 3.0))  # g = sqrt(9)
    tiny = torch.randn(2, 9) * 1e-7  # norm ~3e-7, below the default eps of 1e-5
    ref = scalenorm_ref(tiny, 3.0, 1e-5)
    torch.testing.assert_close(norm(tiny).double(), ref, atol=1e-9, rtol=1e-5)
    medium = torch.randn(2, 9) * 0.1  # norm ~0.3: no clamp
    torch.testing.assert_close(norm(medium).norm(dim=-1), torch.full((2,), 3.0))
    torch.testing.assert_close(norm(torch.zeros(2, 9)), torch.zeros(2, 9))


def test_scalenorm_gain_gets_the_gradient_of_the_formula():
    norm = ScaleNorm(4)
    x = torch.randn(3, 4)
    norm(x).sum().backward()
    # d/dg sum(g x / ||x||) = sum(x / ||x||)
    expect = (x.double() / x.double().norm(dim=-1, keepdim=True)).sum()
    torch.testing.assert_close(norm.scale.grad.double(), expect, atol=1e-5, rtol=1e-5)


def test_unknown_norm_kind_is_refused():
    with pytest.raises(ValueError, match="unknown norm kind 'batchnorm'"):
        make_norm("batchnorm", 6, 1e-5, bias=True)
