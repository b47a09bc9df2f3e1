"""Norms, feed-forward activations, attention heads, QK-norm, bias-free and forgetful masking."""

import math

import pytest
import torch
import torch.nn.functional as F

import memlm
from memlm.nn import attention as attention_module
from memlm.nn.feedforward import FeedForward, hidden_width, squared_relu
from memlm.nn.norms import RMSNorm, ScaleNorm
from tests.conftest import tiny_overrides


def test_scalenorm_formula_and_init():
    norm = ScaleNorm(16)
    assert norm.scale.item() == pytest.approx(4.0)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(norm(x), 4.0 * x / x.norm(dim=-1, keepdim=True))
    assert sum(p.numel() for p in norm.parameters()) == 1


def test_rmsnorm_formula():
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8))
    x = torch.randn(4, 8)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)


def test_squared_relu_formula_and_feedforward():
    x = torch.randn(100)
    torch.testing.assert_close(squared_relu(x), torch.where(x > 0, x * x, torch.zeros_like(x)))
    ff = FeedForward("relu2", 8, 4.0, bias=False)
    h = torch.randn(2, 3, 8)
    torch.testing.assert_close(ff(h), F.relu(h @ ff.up.weight.T).square() @ ff.down.weight.T)
    glu = FeedForward("swiglu", 12, 4.0, bias=False)
    hidden = hidden_width("swiglu", 12, 4.0)
    assert hidden == 32 and glu.up.weight.shape == (64, 12)
    x = torch.randn(2, 12)
    gate, up = (x @ glu.up.weight.T).chunk(2, -1)
    torch.testing.assert_close(glu(x), (F.silu(gate) * up) @ glu.down.weight.T)


@pytest.mark.parametrize("kind", ["relu2", "swiglu"])
def test_feedforward_dropout_acts_on_the_hidden_activations_in_training_only(kind):
    """down(drop(act(...))): the same mask on the hidden units gives the formula; evaluation and
    p = 0 leave the layer as it was; the block passes feedforward.dropout to its layer."""
    torch.manual_seed(0)
    ff = FeedForward(kind, 8, 4.0, bias=False, dropout=0.5)
    x = torch.randn(2, 3, 8)
    if kind == "relu2":
        hidden = F.relu(x @ ff.up.weight.T).square()
    else:
        gate, up = (x @ ff.up.weight.T).chunk(2, -1)
        hidden = F.silu(gate) * up
    torch.manual_seed(1)
    dropped = ff(x)
    torch.manual_seed(1)
    mask = F.dropout(torch.ones_like(hidden), 0.5)  # the same draw: 0 or 1 / (1 - p)
    torch.testing.assert_close(dropped, (hidden * mask) @ ff.down.weight.T)
    assert (mask == 0).any() and (mask == 2).any()
    ff.eval()
    torch.testing.assert_close(ff(x), hidden @ ff.down.weight.T)
    model = memlm.build("seed-tiny", **tiny_overrides(layers=1), **{"feedforward.dropout": 0.3})
    assert model.blocks[0].feedforward.dropout.p == 0.3
    with pytest.raises(memlm.config.ConfigError, match="feedforward.dropout"):
        memlm.build("seed-tiny", **{"feedforward.dropout": 1.0})


def attention_params(width, heads, kv_heads, head_dim, bias):
    weights = width * heads * head_dim + 2 * width * kv_heads * head_dim + heads * head_dim * width
    biases = (heads * head_dim + 2 * kv_heads * head_dim + width) if bias else 0
    return weights + biases


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_attention_parameter_count_formula(kv_heads, bias):
    model = memlm.build("vanilla-tiny", **tiny_overrides(**{"attention.kv_heads": kv_heads, "bias": bias}))
    attn = model.blocks[0].attention
    assert sum(p.numel() for p in attn.parameters()) == attention_params(32, 4, kv_heads, 8, bias)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_attention_equals_multi_head_with_each_groups_key_value_weights(kv_heads):
    """kv_heads groups of heads/kv_heads consecutive query heads share one key/value head: a
    multi-head model whose head j gets the key/value weights of group j // (heads / kv_heads)
    computes the same function (multi-query at kv_heads = 1, arXiv 1911.02150)."""
    grouped = memlm.build("vanilla-tiny", **tiny_overrides(**{"attention.kv_heads": kv_heads})).eval()
    mha = memlm.build("vanilla-tiny", **tiny_overrides()).eval()
    assert grouped.blocks[0].attention.qkv.weight.shape[0] == (4 + 2 * kv_heads) * 8 < \
        mha.blocks[0].attention.qkv.weight.shape[0]
    state = {k: v for k, v in grouped.state_dict().items() if "qkv" not in k}
    D, H = 8, 4

    def per_head(t):  # (kv_heads * D, ...) -> (H * D, ...): group g's rows for heads g*H/kv .. (g+1)*H/kv-1
        return t.view(kv_heads, D, *t.shape[1:]).repeat_interleave(H // kv_heads, dim=0).reshape(H * D, *t.shape[1:])

    with torch.no_grad():
        for src, dst in zip(grouped.blocks, mha.blocks):
            for name in ("weight", "bias"):
                q, k, v = getattr(src.attention.qkv, name).split([H * D, kv_heads * D, kv_heads * D])
                getattr(dst.attention.qkv, name).copy_(torch.cat([q, per_head(k), per_head(v)]))
    mha.load_state_dict(state, strict=False)
    ids = torch.randint(0, 256, (2, 10))
    torch.testing.assert_close(mha(ids).logits, grouped(ids).logits, atol=1e-5, rtol=1e-5)


def test_qk_norm_unit_vectors_learnable_scale(monkeypatch):
    model = memlm.build("seed-tiny", **tiny_overrides(**{"position.kind": "none"}))
    attn = model.blocks[0].attention
    assert attn.qk_scale.item() == pytest.approx(math.log2(64 * 64 - 64))
    seen = []
    original = attention_module.attend

    def spy(q, k, v, **kwargs):
        seen.append((q.detach(), k.detach(), kwargs["scale"]))
        return original(q, k, v, **kwargs)

    monkeypatch.setattr(attention_module, "attend", spy)
    ids = torch.randint(0, 256, (2, 12))
    out = model(ids, targets=ids)
    q, k, scale = seen[0]
    g = attn.qk_scale.detach()
    torch.testing.assert_close((q / g).norm(dim=-1), torch.ones(q.shape[:-1]))
    torch.testing.assert_close(k.norm(dim=-1), torch.ones(k.shape[:-1]))
    assert scale == 1.0
    out.loss.backward()
    assert attn.qk_scale.grad is not None and attn.qk_scale.grad.abs().item() > 0
    assert memlm.build("seed-tiny", **tiny_overrides(**{"attention.qk_norm_scale": 7.5})) \
        .blocks[1].attention.qk_scale.item() == 7.5


@pytest.mark.parametrize("preset", ["seed-tiny", "vanilla-tiny"])
@pytest.mark.parametrize("kind", ["learned", "tupe", "t5", "rope"])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm", "scalenorm"])
def test_bias_free_switch_leaves_no_bias(preset, kind, norm):
    model = memlm.build(preset, **tiny_overrides(**{"bias": False, "position.kind": kind, "norm.kind": norm}))
    assert [n for n, _ in model.named_parameters() if "bias" in n.split(".")[-1]] == []
    with_bias = memlm.build(preset, **tiny_overrides(**{"bias": True, "norm.kind": "layernorm"}))
    assert any(n.endswith(".bias") for n, _ in with_bias.named_parameters())


@pytest.mark.parametrize("preset", [name for name in memlm.presets() if name.endswith("-tiny")])
def test_bias_free_holds_for_every_module_of_every_preset(preset):
    """Every preset with bias=False, plus the mechanisms no preset combines (memory tokens, conv
    compression, kNN, persistent vectors), builds no bias parameter or buffer anywhere."""
    extra = {"memory.tokens.count": 2, "memory.compressive.rate": 2, "memory.compressive.length": 4,
             "memory.compressive.fn": "conv", "memory.persistent.vectors": 2, "memory.knn.layers": [1],
             "position.kind": "rope"}
    config = memlm.build(preset).config
    if not any(config.memory_lengths()):
        extra["memory.xl.length"] = 8
    model = memlm.build(preset, **{"bias": False, **extra})
    assert [n for n, _ in model.named_parameters() if "bias" in n.split(".")[-1]] == []
    assert model.compressors is not None and model.memory_tokens is not None
    with_bias = memlm.build(preset, **{"bias": True, **extra})
    assert with_bias.compressors[0].conv.bias is not None


def test_forgetful_masking_statistics_and_eval():
    eta = 0.3
    model = memlm.build("seed-tiny", **tiny_overrides(**{"attention.forgetful": eta})).train()
    keep = torch.stack([model.forgetful_keep(64, 128, torch.device("cpu")) for _ in range(20)])
    masked_fraction = (~keep).float().mean().item()
    assert masked_fraction == pytest.approx(eta / 2, abs=0.01)
    per_row = (~keep).float().mean(-1).flatten()  # ratios ~ U[0, eta]
    assert per_row.max().item() < eta + 0.1 and per_row.min().item() < 0.05
    model.eval()
    assert model.forgetful_keep(4, 16, torch.device("cpu")) is None
    assert memlm.build("seed-tiny", **tiny_overrides()).train().forgetful_keep(4, 16, torch.device("cpu")) is None


def test_forgetful_masking_hides_keys_but_never_the_diagonal(monkeypatch):
    model = memlm.build("seed-tiny", **tiny_overrides(**{"attention.forgetful": 0.9,
                                                          "attention.backend": "eager"})).train()
    masks = []
    original = attention_module.attend

    def spy(q, k, v, **kwargs):
        masks.append(kwargs["key_mask"])
        return original(q, k, v, **kwargs)

    monkeypatch.setattr(attention_module, "attend", spy)
    ids = torch.randint(0, 256, (8, 32))
    model(ids)
    key_mask = masks[0]
    assert key_mask.shape == (8, 32) and (~key_mask).any()
    assert all(m is key_mask or torch.equal(m, key_mask) for m in masks)  # one draw per forward
    from memlm.nn.kernels import visibility
    allowed = visibility(32, 32, 0, key_mask, ids.device)
    assert allowed.diagonal(dim1=-2, dim2=-1).all()
    model.eval()
    masks.clear()
    model(ids)
    assert masks[0] is None


def test_flops_per_token_formula():
    model = memlm.build("seed-tiny", **tiny_overrides())
    c = model.config
    block_matmul = sum(m.weight.numel() for m in model.blocks.modules() if isinstance(m, torch.nn.Linear))
    expected = 6 * (block_matmul + c.vocab_size * c.width) + 12 * c.layers * 4 * 8 * c.seq_len
    assert model.flops_per_token() == expected
    assert model.estimate_mfu(1000.0, expected * 1000.0) == pytest.approx(1.0)


def test_weight_tying_and_init():
    model = memlm.build("vanilla-tiny", **tiny_overrides(layers=8))
    assert model.head.weight is model.embed.weight
    assert model.num_parameters() == sum(p.numel() for p in set(model.parameters()))
    std_out = model.blocks[0].attention.out.weight.std().item()
    assert std_out == pytest.approx(0.02 / 4, rel=0.15)  # 0.02 / sqrt(2 * 8)
    untied = memlm.build("vanilla-tiny", **tiny_overrides(tie_embeddings=False))
    assert untied.num_parameters() == model.num_parameters() - sum(
        p.numel() for b in model.blocks[2:] for p in b.parameters()) + 257 * 32


def test_post_norm_and_ffn_none_blocks():
    model = memlm.build("vanilla-tiny", **tiny_overrides(**{"norm.placement": "post", "feedforward.kind": "none"}))
    block = model.blocks[0]
    assert block.feedforward is None and isinstance(model.final_norm, torch.nn.Identity)
    assert sum(p.numel() for p in block.parameters()) == \
        sum(p.numel() for p in block.attention.parameters()) + 2 * 32  # one LayerNorm
    x = torch.randn(2, 6, 32)
    h, _ = block.attention(x, model_context(model, 6), None)
    torch.testing.assert_close(block(x, model_context(model, 6), None)[0], block.attn_norm(x + h))


def model_context(model, length):
    return attention_module.SegmentContext(q_start=0, row_start=None, keep=None,
                                           bias=model.position_bias(0, length, torch.device("cpu")))
