"""Memory tokens (arXiv 2006.11527) and their recurrent mode (after arXiv 2207.06881)."""

import copy

import pytest
import torch

import memlm
from memlm.config import ConfigError
from memlm.memory.tokens import MemoryTokenContext
from memlm.state import LayerState
from memlm.nn.attention import SegmentContext
from tests.conftest import by_segments

M, W, L = 3, 32, 8
KINDS = ["rope", "t5", "xpos", "none", "learned", "sinusoidal"]
RELATIVE = ["rope", "t5", "xpos", "none"]


def build(recurrent=False, tokens=M, **extra):
    overrides = {"layers": 2, "width": W, "seq_len": L, "max_positions": 64, "attention.heads": 4,
                 "memory.tokens.count": tokens, "memory.tokens.recurrent": recurrent}
    overrides.update(extra)
    return memlm.build("seed-tiny", **overrides).eval()


@pytest.mark.parametrize("recurrent", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_token_by_token_equals_segment_by_segment(kind, recurrent):
    model = build(recurrent, **{"position.kind": kind})
    ids = torch.randint(0, 256, (2, 3 * L + 4))  # three segments and a part
    segments, seg_state = by_segments(model, ids, L)
    tokens, tok_state = by_segments(model, ids, 1)
    uneven, _ = by_segments(model, ids, 5)  # pieces that straddle segment boundaries
    assert segments.shape == (2, 3 * L + 4, 257)
    torch.testing.assert_close(tokens, segments, atol=1e-5, rtol=0)
    torch.testing.assert_close(uneven, segments, atol=1e-5, rtol=0)
    # the state holds the current segment's cache only: M read tokens + 4 tokens
    assert tok_state.layers[1].k.shape[2] == seg_state.layers[1].k.shape[2] == M + 4
    if recurrent:
        assert seg_state.layers[0].memory_tokens.shape == (2, M, W)
        torch.testing.assert_close(tok_state.layers[0].memory_tokens, seg_state.layers[0].memory_tokens,
                                   atol=1e-5, rtol=0)
    else:
        assert seg_state.layers[0].memory_tokens is None
    # no state: one stream from an empty state (without recurrence: every seq_len piece on its own)
    out = model(ids)
    assert out.state is None
    torch.testing.assert_close(out.logits, segments, atol=1e-5, rtol=0)
    if not recurrent and kind in RELATIVE:  # ... which for relative positions is model(segment)
        alone = torch.cat([model(ids[:, s:s + L]).logits for s in range(0, ids.shape[1], L)], dim=1)
        torch.testing.assert_close(alone, segments, atol=1e-5, rtol=0)


def reference(model, ids, read, write, keep=None, start=0):
    """[read | ids | write] through the blocks as one plain causal sequence; ids sit at stream
    positions start.. (absolute positions embed them there, never the memory tokens); keep
    (B, M + T (+ M)): forgetful-masking flags of its keys."""
    x = model.embed(ids)
    if model.positions is not None:
        x = x + model.positions(start, ids.shape[1], ids.device)
    parts = [read, x] + ([model.memory_tokens.embedding.expand(ids.shape[0], -1, -1)] if write else [])
    x = torch.cat(parts, dim=1)
    ctx = SegmentContext(q_start=0, row_start=None, keep=keep,
                         bias=model.position_bias(0, x.shape[1], ids.device))
    for block in model.blocks:
        x, _ = block(x, ctx, None)
    T = ids.shape[1]
    return model.head(model.final_norm(x[:, M:M + T])), x[:, M + T:]


@pytest.mark.parametrize("kind", ["rope", "t5", "learned", "sinusoidal"])
def test_recurrent_memory_tokens_match_their_definition(kind):
    model = build(True, **{"position.kind": kind})
    ids = torch.randint(0, 256, (2, 3 * L))
    logits, state = by_segments(model, ids, L)
    read = model.memory_tokens.embedding.expand(2, -1, -1)
    expected = []
    for s in range(3):
        seg_logits, read = reference(model, ids[:, s * L:(s + 1) * L], read, write=True, start=s * L)
        expected.append(seg_logits)
    torch.testing.assert_close(logits, torch.cat(expected, dim=1), atol=1e-5, rtol=0)
    torch.testing.assert_close(state.layers[0].memory_tokens, read, atol=1e-5, rtol=0)
    assert state.layers[0].k is None  # a completed segment leaves no cache


@pytest.mark.parametrize("recurrent", [False, True])
def test_only_recurrent_mode_carries_information_across_segments(recurrent):
    model = build(recurrent)
    ids = torch.randint(0, 256, (2, 2 * L))
    other = ids.clone()
    other[:, :L] = torch.randint(0, 256, (2, L))
    a, _ = by_segments(model, ids, L)
    b, _ = by_segments(model, other, L)
    assert not torch.allclose(a[:, :L], b[:, :L], atol=1e-3)
    if recurrent:
        assert (a[:, L:] - b[:, L:]).abs().max() > 1e-3
    else:
        torch.testing.assert_close(a[:, L:], b[:, L:], atol=0, rtol=0)


@pytest.mark.parametrize("recurrent", [False, True])
def test_parameters_and_read_tokens_are_attended(recurrent):
    torch.manual_seed(1)
    plain = build(tokens=0)
    torch.manual_seed(1)
    model = build(recurrent)
    assert model.num_parameters() == plain.num_parameters() + M * W
    ids = torch.randint(0, 256, (2, 11))
    logits = model(ids).logits
    assert logits.shape == (2, 11, 257)
    assert not torch.allclose(logits, plain(ids).logits, atol=1e-4)  # same weights, memory seen
    with torch.no_grad():
        model.memory_tokens.embedding.zero_()
    assert (model(ids).logits - logits).abs().max() > 1e-4


@pytest.mark.parametrize("recurrent", [False, True])
@pytest.mark.parametrize("kind", ["rope", "t5"])
def test_reset_rows_behave_like_a_fresh_state(kind, recurrent):
    model = build(recurrent, **{"position.kind": kind})
    ids = torch.randint(0, 256, (2, 3 * L))
    kept, _ = by_segments(model, ids, L)
    _, state = by_segments(model, ids[:, :2 * L], L)
    state = state.reset(torch.tensor([True, False]))
    if recurrent:
        assert not state.layers[0].memory_written[0] and state.layers[0].memory_written[1]
    logits, _ = by_segments(model, ids[:, 2 * L:], 1, state)  # token by token, through the cache
    fresh = model(ids[:1, 2 * L:], state=model.init_state(1)).logits
    torch.testing.assert_close(logits[:1], fresh, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[1:], kept[1:, 2 * L:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("recurrent", [False, True])
def test_reset_inside_a_segment_forgets_the_row_past(recurrent):
    """Row 0 is reset at position L + 4: what follows must not depend on what came before."""
    model = build(recurrent)
    ids = torch.randint(0, 256, (2, 3 * L))
    other = ids.clone()
    other[0, :L + 4] = torch.randint(0, 256, (L + 4,))
    results = []
    for x in (ids, other):
        _, state = by_segments(model, x[:, :L + 4], 4)
        state = state.reset(torch.tensor([True, False]))
        results.append(by_segments(model, x[:, L + 4:], 2, state)[0])  # several calls after the reset
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(results[0][1], by_segments(model, ids, 4)[0][1, L + 4:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@torch.no_grad()
def test_backends_agree_with_eager(backend):
    extra = {"position.kind": "t5", "attention.kv_heads": 2}
    torch.manual_seed(3)
    ref = build(True, **extra, **{"attention.backend": "eager"})
    torch.manual_seed(3)
    fast = build(True, **extra, **{"attention.backend": backend})
    ids = torch.randint(0, 256, (2, 2 * L))
    outputs = []
    for model in (ref, fast):
        _, state = by_segments(model, ids, L)
        state = state.reset(torch.tensor([False, True]))
        outputs.append(by_segments(model, ids, 3, state)[0])
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-4, rtol=1e-4)


def test_generation_with_the_cache_equals_recomputation():
    model = build(True)
    prompt = torch.randint(0, 256, (2, 5))
    out = memlm.generate(model, prompt, max_new_tokens=2 * L, temperature=0)
    for t in range(5, out.shape[1]):  # greedy: each new token is the argmax of a fresh pass over the prefix
        logits, _ = by_segments(model, out[:, :t], L)
        assert torch.equal(out[:, t], logits[:, -1].argmax(-1))


def test_gradients_cross_segments_within_a_call_and_detach_cuts_them():
    model = build(True).train()
    ids = torch.randint(0, 256, (1, 2 * L))
    embedded = []
    handle = model.embed.register_forward_hook(lambda module, args, output: embedded.append(output) or output.retain_grad())
    out = model(ids, state=model.init_state(1))
    handle.remove()
    out.logits[:, L:].sum().backward()  # the second segment reaches the first through the memory tokens
    assert embedded[0].grad[:, :L].abs().sum() > 0
    assert out.state.layers[0].memory_tokens.grad_fn is not None
    detached = out.state.detach()
    assert all(t.grad_fn is None and not t.requires_grad for layer in detached.layers for t in layer.tensors().values())


def test_training_steps_lower_the_loss_in_recurrent_mode():
    model = build(True).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    initial = model.memory_tokens.embedding.detach().clone()
    ids = torch.randint(0, 256, (4, 3 * L + 1))
    losses = []
    for _ in range(8):
        state, total = model.init_state(4), 0.0
        for s in range(0, 3 * L, L):
            out = model(ids[:, s:s + L], targets=ids[:, s + 1:s + L + 1], state=state)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            state, total = out.state.detach(), total + out.loss.item()
        losses.append(total / 3)
    assert losses[-1] < losses[0] - 0.5, losses
    # the learned memory is trained (through the first segment's read and every write)
    assert (model.memory_tokens.embedding.detach() - initial).abs().max() > 1e-3


@pytest.mark.parametrize("overrides, field", [
    ({"memory.tokens.count": -1}, "memory.tokens.count"),
    ({"memory.tokens.count": 0, "memory.tokens.recurrent": True}, "memory.tokens.recurrent"),
    ({"memory.tokens.count": 2, "position.kind": "tupe"}, "position.kind"),
    ({"memory.tokens.count": 2, "memory.xl.length": 8, "position.kind": "learned"}, "position.kind"),
])
def test_config_errors(overrides, field):
    """(Combinations with recurrent and kNN memory: tests/memory/test_tokens_combined.py.)"""
    with pytest.raises(ConfigError) as error:
        build(**{k: v for k, v in overrides.items() if k != "memory.tokens.count"},
              tokens=overrides.get("memory.tokens.count", M))
    assert error.value.field_name == field


def every_third_hidden(batch, length, device):
    """A forgetful-masking draw that hides the keys at h positions 1, 4, 7, ... of every row."""
    return (torch.arange(length, device=device) % 3 != 1).expand(batch, -1).clone()


@pytest.mark.parametrize("recurrent", [False, True])
def test_forgetful_masking_hides_segment_tokens_never_memory_tokens(recurrent, monkeypatch):
    model = build(recurrent)
    monkeypatch.setattr(model, "forgetful_keep", every_third_hidden)
    ids = torch.randint(0, 256, (2, 2 * L + 5))  # two segments and a part
    read, expected = model.memory_tokens.embedding.expand(2, -1, -1), []
    for s in range(0, ids.shape[1], L):
        piece = ids[:, s:s + L]
        write = recurrent and piece.shape[1] == L
        keep = every_third_hidden(2, M + piece.shape[1] + (M if write else 0), ids.device)
        keep[:, :M] = keep[:, M + piece.shape[1]:] = True  # memory tokens are never hidden
        seg_logits, written = reference(model, piece, read, write, keep)
        expected.append(seg_logits)
        if write:
            read = written
    expected = torch.cat(expected, dim=1)
    torch.testing.assert_close(by_segments(model, ids, L)[0], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=0)  # no state (side by side)
    unmasked = build(recurrent)
    unmasked.load_state_dict(model.state_dict())
    assert not torch.allclose(unmasked(ids).logits, expected, atol=1e-3)  # the draw hides something


@pytest.mark.parametrize("recurrent", [False, True])
def test_an_empty_input_leaves_the_state_as_it_was(recurrent):
    model = build(recurrent)
    ids = torch.randint(0, 256, (2, 2 * L))
    _, state = by_segments(model, ids[:, :L + 3], L)
    saved = [layer.tensors() for layer in state.layers]
    with pytest.raises(ValueError, match=r"no tokens \(shape \(B, 0\)\)"):  # refused, not a NaN loss
        model(ids[:, :0], state=state)
    assert state.position == L + 3
    for before, after in zip(saved, state.layers):
        assert before.keys() == after.tensors().keys()
        assert all(torch.equal(before[name], getattr(after, name)) for name in before)
    with pytest.raises(ValueError, match="no tokens"):
        model(ids[:, :0])


def test_the_context_defaults_behave_like_a_segment_context():
    """Without read tokens or a memory shift, MemoryTokenContext is a SegmentContext."""
    cpu = torch.device("cpu")
    kwargs = dict(q_start=2, row_start=torch.tensor([0, 1, 3]), keep=None, bias=lambda *a: None)
    plain, ctx = SegmentContext(**kwargs), MemoryTokenContext(**kwargs)
    for cache_len, q_len in ((0, 4), (3, 2), (5, 1)):  # keys from position -3 on
        assert torch.equal(ctx.key_positions(cache_len, q_len, cpu), plain.key_positions(cache_len, q_len, cpu))
        assert torch.equal(ctx.key_mask(cache_len, q_len, cpu), plain.key_mask(cache_len, q_len, cpu))
    assert MemoryTokenContext(**{**kwargs, "row_start": None}).key_mask(5, 1, cpu) is None
    # read tokens at the default read_start 0: positions 0 and 1 are seen by every row
    mask = MemoryTokenContext(**kwargs, read_count=2).key_mask(5, 1, cpu)
    expected = plain.key_mask(5, 1, cpu)
    expected[:, 3:5] = True  # keys -3 .. 2: positions 0, 1 are keys 3, 4
    assert torch.equal(mask, expected)


def test_memory_keys_shift_to_their_true_positions_and_read_tokens_stay():
    """Frame: 4 memory keys at 1..4 (true 4..7), read tokens 5..7, tokens 8, 9."""
    ctx = MemoryTokenContext(q_start=5, row_start=None, keep=None, bias=lambda *a: None,
                             read_start=5, read_count=M, memory_shift=M)
    assert ctx.key_positions(4, M + 2, torch.device("cpu")).tolist() == [4, 5, 6, 7, 5, 6, 7, 8, 9]
    assert ctx.key_positions(4, M + 2, torch.device("meta")).device.type == "meta"  # on the asked device


def test_read_inputs_take_the_written_memory_of_rows_that_have_one():
    model = build(True)
    mt = model.memory_tokens
    assert torch.equal(mt.read_inputs(LayerState(), 2), mt.embedding.detach().expand(2, -1, -1))  # nothing written yet
    written = torch.randn(3, M, W, dtype=torch.float64)
    read = mt.read_inputs(LayerState(memory_tokens=written, memory_written=torch.tensor([True, False, True])), 3)
    assert read.shape == (3, M, W) and read.dtype == mt.embedding.dtype
    assert torch.equal(read[0], written[0].float()) and torch.equal(read[2], written[2].float())
    assert torch.equal(read[1], mt.embedding.detach())


def test_the_memory_embedding_is_initialised_with_init_std():
    model = build(tokens=16, init_std=0.05)  # 16 x 32 draws of N(0, init_std^2)
    std = model.memory_tokens.embedding.detach().std().item()
    assert 0.8 * 0.05 < std < 1.2 * 0.05, std


def test_a_bfloat16_model_with_a_float32_memory_embedding_computes_in_bfloat16():
    """Mixed precision may keep small parameters in float32: the read and write tokens join the
    bfloat16 stream rounded to it, exactly as if the embedding were bfloat16 (positions too)."""
    model = build(True, **{"position.kind": "sinusoidal"})
    full = model.memory_tokens.embedding.detach().clone()
    model.to(torch.bfloat16)
    rounded = copy.deepcopy(model)
    model.memory_tokens.embedding.data = full
    assert not torch.equal(full, rounded.memory_tokens.embedding.float())  # rounding changes it
    ids = torch.randint(0, 256, (2, 2 * L + 3))
    logits, state = by_segments(model, ids, L)
    want, want_state = by_segments(rounded, ids, L)
    assert logits.dtype == torch.bfloat16 and torch.equal(logits, want)
    assert state.layers[0].memory_tokens.dtype == torch.bfloat16
    assert torch.equal(state.layers[0].memory_tokens, want_state.layers[0].memory_tokens)


@pytest.mark.parametrize("recurrent", [False, True])
@pytest.mark.parametrize("extra", [{"position.kind": "t5"}, {"position.kind": "sinusoidal"},
                                   {"position.kind": "t5", "memory.xl.length": 8}])
def test_nothing_falls_back_to_the_default_device(recurrent, extra):
    """Every tensor is made on the model's device: with the default device elsewhere (meta, as
    the CPU is beside an accelerator), a CPU model computes exactly what it computes normally
    (forgetful masking, T5 bias, row resets, memory tokens and their flags included)."""
    model = build(recurrent, **{"attention.forgetful": 0.5}, **extra).train()
    ids, forget = torch.randint(0, 256, (2, 2 * L + 3)), torch.tensor([True, False])

    def run():
        torch.manual_seed(7)  # the same forgetful draws
        logits, state = by_segments(model, ids[:, :L + 2], L, model.init_state(2))
        more, state = by_segments(model, ids[:, L + 2:], 3, state.reset(forget))
        return torch.cat([logits, more], dim=1), state

    want, want_state = run()
    with torch.device("meta"):
        got, state = run()
    assert got.device.type == "cpu" and torch.equal(got, want)
    for layer, want_layer in zip(state.layers, want_state.layers):
        assert layer.tensors().keys() == want_layer.tensors().keys()
        assert all(torch.equal(t, getattr(want_layer, name)) for name, t in layer.tensors().items())
    if recurrent:
        assert state.layers[0].memory_written.device.type == "cpu"


@pytest.mark.parametrize("recurrent", [False, True])
def test_a_completed_segment_leaves_no_cache_however_it_was_fed(recurrent):
    model = build(recurrent, layers=1)
    ids = torch.randint(0, 256, (2, 2 * L))
    segments, seg_state = by_segments(model, ids, L)
    for size in (1, 3, 5):  # the last piece completes the second segment
        logits, state = by_segments(model, ids, size)
        torch.testing.assert_close(logits, segments, atol=1e-5, rtol=0)
        assert state.layers[0].tensors().keys() == seg_state.layers[0].tensors().keys()
        assert state.layers[0].k is None and state.layers[0].v is None
        if recurrent:
            torch.testing.assert_close(state.layers[0].memory_tokens, seg_state.layers[0].memory_tokens,
                                       atol=1e-5, rtol=0)


def test_a_state_inside_a_segment_must_hold_its_cache():
    model = build(True)
    state = model.init_state(2)
    state.position = L + 3
    with pytest.raises(ValueError, match=rf"the state at position {L + 3} holds no cache of its segment "
                                         rf"\(segments start at multiples of seq_len={L}\)"):
        model(torch.randint(0, 256, (2, 2)), state=state)


@pytest.mark.parametrize("position, length", [(0, 24), (3, 20), (5, 3), (7, 1), (6, 19), (16, 0)])
def test_pieces_cut_a_call_exactly_at_the_segment_boundaries_inside_it(position, length):
    """The pieces of `length` tokens from `position` end at every multiple of seq_len strictly inside
    the call and at its end, nowhere else (brute force over the positions)."""
    mt = build().memory_tokens
    cuts = [p for p in range(position + 1, position + length) if p % L == 0] + ([position + length] if length else [])
    expected = [b - a for a, b in zip([position] + cuts, cuts)]
    assert mt.pieces(position, length) == expected


def test_a_call_spanning_several_segments_from_inside_one_equals_segment_by_segment():
    """A 3-token piece, then one 20-token call that crosses two boundaries from an unaligned position."""
    model = build(True)
    ids = torch.randint(0, 256, (2, 23))
    segments, _ = by_segments(model, ids, L)
    state = model.init_state(2)
    first = model(ids[:, :3], state=state)
    rest = model(ids[:, 3:], state=first.state)
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], dim=1), segments, atol=1e-5, rtol=0)
