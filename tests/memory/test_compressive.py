"""Compressive memory (arXiv 1911.05507): what trains the compressor, and its formulas against
independent computations."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import memlm
from memlm.memory import compressive
from memlm.memory.compressive import Compressor, split_overflow
from tests.conftest import build_tiny, run_segments, tiny_overrides

COMPRESSIVE = {"memory.xl.length": 8, "memory.compressive.rate": 2, "memory.compressive.length": 6}
CONFIGS = {
    "plain": {},
    "bias": {"bias": True},
    "feedback": {"memory.feedback.mode": "memory"},
    "tokens": {"memory.tokens.count": 2, "position.kind": "rope"},
    "recurrent-tokens": {"memory.tokens.count": 2, "memory.tokens.recurrent": True},
    "knn+span+persistent": {"memory.knn.layers": [1], "memory.knn.k": 4, "memory.knn.capacity": 64,
                            "memory.adaptive_span.enabled": True, "memory.adaptive_span.init": 0.5, "memory.persistent.vectors": 2},
}


def build(**extra):
    overrides = tiny_overrides(layers=2, seq_len=8, **COMPRESSIVE)
    overrides.update(extra)
    return memlm.build("seed-tiny", **overrides)


def compressor_grads(model):
    return {name: p.grad for name, p in model.named_parameters() if name.startswith("compressors.")}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_only_the_reconstruction_loss_reaches_the_compressor(config):
    """The paper trains the compressor with the attention-reconstruction loss alone: the LM loss,
    over calls that each run several segments and a state never detached, leaves it no gradient."""
    model = build(**CONFIGS[config]).train()
    state = model.init_state(2)
    lm_loss, aux_loss = 0.0, 0.0
    for _ in range(2):  # 2 calls x 3 segments: compression starts in the first call
        ids = torch.randint(0, 256, (2, 24))
        out = model(ids, targets=ids, state=state)
        lm_loss, aux_loss, state = lm_loss + out.loss, aux_loss + out.aux_loss, out.state
    lm_loss.backward(retain_graph=True)
    for name, grad in compressor_grads(model).items():
        assert grad is None or not grad.any(), name
    assert model.blocks[0].attention.qkv.weight.grad.abs().sum() > 0  # the LM loss did flow
    model.zero_grad()
    aux_loss.backward()
    grads = compressor_grads(model)
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def manual_content_attention(attention, h, memory):
    """Softmax attention of every head, written out from the layer's weights (float64)."""
    H, Hkv, D = attention.heads, attention.kv_heads, attention.head_dim
    w = attention.qkv.weight.double()
    b = attention.qkv.bias.double() if attention.qkv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    q_all = h.double() @ w[:H * D].T + b[:H * D]  # (B, T, H*D)
    kv = memory.double() @ w[H * D:].T + b[H * D:]  # (B, n, 2*Hkv*D)
    out = torch.zeros(h.shape[0], H, h.shape[1], D, dtype=torch.float64)
    for head in range(H):
        g = head // (H // Hkv)
        q = q_all[..., head * D:(head + 1) * D]
        k = kv[..., g * D:(g + 1) * D]
        v = kv[..., Hkv * D + g * D:Hkv * D + (g + 1) * D]
        if attention.qk_scale is not None:
            scores = (q / q.norm(dim=-1, keepdim=True)) @ (k / k.norm(dim=-1, keepdim=True)).transpose(1, 2)
            scores = scores * attention.qk_scale.double()
        else:
            scores = q @ k.transpose(1, 2) / math.sqrt(D)
        out[:, head] = scores.softmax(-1) @ v
    return out


@pytest.mark.parametrize("preset,extra", [("seed-tiny", {}), ("vanilla-tiny", {"attention.kv_heads": 2})])
def test_reconstruction_loss_is_the_mean_squared_attention_difference(preset, extra):
    model = memlm.build(preset, **tiny_overrides(layers=1, **extra))
    attention = model.blocks[0].attention
    h, old, compressed = torch.randn(2, 5, 32), torch.randn(2, 6, 32), torch.randn(2, 3, 32)
    expected = (manual_content_attention(attention, h, old)
                - manual_content_attention(attention, h, compressed)).pow(2).mean()
    loss = compressive.reconstruction_loss(attention, h, old, compressed)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=0)


@pytest.mark.parametrize("preset", ["seed-tiny", "vanilla-tiny"])
def test_most_used_ranks_by_the_layers_own_attention(preset):
    """usage = attention each memory receives, summed over heads and the segment's queries, with the
    layer's QK-norm and scale (seed) or 1/sqrt(d) and biases (vanilla)."""
    model = memlm.build(preset, **tiny_overrides(layers=1))
    attention = model.blocks[0].attention
    if attention.qkv.bias is not None:
        with torch.no_grad():
            attention.qkv.bias.normal_()
    h, memory = torch.randn(2, 5, 32), torch.randn(2, 6, 32)
    H, D = attention.heads, attention.head_dim
    w = attention.qkv.weight.double()
    b = attention.qkv.bias.double() if attention.qkv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    q = (h.double() @ w[:H * D].T + b[:H * D]).view(2, 5, H, D).transpose(1, 2)
    k = (memory.double() @ w[H * D:H * D + attention.kv_heads * D].T + b[H * D:H * D + attention.kv_heads * D])
    k = k.view(2, 6, attention.kv_heads, D).transpose(1, 2).repeat_interleave(H // attention.kv_heads, dim=1)
    if attention.qk_scale is not None:
        scores = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(k, dim=-1).transpose(-1, -2)
        scores = scores * attention.qk_scale.double()
    else:
        scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    expected = scores.softmax(-1).sum(dim=(1, 2))  # (B, n)
    torch.testing.assert_close(compressive.usage(attention, h, memory).double(), expected, rtol=1e-4, atol=1e-5)


def test_bias_free_compressor_has_no_bias_and_conv_is_the_strided_convolution():
    free = compressive.Compressor("conv", 4, 2, bias=False)
    assert free.conv.bias is None
    old = torch.randn(1, 6, 4)
    expected = torch.einsum("oik,bki->bo", free.conv.weight, old[:, 4:6])
    torch.testing.assert_close(free(old)[:, 2], expected)
    assert memlm.build("seed-compressive-tiny").compressors[0].conv.bias is None


def randomise_biases(attention):
    with torch.no_grad():
        attention.qkv.bias.normal_()


@pytest.mark.parametrize("preset", ["seed-tiny", "vanilla-tiny"])
def test_content_attention_is_the_layers_softmax_attention_with_its_biases(preset):
    """Key biases move QK-normed scores and value biases move every output: both are the layer's."""
    model = memlm.build(preset, **tiny_overrides(layers=1, bias=True))
    attention = model.blocks[0].attention
    randomise_biases(attention)
    h, memory = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    expected = manual_content_attention(attention, h, memory)
    torch.testing.assert_close(compressive.content_attention(attention, h, memory).double(), expected,
                               rtol=1e-4, atol=1e-5)
    if attention.qk_scale is not None:  # under QK-norm the key bias changes which memories are used
        unbiased = copy.deepcopy(attention)
        keys = slice(attention.heads * attention.head_dim, (attention.heads + attention.kv_heads) * attention.head_dim)
        with torch.no_grad():
            unbiased.qkv.bias[keys] = 0
        assert not torch.allclose(compressive.usage(attention, h, memory), compressive.usage(unbiased, h, memory),
                                  atol=1e-3)
    torch.testing.assert_close(compressive.usage(attention, h, memory).double(),
                               manual_content_weights(attention, h, memory).sum(dim=(1, 2)), rtol=1e-4, atol=1e-5)


def manual_content_weights(attention, h, memory):
    """(B, H, T, n) softmax weights of every head, written out from the layer's weights (float64)."""
    H, Hkv, D = attention.heads, attention.kv_heads, attention.head_dim
    w, b = attention.qkv.weight.double(), attention.qkv.bias.double()
    q = (h.double() @ w[:H * D].T + b[:H * D]).unflatten(-1, (H, D)).transpose(1, 2)
    k = (memory.double() @ w[H * D:H * D + Hkv * D].T + b[H * D:H * D + Hkv * D]).unflatten(-1, (Hkv, D))
    k = k.transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
    if attention.qk_scale is not None:
        q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
        return (q @ k.transpose(-1, -2) * attention.qk_scale.double()).softmax(-1)
    return (q @ k.transpose(-1, -2) / math.sqrt(D)).softmax(-1)


def test_content_attention_in_bfloat16_returns_the_layers_dtype():
    """A bfloat16 layer's content attention: float32 softmax, output in bfloat16, close to float64."""
    model = memlm.build("vanilla-tiny", **tiny_overrides(layers=1)).to(torch.bfloat16)
    attention = model.blocks[0].attention
    h, memory = torch.randn(2, 5, 32, dtype=torch.bfloat16), torch.randn(2, 6, 32, dtype=torch.bfloat16)
    out = compressive.content_attention(attention, h, memory)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), manual_content_attention(attention, h, memory), rtol=0.05, atol=0.02)


@pytest.mark.parametrize("kind", ["max", "mean", "most_used"])
def test_pooling_compressors_have_no_parameters(kind):
    """Only the convolution is learned: max, mean and most-used add no parameter to the model."""
    assert list(compressive.Compressor(kind, 32, 2).parameters()) == []
    plain = memlm.build("seed-tiny", **tiny_overrides(layers=2, seq_len=8, **{"memory.xl.length": 8}))
    model = build(**{"memory.compressive.fn": kind})
    assert model.num_parameters() == plain.num_parameters()


def test_most_used_keeps_each_rows_most_attended_memories_in_order():
    """Per batch row: the n = len / c memories with the largest usage, oldest first."""
    old = torch.randn(3, 8, 5)
    usage = torch.rand(3, 8)
    out = compressive.Compressor("most_used", 5, 2)(old, usage)
    for row in range(3):
        ranked = sorted(range(8), key=lambda j: -usage[row, j].item())[:4]
        torch.testing.assert_close(out[row], old[row, sorted(ranked)])


def test_compressed_memory_sizes_follow_the_rate():
    model = build_tiny(**{"memory.xl.length": 8, "memory.compressive.rate": 2, "memory.compressive.length": 6,
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
    model = build_tiny(**{"memory.xl.length": 8, "memory.compressive.rate": 2, "memory.compressive.length": 8,
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
    plain = build_tiny(**{"memory.xl.length": 8}).eval()
    torch.manual_seed(2)
    compressive = build_tiny(**{"memory.xl.length": 8, "memory.compressive.rate": 2, "memory.compressive.length": 4,
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
        build_tiny(**bad)
    assert info.value.field_name == field


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_compress_sees_the_layers_attention_inputs(placement):
    """compress() ranks (most_used) and reconstructs (conv) with the layer's attention over what it
    attends to: attn_norm of the segment and memories under pre-norm, the states themselves under
    post-norm; the loss only for a learned (conv) compressor in training."""
    model = build_tiny(**{"norm.placement": placement, "bias": True})
    block = model.blocks[0]
    with torch.no_grad():
        block.attention.qkv.bias.normal_()
        for p in block.attn_norm.parameters():
            p.uniform_(0.5, 2.0)
    segment, overflow = 2 * torch.randn(2, 5, 32) + 1, 2 * torch.randn(2, 8, 32) + 1
    norm = (lambda x: block.attn_norm(x).detach()) if placement == "pre" else (lambda x: x)
    other = (lambda x: x) if placement == "pre" else (lambda x: block.attn_norm(x).detach())

    def ranked(f):
        used = manual_content_weights(block.attention, f(segment), f(overflow)).sum(dim=(1, 2))
        return used.topk(4, dim=1).indices.sort(dim=1).values

    keep = ranked(norm)
    assert not torch.equal(keep, ranked(other))  # the norm changes the choice: the test can tell
    out, loss = compressive.compress(block, Compressor("most_used", 32, 2), segment, overflow, training=True)
    torch.testing.assert_close(out, overflow.gather(1, keep[..., None].expand(-1, -1, 32)))
    assert loss is None

    conv = Compressor("conv", 32, 2)
    out, loss = compressive.compress(block, conv, segment, overflow, training=True)
    compressed = conv(overflow).detach()
    torch.testing.assert_close(out, compressed)
    h = norm(segment)
    expected = (manual_content_attention(block.attention, h, norm(overflow))
                - manual_content_attention(block.attention, h, norm(compressed))).pow(2).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=0)
    assert compressive.compress(block, conv, segment, overflow, training=False)[1] is None
    with torch.no_grad():
        assert compressive.compress(block, conv, segment, overflow, training=True)[1] is None
    out, loss = compressive.compress(block, Compressor("mean", 32, 2), segment, overflow, training=True)
    assert loss is None
    torch.testing.assert_close(out, overflow.view(2, 4, 2, 32).mean(2))


def test_the_conv_compressor_equals_a_strided_convolution_with_its_gradients():
    """The compressor computes its Conv1d (kernel = stride = rate) as one matrix product: the
    output and the gradients of the input, weight and bias equal torch's convolution's."""
    for rate, length in [(4, 12), (3, 10)]:  # 10: the last state is left over, as conv1d leaves it
        compressor = Compressor("conv", 6, rate)
        old = torch.randn(2, length, 6, dtype=torch.float64, requires_grad=True)
        compressor.double()
        out = compressor(old)
        expected = F.conv1d(old.transpose(1, 2), compressor.conv.weight, compressor.conv.bias, stride=rate).transpose(1, 2)
        torch.testing.assert_close(out, expected)
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, (old, compressor.conv.weight, compressor.conv.bias), grad)
        want = torch.autograd.grad(expected, (old, compressor.conv.weight, compressor.conv.bias), grad)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
