"""Every memory mechanism in one model: xPos, Transformer-XL memory with per-layer lengths,
layerwise feedback, compressive memory, kNN memory, persistent vectors and adaptive span, without
memory tokens and with plain or recurrent ones."""

import pytest
import torch

import memlm
from tests.conftest import by_segments

L = 8
WIDEST = {"layers": 3, "width": 32, "seq_len": L, "attention.heads": 4, "position.kind": "xpos",
          "memory.xl.lengths": [4, 8, 12], "memory.feedback.mode": "memory",
          "memory.compressive.rate": 2, "memory.compressive.length": 4, "memory.compressive.fn": "conv",
          "memory.knn.layers": [1], "memory.knn.k": 4, "memory.knn.capacity": 64, "memory.knn.dtype": "float32",
          "memory.persistent.vectors": 2, "memory.adaptive_span.enabled": True, "memory.adaptive_span.init": 0.5, "memory.adaptive_span.ramp": 4}
TOKENS = {"none": {}, "plain": {"memory.tokens.count": 2}, "recurrent": {"memory.tokens.count": 2, "memory.tokens.recurrent": True}}


def build(tokens):
    model = memlm.build("seed-tiny", **WIDEST, **TOKENS[tokens])
    with torch.no_grad():  # open the kNN gate and give the heads spans of different lengths
        model.blocks[1].attention.knn.gate.fill_(1.0)
        for block in model.blocks:
            block.attention.span.span.copy_(torch.tensor([3.0, 7.0, 12.0, 25.0]))
    model.after_optimizer_step()
    return model


@pytest.mark.parametrize("tokens", list(TOKENS))
def test_token_by_token_equals_segment_by_segment_with_every_mechanism(tokens):
    model = build(tokens).eval()
    ids = torch.randint(0, 256, (2, 5 * L + 3))  # the memories roll, compress and fill the kNN store
    segments, seg_state = by_segments(model, ids, L)
    token_by_token, tok_state = by_segments(model, ids, 1)
    torch.testing.assert_close(token_by_token, segments, atol=1e-5, rtol=0)
    assert [layer.mem.shape[1] for layer in seg_state.layers] == [4, 8, 12]
    assert all(layer.cmem.shape[1] == 4 for layer in seg_state.layers)  # compression happened
    for a, b in zip(seg_state.layers, tok_state.layers):
        assert a.tensors().keys() == b.tensors().keys()
        for name, t in a.tensors().items():
            torch.testing.assert_close(t, getattr(b, name), atol=1e-5, rtol=0)
    keys, _, _ = seg_state.stores[1].entries(0)
    assert keys.shape[1] == 5 * L  # five completed segments written
    # a row reset at a segment boundary behaves like a fresh stream for that row
    reset = by_segments(model, ids[:, :5 * L], L)[1].reset(torch.tensor([True, False]))
    follow = ids[:, :L]
    fresh = memlm.build("seed-tiny", **WIDEST, **TOKENS[tokens]).eval()
    fresh.load_state_dict(model.state_dict())
    fresh_state = fresh.init_state(1)
    fresh_state.position = reset.position  # the same stream position, nothing remembered
    expected = fresh(follow[:1], state=fresh_state).logits
    torch.testing.assert_close(model(follow, state=reset).logits[:1], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tokens", list(TOKENS))
def test_every_mechanism_learns_and_the_compressor_only_from_its_own_loss(tokens):
    model = build(tokens).train()
    state = model.init_state(2)
    for _ in range(3):  # fill memories, compressed memories and the kNN store
        ids = torch.randint(0, 256, (2, L))
        state = model(ids, targets=ids, state=state).state.detach()
    ids = torch.randint(0, 256, (2, 2 * L))
    out = model(ids, targets=ids, state=state)
    assert out.aux_loss.item() > 0
    out.loss.backward(retain_graph=True)
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert grads["blocks.1.attention.knn.gate"].abs().sum() > 0  # retrieval is used
    assert grads["blocks.0.attention.persistent.k"].abs().sum() > 0
    assert grads["blocks.0.attention.span.span"].abs().sum() > 0
    for name, grad in grads.items():
        if name.startswith("compressors."):
            assert grad is None or not grad.any(), name
    model.zero_grad()
    out.aux_loss.backward()
    for name, p in model.named_parameters():
        trained = p.grad is not None and p.grad.abs().sum() > 0
        if name.startswith("compressors."):
            assert trained, name
        elif name.endswith("span.span"):
            assert trained, name  # the span penalty
        else:
            assert not trained, name
