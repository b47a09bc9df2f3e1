"""The backbone identity: segment by segment with a state == one pass over the whole."""

import pytest
import torch

import memlm
from tests.conftest import POSITION_KINDS, tiny_overrides

KINDS = POSITION_KINDS + ["tupe+t5"]


def build(kind, **extra):
    overrides = tiny_overrides(**extra)
    if kind == "tupe+t5":
        overrides.update({"position.kind": "tupe", "position.tupe_t5": True})
    else:
        overrides["position.kind"] = kind
    return memlm.build("seed-tiny", **overrides).eval()


@pytest.mark.parametrize("kind", KINDS)
def test_incremental_decoding_equals_full_forward(kind):
    model = build(kind)
    ids = torch.randint(0, 256, (2, 24))
    full = model(ids).logits
    state = model.init_state(2)
    out = model(ids[:, :5], state=state)
    steps = [out.logits]
    state = out.state
    for t in range(5, 24):
        out = model(ids[:, t:t + 1], state=state)
        steps.append(out.logits)
        state = out.state
    assert state.position == 24
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_uneven_segments_equal_one_pass(kind, backend):
    model = build(kind, **{"attention.backend": backend, "attention.kv_heads": 2, "norm.kind": "rmsnorm"})
    ids = torch.randint(0, 256, (3, 30))
    full = model(ids).logits
    state, pieces = model.init_state(3), []
    for start, stop in [(0, 7), (7, 8), (8, 19), (19, 30)]:
        out = model(ids[:, start:stop], state=state)
        pieces.append(out.logits)
        state = out.state
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-4, rtol=0)


def test_no_state_in_means_no_state_out_and_cache_shapes():
    model = build("rope", **{"attention.kv_heads": 1})
    ids = torch.randint(0, 256, (2, 6))
    assert model(ids).state is None
    state = model(ids, state=model.init_state(2)).state
    assert state.layers[0].k.shape == (2, 1, 6, 8)  # (B, Hkv, T, D)


@pytest.mark.parametrize("kind", ["rope", "xpos", "t5", "none"])
def test_reset_row_forgets_its_past(kind):
    """A reset row continues exactly like a fresh stream (relative positions only see distances)."""
    model = build(kind)
    past = torch.randint(0, 256, (2, 10))
    segment = torch.randint(0, 256, (2, 6))
    state = model(past, state=model.init_state(2)).state
    state = state.reset(torch.tensor([True, False]))
    logits = model(segment, state=state).logits
    fresh = model(segment[:1], state=model.init_state(1)).logits
    kept = model(torch.cat([past, segment], dim=1)[1:]).logits[:, 10:]
    torch.testing.assert_close(logits[:1], fresh, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits[1:], kept, atol=1e-4, rtol=0)


def test_state_detach_and_round_trip():
    model = build("rope")
    model.train()
    state = model(torch.randint(0, 256, (2, 5)), state=model.init_state(2)).state
    assert state.layers[0].k.requires_grad
    detached = state.detach()
    assert not detached.layers[0].k.requires_grad and detached.position == 5
    restored = memlm.State.from_state_dict(detached.state_dict())
    assert restored.position == 5 and restored.masked == detached.masked
    torch.testing.assert_close(restored.layers[1].v, detached.layers[1].v)


def test_learned_positions_beyond_the_table_fail_clearly():
    model = build("learned", max_positions=8)
    state = model(torch.randint(0, 256, (1, 8)), state=model.init_state(1)).state
    with pytest.raises(ValueError, match="max_positions"):
        model(torch.randint(0, 256, (1, 1)), state=state)


def test_state_batch_mismatch_is_an_error():
    model = build("rope")
    with pytest.raises(ValueError, match="rows"):
        model(torch.randint(0, 256, (2, 4)), state=model.init_state(3))
