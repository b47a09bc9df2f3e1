"""Transformer-XL recurrence, per-layer lengths, layerwise feedback and persistent memory."""

import pytest
import torch

import memlm
from memlm.config import ConfigError
from memlm.model.attention import SegmentContext
from tests.conftest import by_segments, tiny_overrides

KINDS = ["none", "sinusoidal", "rope", "xpos", "t5", "tupe"]


def build(**extra):
    base = tiny_overrides(layers=3, seq_len=8, max_positions=256)
    base.update(extra)
    return memlm.build("seed-tiny", **base).eval()


@pytest.mark.parametrize("kind", KINDS)
def test_segments_with_long_memory_equal_one_pass(kind):
    model = build(**{"position.kind": kind, "memory.lengths": [40, 48, 64]})
    ids = torch.randint(0, 256, (2, 40))
    logits, state = by_segments(model, ids, 8)
    torch.testing.assert_close(logits, model(ids).logits, atol=1e-5, rtol=0)
    assert [layer["mem"].shape[1] for layer in state.layers] == [40, 40, 40]


@pytest.mark.parametrize("kind", ["rope", "t5"])
def test_token_by_token_equals_segment_by_segment_with_short_memory(kind):
    """Generation rolls the pending segment into memory exactly as training segments do."""
    model = build(**{"position.kind": kind, "memory.lengths": [4, 8, 12]})
    ids = torch.randint(0, 256, (2, 40))
    segments, seg_state = by_segments(model, ids, 8)
    tokens, tok_state = by_segments(model, ids, 1)
    torch.testing.assert_close(tokens, segments, atol=1e-5, rtol=0)
    assert [layer["mem"].shape[1] for layer in tok_state.layers] == [4, 8, 12]
    # and a short memory really forgets: the logits differ from one pass over everything
    assert not torch.allclose(segments[:, 16:], model(ids).logits[:, 16:], atol=1e-3)


def test_per_layer_lengths_and_schedules():
    model = build(**{"memory.length": 12, "memory.schedule": "linear", "memory.min_length": 4,
                     "memory.eval_multiplier": 2.0})
    assert model.config.memory_lengths(training=True) == [4, 8, 12]
    assert model.config.memory_lengths(training=False) == [8, 16, 24]
    _, state = by_segments(model, torch.randint(0, 256, (1, 48)), 8)  # eval mode
    assert [layer["mem"].shape[1] for layer in state.layers] == [8, 16, 24]
    model.train()
    _, state = by_segments(model, torch.randint(0, 256, (1, 48)), 8)
    assert [layer["mem"].shape[1] for layer in state.layers] == [4, 8, 12]
    with pytest.raises(ConfigError, match="memory.lengths"):
        build(**{"memory.lengths": [1, 2]})
    with pytest.raises(ConfigError, match="position.kind"):
        build(**{"memory.length": 4, "position.kind": "learned"})


def reference_segment(model, ids, memories, q_start):
    """Run the blocks by hand with explicit memories; return logits, block inputs and outputs."""
    x = model.embed(ids)
    ctx = SegmentContext(q_start=q_start, row_start=None, keep=None,
                         bias=model._bias_provider(q_start, ids.shape[1], ids.device))
    inputs, outputs = [], []
    for block, memory in zip(model.blocks, memories):
        inputs.append(x)
        x, _ = block(x, ctx, None, memory)
        outputs.append(x)
    return model.head(model.final_norm(x)), inputs, outputs


@pytest.mark.parametrize("kind", ["rope", "t5"])
def test_xl_memory_matches_its_definition(kind):
    model = build(**{"position.kind": kind, "memory.lengths": [3, 5, 8]})
    ids = torch.randint(0, 256, (2, 16))
    logits, _ = by_segments(model, ids, 8)
    _, inputs, _ = reference_segment(model, ids[:, :8], [None] * 3, 0)
    memories = [inputs[i][:, 8 - n:] for i, n in enumerate([3, 5, 8])]
    expected, _, _ = reference_segment(model, ids[:, 8:], memories, 8)
    torch.testing.assert_close(logits[:, 8:], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["rope", "xpos", "t5"])
def test_layerwise_feedback_matches_its_definition(kind):
    """Layer i's memory is the previous segment's output of layer i+1; the top layer its own."""
    model = build(**{"position.kind": kind, "memory.length": 8, "memory.feedback": "memory"})
    ids = torch.randint(0, 256, (2, 24))
    logits, state = by_segments(model, ids, 8)
    memories = [None] * 3
    expected = []
    for seg in range(3):
        seg_logits, _, outputs = reference_segment(model, ids[:, 8 * seg:8 * seg + 8], memories, 8 * seg)
        expected.append(seg_logits)
        memories = [outputs[1], outputs[2], outputs[2]]  # memory length 8 = one segment
    torch.testing.assert_close(logits, torch.cat(expected, dim=1), atol=1e-5, rtol=0)
    # token-by-token decoding follows the same definition
    tokens, _ = by_segments(model, ids, 1)
    torch.testing.assert_close(tokens, logits, atol=1e-5, rtol=0)


def test_feedback_top_layer_reads_an_external_tensor():
    model = build(**{"memory.length": 8, "memory.feedback": "memory"})
    ids = torch.randint(0, 256, (1, 16))
    external = torch.randn(1, 8, 32)
    state = model(ids[:, :8], state=model.init_state(1)).state
    state.layers[-1]["external"] = external
    state = model(ids[:, 8:], state=state).state  # rolls: top memory <- external
    torch.testing.assert_close(state.layers[-1]["mem"], torch.cat([external, external], dim=1)[:, -8:])


def test_additive_feedback_matches_its_definition():
    model = build(**{"memory.feedback": "add"})
    ids = torch.randint(0, 256, (2, 16))
    logits, _ = by_segments(model, ids, 8)
    _, _, outputs = reference_segment(model, ids[:, :8], [None] * 3, 0)
    x = model.embed(ids[:, 8:])
    ctx = SegmentContext(q_start=8, row_start=None, keep=None, bias=model._bias_provider(8, 8, ids.device))
    feedback = [outputs[1], outputs[2], outputs[2]]
    for block, fb in zip(model.blocks, feedback):
        x, _ = block(x + fb, ctx, None, None)
    torch.testing.assert_close(logits[:, 8:], model.head(model.final_norm(x)), atol=1e-5, rtol=0)
    tokens, _ = by_segments(model, ids, 1)
    torch.testing.assert_close(tokens, logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("extra", [{"memory.length": 16}, {"memory.feedback": "add"},
                                   {"memory.length": 16, "memory.feedback": "memory"}])
def test_reset_rows_behave_like_a_fresh_state(extra):
    model = build(**extra)
    ids = torch.randint(0, 256, (2, 24))
    _, state = by_segments(model, ids[:, :16], 8)
    state = state.reset(torch.tensor([True, False]))
    logits = model(ids[:, 16:], state=state).logits
    fresh = model(ids[:1, 16:], state=model.init_state(1)).logits
    torch.testing.assert_close(logits[:1], fresh, atol=1e-5, rtol=0)
    kept, _ = by_segments(model, ids[1:], 8)
    torch.testing.assert_close(logits[1:], kept[:, 16:], atol=1e-5, rtol=0)


def test_detach_cuts_gradients_between_segments():
    model = build(**{"memory.length": 16}).train()
    ids = torch.randint(0, 256, (2, 16))
    state = model(ids[:, :8], state=model.init_state(2)).state
    assert state.layers[1]["mem"].grad_fn is not None
    detached = state.detach()
    assert all(t.grad_fn is None and not t.requires_grad for layer in detached.layers for t in layer.values())
    # the loss of segment 2 after detach has the same gradient as with a constant memory
    out = model(ids[:, 8:], targets=ids[:, 8:], state=detached)
    grads = torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)
    constant = memlm.State(8, detached.row_start, [{k: v.clone() for k, v in l.items()} for l in detached.layers])
    again = torch.autograd.grad(model(ids[:, 8:], targets=ids[:, 8:], state=constant).loss,
                                list(model.parameters()), allow_unused=True)
    for a, b in zip(grads, again):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


def test_persistent_memory_parameters_and_cached_decoding():
    plain = build(**{"position.kind": "rope", "attention.kv_heads": 2})
    model = build(**{"position.kind": "rope", "attention.kv_heads": 2, "memory.persistent": 5,
                     "feedforward.kind": "none"})
    ff = sum(p.numel() for b in plain.blocks for p in b.feedforward.parameters()) + \
        sum(p.numel() for b in plain.blocks for p in b.ff_norm.parameters())
    assert model.num_parameters() == plain.num_parameters() - ff + 3 * 2 * (2 * 5 * 8)
    ids = torch.randint(0, 256, (2, 12))
    full = model(ids).logits
    tokens, _ = by_segments(model, ids, 1)
    torch.testing.assert_close(tokens, full, atol=1e-5, rtol=0)
    # persistent vectors are seen: zeroing their values changes the output
    with torch.no_grad():
        for block in model.blocks:
            block.attention.persistent_v.zero_()
    assert not torch.allclose(model(ids).logits, full, atol=1e-4)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@torch.no_grad()
def test_memory_and_persistent_backends_agree_with_eager(backend):
    extra = {"position.kind": "t5", "memory.length": 8, "memory.persistent": 3}
    torch.manual_seed(4)
    ref = build(**extra, **{"attention.backend": "eager"})
    torch.manual_seed(4)
    fast = build(**extra, **{"attention.backend": backend})
    ids = torch.randint(0, 256, (2, 24))
    torch.testing.assert_close(by_segments(fast, ids, 8)[0], by_segments(ref, ids, 8)[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("preset", ["seed-mem-tiny", "seed-xl-tiny"])
def test_memory_presets_decode_token_by_token_like_segments(preset):
    """Every mechanism combined: generation rolls, compresses and trims exactly as training does."""
    model = memlm.build(preset, layers=2, width=32, seq_len=8, **{"attention.heads": 4, "memory.length": 8},
                        **({"memory.compress_length": 2} if preset == "seed-mem-tiny" else {})).eval()
    if model.config.memory.adaptive_span:
        with torch.no_grad():
            for block in model.blocks:
                block.attention.span.span.uniform_(0, 12)
        model.after_optimizer_step()
    ids = torch.randint(0, 256, (2, 48))
    segments, seg_state = by_segments(model, ids, 8)
    tokens, tok_state = by_segments(model, ids, 1)
    torch.testing.assert_close(tokens, segments, atol=1e-5, rtol=0)
    if preset == "seed-mem-tiny":
        assert seg_state.layers[0]["cmem"].shape[1] == 2
