"""Feed-forward layers against their formulas written out with explicit matrix products."""

import math

import pytest
import torch

import memlm
from memlm.nn.feedforward import ACTIVATIONS, GATED, FeedForward, hidden_width, squared_relu
from tests.conftest import tiny_overrides


def gelu_ref(x):
    x = x.double()
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def silu_ref(x):
    x = x.double()
    return x / (1 + torch.exp(-x))


def relu2_ref(x):
    x = x.double()
    return torch.clamp(x, min=0) ** 2


REFERENCE = {"gelu": gelu_ref, "relu2": relu2_ref, "swiglu": silu_ref, "geglu": gelu_ref}


def hidden_ref(kind, width, mult):
    """mult * width, truncated; gated kinds: 2/3 of it, truncated, then up to a multiple of 8."""
    hidden = math.floor(mult * width)
    if kind in ("swiglu", "geglu"):
        two_thirds = math.floor(2 * hidden / 3)
        hidden = two_thirds
        while hidden % 8:
            hidden += 1
    return hidden


def linear(x, layer):
    y = x.double() @ layer.weight.detach().double().T
    return y if layer.bias is None else y + layer.bias.detach().double()


def test_activations_are_the_documented_functions():
    x = torch.linspace(-4, 4, 41)
    for kind, fn in ACTIVATIONS.items():
        torch.testing.assert_close(fn(x).double(), REFERENCE[kind](x), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(squared_relu(x).double(), relu2_ref(x))
    assert set(GATED) == {"swiglu", "geglu"}


@pytest.mark.parametrize("kind", ["gelu", "relu2", "swiglu", "geglu"])
def test_hidden_width_matches_the_rounding_rule(kind):
    for width in (8, 12, 24, 48, 50, 64, 100, 768):
        for mult in (1.0, 2.5, 8 / 3, 4.0):
            assert hidden_width(kind, width, mult) == hidden_ref(kind, width, mult), (width, mult)


def test_gated_hidden_width_keeps_the_parameter_count_close_to_ungated():
    assert hidden_width("gelu", 48, 4.0) == 192
    assert hidden_width("swiglu", 48, 4.0) == 128  # 2/3 of 192, already a multiple of 8
    assert hidden_width("geglu", 50, 4.0) == 136  # 2/3 of 200 = 133 -> 136
    assert hidden_width("relu2", 50, 2.5) == 125  # ungated: no rounding


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["gelu", "relu2"])
def test_ungated_layer_matches_formula(kind, bias):
    ff = FeedForward(kind, 12, 2.0, bias=bias)
    assert ff.up.weight.shape == (24, 12) and ff.down.weight.shape == (12, 24)
    assert (ff.up.bias is not None) == bias and (ff.down.bias is not None) == bias
    if bias:  # nn.Linear's biases start random; make them matter
        with torch.no_grad():
            ff.up.bias.normal_()
            ff.down.bias.normal_()
    x = torch.randn(2, 3, 12)
    expect = linear(REFERENCE[kind](linear(x, ff.up)), ff.down)
    torch.testing.assert_close(ff(x).double(), expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["swiglu", "geglu"])
def test_gated_layer_matches_formula(kind, bias):
    ff = FeedForward(kind, 12, 2.0, bias=bias)
    hidden = hidden_ref(kind, 12, 2.0)  # 16
    assert ff.up.weight.shape == (2 * hidden, 12) and ff.down.weight.shape == (12, hidden)
    assert (ff.up.bias is not None) == bias and (ff.down.bias is not None) == bias
    if bias:
        with torch.no_grad():
            ff.up.bias.normal_()
            ff.down.bias.normal_()
    x = torch.randn(2, 3, 12)
    projected = linear(x, ff.up)
    gate, up = projected[..., :hidden], projected[..., hidden:]  # the gate is the first half
    expect = linear(REFERENCE[kind](gate) * up, ff.down)
    torch.testing.assert_close(ff(x).double(), expect, atol=1e-5, rtol=1e-5)


def test_only_the_output_projection_is_marked_residual():
    ff = FeedForward("swiglu", 8, 4.0, bias=False)
    assert ff.down.residual_projection is True
    assert not getattr(ff.up, "residual_projection", False)


def test_model_init_scales_the_feedforward_output_projection_by_depth():
    """The language model initialises the layer marked residual with std init_std / sqrt(2 layers)."""
    layers = 8
    model = memlm.build("seed-tiny", **tiny_overrides(layers=layers, width=64),
                        **{"feedforward.kind": "relu2", "init_std": 0.05})
    down = torch.cat([b.feedforward.down.weight.detach().flatten() for b in model.blocks])
    up = torch.cat([b.feedforward.up.weight.detach().flatten() for b in model.blocks])
    assert down.numel() > 100_000
    assert abs(up.std().item() / 0.05 - 1) < 0.02
    assert abs(down.std().item() / (0.05 / math.sqrt(2 * layers)) - 1) < 0.02
