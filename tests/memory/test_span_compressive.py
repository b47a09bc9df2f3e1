"""Adaptive attention span and compressive memory."""

import pytest
import torch

import memlm
from memlm.memory.adaptive_span import AdaptiveSpan
from memlm.memory.compressive import Compressor, split_overflow
from memlm.nn.kernels import eager_attention
from tests.conftest import tiny_overrides


def build(**extra):
    base = tiny_overrides(layers=2, seq_len=8)
    base.update(extra)
    return memlm.build("seed-tiny", **base)


def run_segments(model, ids, size=8):
    state, pieces, outs = model.init_state(ids.shape[0]), [], []
    for start in range(0, ids.shape[1], size):
        out = model(ids[:, start:start + size], targets=ids[:, start:start + size], state=state)
        outs.append(out)
        pieces.append(out.logits)
        state = out.state.detach()
    return torch.cat(pieces, dim=1), state, outs


def test_span_mask_equals_the_formula():
    span = AdaptiveSpan(heads=3, span_max=20, ramp=4, init=0.0)
    with torch.no_grad():
        span.span.copy_(torch.tensor([0.0, 5.5, 20.0]))
    x = torch.arange(0, 30).float()
    m = span.mask(x[None, :].expand(1, -1))  # (H, 1, 30)
    for h, z in enumerate([0.0, 5.5, 20.0]):
        expected = ((4 + z - x) / 4).clamp(0, 1)
        torch.testing.assert_close(m[h, 0], expected)
    bias = span(2, 8, -6, torch.device("cpu"))  # query 0 sees keys at distances 6..0
    assert bias.shape == (3, 2, 8)
    assert bias[0, 0, 0].item() == float("-inf") and bias[2, 0, 0].item() == 0.0
    assert bias[0, 0, 3].item() == pytest.approx(torch.tensor(0.25).log().item())  # distance 3, z = 0


def test_log_mask_bias_reweights_attention_like_the_paper():
    """softmax(s + log m) == m * exp(s) / sum(m * exp(s))."""
    span = AdaptiveSpan(heads=2, span_max=8, ramp=3, init=0.3)
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    out = eager_attention(q, k, v, k_offset=-2, bias=span(4, 6, -2, torch.device("cpu")))
    distance = (torch.arange(4)[:, None] - torch.arange(-2, 4)[None, :]).float()
    m = span.mask(distance.clamp_min(0)) * (distance >= 0)  # (H, 4, 6), causal
    weights = m * torch.exp((q @ k.transpose(-1, -2)) / 8 ** 0.5)[0]
    expected = (weights / weights.sum(-1, keepdim=True)) @ v[0]
    torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=1e-5)


def test_span_penalty_clamping_and_gradient():
    model = build(**{"memory.xl.length": 8, "memory.adaptive_span.enabled": True, "memory.adaptive_span.init": 0.25,
                     "memory.adaptive_span.penalty": 0.01}).train()
    assert model.config.span_max == 16
    ids = torch.randint(0, 256, (2, 8))
    out = model(ids, targets=ids, state=model.init_state(2))
    spans = [b.attention.span.span for b in model.blocks]
    torch.testing.assert_close(out.aux_loss, 0.01 * sum(s.mean() for s in spans))
    (out.loss + out.aux_loss).backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in spans)
    with torch.no_grad():
        spans[0].copy_(torch.tensor([-3.0, 5.0, 40.0, 16.5]))
    model.after_optimizer_step()
    assert spans[0].tolist() == [0.0, 5.0, 16.0, 16.0]
    assert model.spans()[0] == [0.0, 5.0, 16.0, 16.0]
    assert model.blocks[0].attention.span.limit == 16 + 32  # span_max + ramp caps the limit


def test_span_trimming_does_not_change_outputs():
    model = build(**{"memory.xl.length": 24, "memory.adaptive_span.enabled": True, "memory.adaptive_span.ramp": 2}).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attention.span.span.copy_(torch.tensor([1.0, 3.0, 2.0, 4.5]))
    model.after_optimizer_step()
    assert model.blocks[0].attention.span.limit == 7  # ceil(4.5) + 2
    ids = torch.randint(0, 256, (2, 40))
    trimmed, state, _ = run_segments(model, ids)
    assert state.layers[0].mem.shape[1] == 24  # stored in full, trimmed when read
    for block in model.blocks:
        block.attention.span.limit = 10_000
    untrimmed, _, _ = run_segments(model, ids)
    torch.testing.assert_close(trimmed, untrimmed, atol=1e-5, rtol=0)


def test_compressed_memory_sizes_follow_the_rate():
    model = build(**{"memory.xl.length": 8, "memory.compressive.rate": 2, "memory.compressive.length": 6,
                     "memory.compressive.fn": "mean"}).eval()
    state = model.init_state(1)
    sizes = []
    for _ in range(5):
        state = model(torch.randint(0, 256, (1, 8)), state=state).state
        sizes.append((state.layers[0].mem.shape[1], (state.layers[0].cmem if state.layers[0].cmem is not None else torch.empty(1, 0)).shape[1]))
    assert sizes == [(8, 0), (8, 4), (8, 6), (8, 6), (8, 6)]


def test_compression_functions():
    old = torch.arange(24.0).view(1, 6, 4)  # (B, n*c, W) with c = 2
    torch.testing.assert_close(Compressor("max", 4, 2)(old), old.view(1, 3, 2, 4).amax(2))
    torch.testing.assert_close(Compressor("mean", 4, 2)(old), old.view(1, 3, 2, 4).mean(2))
    usage = torch.tensor([[0.1, 0.9, 0.5, 0.2, 0.8, 0.0]])
    torch.testing.assert_close(Compressor("most_used", 4, 2)(old, usage), old[:, [1, 2, 4]])
    conv = Compressor("conv", 4, 2)
    expected = torch.einsum("oik,bki->bo", conv.conv.weight, old[:, 2:4]) + conv.conv.bias
    torch.testing.assert_close(conv(old)[:, 1], expected)
    kept, overflow = split_overflow(torch.arange(11.0).view(1, 11, 1), 6, 2)
    assert kept.flatten().tolist() == [5, 6, 7, 8, 9, 10] and overflow.flatten().tolist() == [1, 2, 3, 4]


def test_reconstruction_loss_trains_only_the_compressor():
    model = build(**{"memory.xl.length": 8, "memory.compressive.rate": 2, "memory.compressive.length": 8,
                     "bias": True}).train()
    _, _, outs = run_segments(model, torch.randint(0, 256, (2, 24)))
    loss = outs[-1].aux_loss
    assert loss.item() > 0
    model.zero_grad()
    loss.backward()
    for name, p in model.named_parameters():
        touched = p.grad is not None and p.grad.abs().sum().item() > 0
        assert touched == name.startswith("compressors."), name
    before = model.compressors[0].conv.weight.detach().clone()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    assert not torch.equal(model.compressors[0].conv.weight, before)


def test_unfilled_compression_equals_plain_recurrence_and_compressed_memory_is_read():
    torch.manual_seed(2)
    plain = build(**{"memory.xl.length": 8}).eval()
    torch.manual_seed(2)
    compressive = build(**{"memory.xl.length": 8, "memory.compressive.rate": 2, "memory.compressive.length": 4,
                           "memory.compressive.fn": "max"}).eval()
    compressive.load_state_dict(plain.state_dict(), strict=False)
    ids = torch.randint(0, 256, (1, 32))
    a, _, _ = run_segments(plain, ids)
    b, _, _ = run_segments(compressive, ids)
    torch.testing.assert_close(b[:, :16], a[:, :16], atol=1e-6, rtol=0)  # nothing compressed yet
    assert not torch.allclose(b[:, 16:], a[:, 16:], atol=1e-4)  # compressed memory is attended to


@pytest.mark.parametrize("bad,field", [({"memory.compressive.rate": 2, "memory.compressive.length": 4}, "memory.compressive.rate"),
                                       ({"memory.adaptive_span.enabled": True, "memory.adaptive_span.init": 2.0}, "memory.adaptive_span.init"),
                                       ({"memory.compressive.fn": "zip"}, "memory.compressive.fn"),
                                       ({"memory.feedback.mode": "memory"}, "memory.feedback.mode")])
def test_memory_config_errors(bad, field):
    with pytest.raises(memlm.ConfigError) as info:
        build(**bad)
    assert info.value.field_name == field
