"""Slot memory with erase/add writes (memlm.memory.ntm): reads and writes against the NTM formulas
computed by hand, the stream identities, resets, learning across segments and checkpoints."""

import math

import pytest
import torch
import torch.nn.functional as F

import memlm
from memlm.config import ConfigError
from tests.conftest import by_segments

L, W, N = 8, 32, 4
SHAPE = {"layers": 2, "width": W, "seq_len": L, "attention.heads": 2, "memory.ntm.layers": [1],
         "memory.ntm.slots": N}
VARIANTS = {"ntm": {}, "ntm+xl": {"memory.xl.length": L},
            "ntm+tokens": {"memory.tokens.count": 2, "memory.tokens.recurrent": True},
            "ntm+xl+knn": {"memory.xl.length": L, "memory.knn.layers": [0], "memory.knn.k": 4,
                           "memory.knn.capacity": 64, "memory.knn.dtype": "float32"}}


def build(variant="ntm", **extra):
    torch.manual_seed(0)
    return memlm.build("seed-tiny", **SHAPE, **VARIANTS[variant], **extra).eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_token_by_token_equals_segment_by_segment(variant):
    model = build(variant)
    ids = torch.randint(0, 256, (2, 4 * L + 3))
    segments, seg_state = by_segments(model, ids, L)
    tokens, tok_state = by_segments(model, ids, 1)
    torch.testing.assert_close(tokens, segments, atol=1e-5, rtol=0)
    a, b = seg_state.layers[1].extensions["ntm"], tok_state.layers[1].extensions["ntm"]
    for name in ("slots", "segment", "keep", "written"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=0)
    assert "ntm" not in seg_state.layers[0].extensions  # only the chosen layers carry slots


def test_the_memory_is_read_once_written_and_not_before():
    model = build()
    ids = torch.randint(0, 256, (2, 2 * L))
    with_state, _ = by_segments(model, ids, L)
    torch.testing.assert_close(with_state[:, :L], model(ids[:, :L]).logits, atol=1e-6, rtol=0)  # nothing to read
    assert (with_state[:, L:] - model(ids[:, L:]).logits).abs().max() > 1e-3  # the second segment reads it


def manual_write(mechanism, block, slots, segment, keep):
    """The NTM write computed slot by slot and position by position from the controller's weights."""
    head = mechanism.controller["1"]
    h = block.attn_norm(segment) if block.pre_norm else segment
    out = h @ head.weight.T + (head.bias if head.bias is not None else 0)
    new = slots.clone()
    for b in range(slots.shape[0]):
        erase_total = torch.zeros(N, W)
        add_total = torch.zeros(N, W)
        for t in range(segment.shape[1]):
            key, erase = out[b, t, :W], torch.sigmoid(out[b, t, W:2 * W])
            add, beta = torch.tanh(out[b, t, 2 * W:3 * W]), math.log1p(math.exp(out[b, t, 3 * W].item()))
            cos = torch.stack([torch.dot(key, slots[b, i]) / (key.norm() * slots[b, i].norm()) for i in range(N)])
            w = torch.softmax(beta * cos, dim=0) * float(keep[b, t])
            for i in range(N):
                erase_total[i] += w[i] * erase
                add_total[i] += w[i] * add
        new[b] = slots[b] * (1 - erase_total.clamp(max=1.0)) + add_total
    return new


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_the_write_erases_then_adds_by_content_weights(placement):
    model = build(**{"norm.placement": placement})
    mechanism, block = model.mechanisms["ntm"], model.blocks[1]
    with torch.no_grad():
        mechanism.controller["1"].weight.normal_(0, 0.3)  # weights that make the terms visible
    slots, segment = torch.randn(2, N, W), torch.randn(2, L, W)
    keep = torch.ones(2, L, dtype=torch.bool)
    keep[1, :3] = False  # row 1 forgot its first three positions
    got = mechanism.apply_write(1, block, slots, segment, keep)
    torch.testing.assert_close(got, manual_write(mechanism, block, slots, segment, keep), atol=1e-5, rtol=1e-5)
    assert (got - slots).abs().max() > 1e-2


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_the_read_is_a_softmax_over_slots_by_cosine_times_the_key_strength(placement):
    model = build(**{"norm.placement": placement})
    mechanism, block = model.mechanisms["ntm"], model.blocks[1]
    with torch.no_grad():
        mechanism.log_strength["1"].copy_(torch.tensor([0.5, 2.0]))
    ids = torch.randint(0, 256, (2, 2 * L))
    state = by_segments(model, ids[:, :L], L)[1]
    ext = state.layers[1].extensions["ntm"]
    ext.written = torch.tensor([True, False])  # row 1 has nothing to read
    q = torch.randn(2, 2, 3, W // 2)
    out, lse = mechanism.reader(1, block, ext)(q, 0.0)
    memory = mechanism.memory(1, block, ext, 2)
    D, Hd = W // 2, 2
    wk = block.attention.qkv.weight[Hd * D:Hd * D + D]  # the single key/value head's key rows (seed: multi-query)
    wv = block.attention.qkv.weight[Hd * D + D:]
    normed = block.attn_norm(memory) if placement == "pre" else memory
    keys, values = normed @ wk.T, normed @ wv.T  # (B, N, D)
    for h in range(2):
        beta = math.exp([0.5, 2.0][h])
        for t in range(3):
            cos = F.cosine_similarity(q[0, h, t][None], keys[0], dim=-1)  # (N,)
            torch.testing.assert_close(lse[0, h, t], torch.logsumexp(beta * cos, 0), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out[0, h, t], torch.softmax(beta * cos, 0) @ values[0], atol=1e-5, rtol=1e-5)
    assert torch.isinf(lse[1]).all() and not out[1].any()


def test_a_row_reset_at_a_segment_boundary_continues_like_a_fresh_stream():
    model = build("ntm+xl")
    ids = torch.randint(0, 256, (2, 4 * L))
    state = by_segments(model, ids[:, :2 * L], L)[1].reset(torch.tensor([True, False]))
    assert not state.layers[1].extensions["ntm"].written[0] and state.layers[1].extensions["ntm"].written[1]
    after, _ = by_segments(model, ids[:, 2 * L:], L, state)
    fresh_state = model.init_state(1)
    fresh_state.position = 2 * L
    fresh, _ = by_segments(model, ids[:1, 2 * L:], L, fresh_state)
    torch.testing.assert_close(after[:1], fresh, atol=1e-5, rtol=0)


def test_a_row_reset_inside_a_segment_writes_only_its_new_document():
    model = build()
    ids = torch.randint(0, 256, (2, 2 * L))
    state = by_segments(model, ids[:, :L + 3], L)[1].reset(torch.tensor([False, True]))
    state = by_segments(model, ids[:, L + 3:2 * L], L, state)[1]
    ext = state.layers[1].extensions["ntm"]
    assert ext.keep.tolist() == [[True] * L, [False] * 3 + [True] * (L - 3)]
    assert ext.written.tolist() == [True, True]


def test_the_write_heads_learn_from_the_next_segment_with_the_state_detached():
    model = build().train()
    ids = torch.randint(0, 256, (2, 2 * L))
    first = model(ids[:, :L], targets=ids[:, :L], state=model.init_state(2))
    names = ["mechanisms.ntm.controller.1.weight", "mechanisms.ntm.initial.1", "mechanisms.ntm.log_strength.1"]
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(first.loss, [params[n] for n in names], allow_unused=True)
    assert all(g is None or not g.any() for g in grads)  # the first segment reads nothing
    second = model(ids[:, L:], targets=ids[:, L:], state=first.state.detach())
    grads = torch.autograd.grad(second.loss, [params[n] for n in names])
    assert all(g.abs().sum() > 0 for g in grads), names


def test_an_ntm_state_survives_a_checkpoint_exactly():
    model = build("ntm+xl")
    ids = torch.randint(0, 256, (2, 3 * L))
    state = by_segments(model, ids[:, :L + 2], L)[1]
    data = state.state_dict()
    assert {"layers.1.ntm.slots", "layers.1.ntm.segment", "layers.1.ntm.written"} <= set(data["tensors"])
    restored = model.load_state(data)
    torch.testing.assert_close(model(ids[:, L + 2:], state=restored).logits,
                               model(ids[:, L + 2:], state=state).logits, atol=0, rtol=0)


def test_bad_ntm_layers_name_the_field():
    with pytest.raises(ConfigError, match="memory.ntm.layers"):
        memlm.build("seed-tiny", **{"memory.ntm.layers": [7]})
    with pytest.raises(ConfigError, match="memory.ntm.slots"):
        memlm.build("seed-tiny", **{"memory.ntm.layers": [1], "memory.ntm.slots": 0})


def test_each_write_starts_from_the_memory_the_last_one_left():
    """Memory after segments S1..S3 = write(write(write(initial, S1), S2), S3), computed step by step."""
    model = build()
    mechanism, block = model.mechanisms["ntm"], model.blocks[1]
    with torch.no_grad():
        mechanism.controller["1"].weight.normal_(0, 0.3)
    ids = torch.randint(0, 256, (2, 4 * L))
    state, states = model.init_state(2), []
    for s in range(4):
        state = model(ids[:, s * L:(s + 1) * L], state=state).state
        states.append(state.layers[1].extensions["ntm"])
    assert states[0].from_initial.all() and not states[1].from_initial.any()
    keep = torch.ones(2, L, dtype=torch.bool)
    memory = mechanism.initial["1"].expand(2, -1, -1)
    for s in range(3):
        memory = manual_write(mechanism, block, memory, states[s].segment, keep)
        torch.testing.assert_close(mechanism.memory(1, block, states[s], 2), memory, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(states[3].slots, mechanism.memory(1, block, states[2], 2), atol=1e-6, rtol=0)


def test_the_read_applies_dropout_to_the_slot_weights():
    model = build()
    mechanism, block = model.mechanisms["ntm"], model.blocks[1]
    ext = by_segments(model, torch.randint(0, 256, (2, L)), L)[1].layers[1].extensions["ntm"]
    read = mechanism.reader(1, block, ext)
    q = torch.randn(2, 2, 3, W // 2)
    memory = block.attn_norm(mechanism.memory(1, block, ext, 2))
    D = W // 2
    keys = memory @ block.attention.qkv.weight[2 * D:3 * D].T  # (B, N, D): the one key/value head
    values = memory @ block.attention.qkv.weight[3 * D:].T
    scores = F.normalize(q, dim=-1) @ F.normalize(keys, dim=-1)[:, None].transpose(-1, -2) * 10.0  # (B, H, T, N)
    torch.manual_seed(5)
    got, _ = read(q, 0.3)
    torch.manual_seed(5)
    want = F.dropout(scores.softmax(dim=-1), 0.3) @ values[:, None]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, read(q, 0.0)[0])


def test_bias_and_init_follow_the_model():
    biased = build(bias=True)
    head = biased.mechanisms["ntm"].controller["1"]
    assert head.bias is not None and not head.bias.any()
    assert build().mechanisms["ntm"].controller["1"].bias is None  # seed is bias-free
    torch.manual_seed(0)
    wide = memlm.build("seed-tiny", **{**SHAPE, "width": 256, "memory.ntm.slots": 64})
    mechanism, std = wide.mechanisms["ntm"], wide.config.init_std
    weight, initial = mechanism.controller["1"].weight, mechanism.initial["1"]
    assert abs(weight.mean().item()) < 0.1 * std and abs(weight.std().item() / std - 1) < 0.05
    assert abs(initial.std().item() / std - 1) < 0.05
    torch.testing.assert_close(mechanism.log_strength["1"].exp(), torch.full((2,), 10.0))


def test_the_read_runs_in_bfloat16():
    model = build()
    mechanism, block = model.mechanisms["ntm"], model.blocks[1]
    state = by_segments(model, torch.randint(0, 256, (2, L)), L)[1]
    read = mechanism.reader(1, block, state.layers[1].extensions["ntm"])
    q = torch.randn(2, 2, 3, W // 2)
    out, _ = read(q, 0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = mechanism.reader(1, block.to(torch.bfloat16), state.layers[1].extensions["ntm"])(
            q.to(torch.bfloat16), 0.0)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), out, atol=5e-2, rtol=5e-2)
