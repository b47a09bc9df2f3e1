"""Memory tokens combined with recurrent memory (Transformer-XL, per-layer lengths, feedback,
compressive, adaptive span, persistent) and with kNN memory (memlm.memory.tokens)."""

import io

import pytest
import torch
import torch.nn.functional as F

import memlm
from memlm.config import ConfigError
from memlm.memory import knn
from memlm.memory.tokens import MemoryTokenContext
from memlm.nn.attention import SegmentContext
from tests.conftest import by_segments

M, W, L = 3, 32, 8
KNN = {"memory.knn.layers": [1], "memory.knn.k": 4, "memory.knn.capacity": 64}
COMBOS = {
    "xl": {"memory.xl.length": 8},
    "xl-short": {"memory.xl.lengths": [3, 12]},
    "feedback": {"memory.xl.length": 8, "memory.feedback.mode": "memory"},
    "feedback-add": {"memory.feedback.mode": "add"},
    "compressive": {"memory.xl.length": 4, "memory.compressive.rate": 2, "memory.compressive.length": 3},
    "span+persistent": {"memory.xl.length": 12, "memory.adaptive_span.enabled": True, "memory.adaptive_span.init": 0.5,
                        "memory.adaptive_span.ramp": 4, "memory.persistent.vectors": 2},
    "knn": KNN,
    "knn+xl": {"memory.xl.length": 8, **KNN},
}


def build(recurrent=False, tokens=M, layers=2, **extra):
    overrides = {"layers": layers, "width": W, "seq_len": L, "max_positions": 64, "attention.heads": 4,
                 "memory.tokens.count": tokens, "memory.tokens.recurrent": recurrent}
    overrides.update(extra)
    model = memlm.build("seed-tiny", **overrides).eval()
    if model.config.memory.adaptive_span.enabled:  # spans of different lengths, so the ramp cuts the memory
        with torch.no_grad():
            for block in model.blocks:
                block.attention.span.span.copy_(torch.tensor([2.0, 6.0, 11.0, 20.0]))
        model.after_optimizer_step()
    return model


@pytest.mark.parametrize("recurrent", [False, True])
@pytest.mark.parametrize("combo", list(COMBOS))
def test_token_by_token_equals_segment_by_segment(combo, recurrent):
    model = build(recurrent, **COMBOS[combo])
    ids = torch.randint(0, 256, (2, 3 * L + 3))  # three segments and a part
    segments, seg_state = by_segments(model, ids, L)
    tokens, tok_state = by_segments(model, ids, 1)
    uneven, _ = by_segments(model, ids, 5)  # pieces that straddle segment boundaries
    torch.testing.assert_close(tokens, segments, atol=1e-5, rtol=0)
    torch.testing.assert_close(uneven, segments, atol=1e-5, rtol=0)
    # the unfinished segment: the block inputs of its M read tokens and its 3 tokens
    for layer in (seg_state.layers[0], tok_state.layers[1]):
        assert layer.read.shape == (2, M, W) and layer.pending.shape == (2, 3, W)
        assert layer.k is None  # hidden states, not a key/value cache
    for a, b in zip(seg_state.layers, tok_state.layers):
        assert a.tensors().keys() == b.tensors().keys()
        for name, t in a.tensors().items():
            torch.testing.assert_close(t, getattr(b, name), atol=1e-5, rtol=0)
    lengths = model.config.memory_lengths(training=False)
    if any(lengths):  # the recurrent memory holds token positions only: min(length, 3 segments of L)
        assert [layer.mem.shape[1] for layer in seg_state.layers] == [min(n, 3 * L) for n in lengths]
    if "memory.knn.layers" not in COMBOS[combo]:  # without a state: one stream from an empty memory
        torch.testing.assert_close(model(ids).logits, segments, atol=1e-5, rtol=0)


@pytest.mark.parametrize("recurrent", [False, True])
@pytest.mark.parametrize("kind", ["rope", "xpos", "t5", "none", "sinusoidal"])
def test_every_relative_position_kind_decodes_like_segments(kind, recurrent):
    model = build(recurrent, **{"position.kind": kind, "memory.xl.lengths": [5, 16]})
    ids = torch.randint(0, 256, (2, 3 * L + 4))
    segments, _ = by_segments(model, ids, L)
    torch.testing.assert_close(by_segments(model, ids, 1)[0], segments, atol=1e-5, rtol=0)
    torch.testing.assert_close(by_segments(model, ids, 3)[0], segments, atol=1e-5, rtol=0)


def reference(model, ids, lengths, recurrent, feedback="none", stores=None):
    """The definition, by hand: each segment runs [read | tokens | write] through the blocks as
    one causal sequence whose first position is s - M, after a memory of the last `lengths[i]`
    TOKEN positions of earlier segments: block i's inputs, or with feedback 'memory' block
    i+1's outputs (the top block: its own). Feedback 'add' adds the previous segment's output of
    block i+1 to block i's input at the token positions. stores: kNN stores by layer, read by
    the blocks and written with the token inputs of each completed segment. Returns logits and
    per block the memory source of every segment."""
    B, T = ids.shape
    read = model.memory_tokens.embedding.expand(B, -1, -1)
    learned = model.memory_tokens.embedding.expand(B, -1, -1)
    n = len(model.blocks)
    history, added = [[] for _ in model.blocks], [None] * n
    logits = []
    for s in range(0, T, L):
        x = torch.cat([read, model.embed(ids[:, s:s + L])] + ([learned] if recurrent else []), dim=1)
        q_start = s - M
        ctx = SegmentContext(q_start=q_start, row_start=None, keep=None,
                             bias=model.position_bias(q_start, x.shape[1], ids.device), stores=stores)
        inputs, outputs = [], []
        for i, block in enumerate(model.blocks):
            if added[i] is not None:
                x = torch.cat([x[:, :M], x[:, M:M + L] + added[i], x[:, M + L:]], dim=1)
            past = torch.cat(history[i], dim=1) if history[i] else x[:, :0]
            memory = past[:, past.shape[1] - min(lengths[i], past.shape[1]):]
            inputs.append(x[:, M:M + L])
            x, _ = block(x, ctx, None, memory if memory.shape[1] else None)
            outputs.append(x[:, M:M + L])
        logits.append(model.head(model.final_norm(x[:, M:M + L])))
        for i in range(n):
            above = outputs[min(i + 1, n - 1)]
            history[i].append(above if feedback == "memory" else inputs[i])
            if feedback == "add":
                added[i] = above
        for layer, store in (stores or {}).items():
            knn.write_segment(model.blocks[layer], store, inputs[layer], s)
        if recurrent:
            read = x[:, M + L:]
    return torch.cat(logits, dim=1), history


@pytest.mark.parametrize("recurrent", [False, True])
@pytest.mark.parametrize("kind", ["rope", "t5"])
def test_combination_matches_its_definition(kind, recurrent):
    lengths = [5, 11]
    model = build(recurrent, **{"position.kind": kind, "memory.xl.lengths": lengths})
    ids = torch.randint(0, 256, (2, 3 * L))
    logits, state = by_segments(model, ids, L)
    expected, history = reference(model, ids, lengths, recurrent)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    for i, n in enumerate(lengths):  # memory tokens are not pushed into the recurrent memory
        tokens = torch.cat(history[i], dim=1)
        torch.testing.assert_close(state.layers[i].mem, tokens[:, -n:], atol=1e-5, rtol=0)
        assert state.layers[i].read is None and state.layers[i].pending is None  # segment complete
    # and the memory is attended: without it (a fresh state at position 2L) the last segment differs
    fresh = model.init_state(2)
    fresh.position = 2 * L
    assert not torch.allclose(model(ids[:, 2 * L:], state=fresh).logits, logits[:, 2 * L:], atol=1e-3)


@pytest.mark.parametrize("recurrent", [False, True])
@pytest.mark.parametrize("combo", ["feedback", "feedback-add", "knn+xl"])
def test_feedback_and_knn_combinations_match_their_definition(combo, recurrent):
    model = build(recurrent, **{"position.kind": "t5"}, **COMBOS[combo])
    if model.blocks[1].attention.knn is not None:  # a gate well open, so the kNN memory matters
        with torch.no_grad():
            model.blocks[1].attention.knn.gate.fill_(1.0)
    ids = torch.randint(0, 256, (2, 3 * L))
    lengths = model.config.memory_lengths(training=False)
    stores = model.init_state(2).stores or None
    expected, history = reference(model, ids, lengths, recurrent, model.config.memory.feedback.mode, stores)
    for size in (L, 1, 5):  # segment by segment, token by token, pieces across the boundaries
        logits, state = by_segments(model, ids, size)
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
        for i, n in enumerate(lengths):
            if n:
                torch.testing.assert_close(state.layers[i].mem, torch.cat(history[i], dim=1)[:, -n:],
                                           atol=1e-5, rtol=0)
        for layer, store in (stores or {}).items():
            for row in range(2):
                got, want = state.stores[layer].entries(row), store.entries(row)
                torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)
                assert got[2].tolist() == want[2].tolist() == list(range(3 * L))


@pytest.mark.parametrize("recurrent", [False, True])
def test_a_segment_attends_to_the_compressed_and_recurrent_memory_of_its_state(recurrent):
    """The fourth segment by hand: [read | tokens | write] after each layer's [cmem | mem] of the state."""
    model = build(recurrent, **{"position.kind": "t5"}, **COMBOS["compressive"])
    ids = torch.randint(0, 256, (2, 4 * L))
    _, state = by_segments(model, ids[:, :3 * L], L)
    assert all(layer.cmem.shape[1] and layer.mem.shape[1] for layer in state.layers)
    learned = model.memory_tokens.embedding.expand(2, -1, -1)
    read = state.layers[0].memory_tokens if recurrent else learned
    x = torch.cat([read, model.embed(ids[:, 3 * L:])] + ([learned] if recurrent else []), dim=1)
    q_start = 3 * L - M
    ctx = SegmentContext(q_start=q_start, row_start=None, keep=None,
                         bias=model.position_bias(q_start, x.shape[1], ids.device))
    for block, layer in zip(model.blocks, state.layers):
        x, _ = block(x, ctx, None, torch.cat([layer.cmem, layer.mem], dim=1))
    expected = model.head(model.final_norm(x[:, M:M + L]))
    for size in (L, 1, 5):
        torch.testing.assert_close(by_segments(model, ids[:, 3 * L:], size, state)[0], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("recurrent", [False, True])
def test_an_unused_knn_memory_equals_memory_tokens_alone(recurrent):
    """kNN layers with their gate shut take the hidden-state path of the combination with
    memory length 0; it must give what memory tokens alone (key/value cache path) give."""
    torch.manual_seed(5)
    alone = build(recurrent)
    model = build(recurrent, **KNN)
    model.load_state_dict(alone.state_dict(), strict=False)
    with torch.no_grad():
        model.blocks[1].attention.knn.gate.fill_(-1e4)
    ids = torch.randint(0, 256, (2, 3 * L + 5))
    want, want_state = by_segments(alone, ids, L)
    for size in (L, 1, 5):
        got, state = by_segments(model, ids, size)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert state.stores[1].counts.tolist() == [3 * L, 3 * L]
        if recurrent:
            torch.testing.assert_close(state.layers[0].memory_tokens, want_state.layers[0].memory_tokens,
                                       atol=1e-5, rtol=0)
    torch.testing.assert_close(model(ids).logits, alone(ids).logits, atol=1e-5, rtol=0)  # no state either


@pytest.mark.parametrize("recurrent", [False, True])
def test_knn_store_holds_exactly_the_segments_token_keys(recurrent):
    model = build(recurrent, **KNN)
    ids = torch.randint(0, 256, (2, 3 * L + 5))
    block = model.blocks[1]
    seen = []
    handle = block.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    _, state = by_segments(model, ids, L)
    handle.remove()
    store = state.stores[1]
    assert store.counts.tolist() == store.written.tolist() == [3 * L, 3 * L]  # tokens written, no memory tokens
    tokens = torch.cat([h[:, M:M + L] for h in seen[:3]], dim=1)  # (B, 3L, W) block inputs at the tokens
    with torch.no_grad():
        k, v = block.attention.project_kv(block.attn_norm(tokens))
    for row in range(2):
        keys, values, positions = store.entries(row)
        assert positions.tolist() == list(range(3 * L))
        torch.testing.assert_close(keys, F.normalize(k[row], dim=-1), atol=1e-5, rtol=0)
        torch.testing.assert_close(values, v[row], atol=1e-5, rtol=0)


@pytest.mark.parametrize("recurrent", [False, True])
def test_reset_at_a_boundary_behaves_like_a_fresh_state(recurrent):
    model = build(recurrent, **{"memory.xl.length": 8, "position.kind": "t5"}, **KNN)
    ids = torch.randint(0, 256, (2, 3 * L))
    kept, _ = by_segments(model, ids, L)
    _, state = by_segments(model, ids[:, :2 * L], L)
    state = state.reset(torch.tensor([True, False]))
    logits, _ = by_segments(model, ids[:, 2 * L:], 1, state)  # token by token
    fresh = model(ids[:1, 2 * L:], state=model.init_state(1)).logits
    torch.testing.assert_close(logits[:1], fresh, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[1:], kept[1:, 2 * L:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("recurrent", [False, True])
def test_reset_inside_a_segment_forgets_exactly_the_row_past(recurrent):
    """Row 0 is reset at position L + 2. What follows must not depend on the tokens before it,
    and must still see the tokens after it through the recurrent memory (a one-layer model:
    nothing else carries them into the next segment without recurrent tokens)."""
    model = build(recurrent, layers=1, **{"memory.xl.length": L})
    reset_at = L + 2
    ids = torch.randint(0, 256, (2, 3 * L))

    def run(x):
        _, state = by_segments(model, x[:, :reset_at], 2)
        state = state.reset(torch.tensor([True, False]))
        return by_segments(model, x[:, reset_at:], 3, state)[0]

    base = run(ids)
    before = ids.clone()
    before[0, :reset_at] = torch.randint(0, 256, (reset_at,))
    torch.testing.assert_close(run(before)[0], base[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(base[1], by_segments(model, ids, 4)[0][1, reset_at:], atol=1e-5, rtol=0)
    after = ids.clone()
    after[0, reset_at] = (ids[0, reset_at] + 1) % 256  # the first token after the reset
    changed = run(after)
    assert (changed[0, 2 * L - reset_at:] - base[0, 2 * L - reset_at:]).abs().max() > 1e-3  # next segment


def test_the_reset_mask_puts_memory_keys_at_their_true_positions():
    """Frame: memory keys at 8-M-4 .. 8-M-1 (true positions 4..7), read tokens 5..7, tokens 8.."""
    ctx = MemoryTokenContext(q_start=8 - M, row_start=torch.tensor([0, 6, 8, 9]), keep=None,
                             bias=lambda *a: None, read_start=8 - M, read_count=M,
                             read_visible=torch.tensor([True, True, True, False]), memory_shift=M)
    mask = ctx.key_mask(4, M + 2, torch.device("cpu"))  # 4 memory keys, then read tokens and 2 tokens
    assert mask.int().tolist() == [[1, 1, 1, 1, 1, 1, 1, 1, 1],
                                   [0, 0, 1, 1, 1, 1, 1, 1, 1],
                                   [0, 0, 0, 0, 1, 1, 1, 1, 1],
                                   [0, 0, 0, 0, 0, 0, 0, 0, 1]]


@pytest.mark.parametrize("recurrent", [False, True])
def test_training_steps_lower_the_loss(recurrent):
    model = build(recurrent, **{"memory.xl.length": 8, "memory.compressive.rate": 2, "memory.compressive.length": 4}).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 256, (4, 3 * L + 1))
    losses, aux = [], []
    for _ in range(8):
        state, total = model.init_state(4), 0.0
        for s in range(0, 3 * L, L):
            out = model(ids[:, s:s + L], targets=ids[:, s + 1:s + L + 1], state=state)
            optimizer.zero_grad()
            (out.loss + out.aux_loss).backward()
            optimizer.step()
            state, total = out.state.detach(), total + out.loss.item()
            aux.append(out.aux_loss.item())
        losses.append(total / 3)
    assert losses[-1] < losses[0] - 0.5, losses
    assert max(aux) > 0  # the compressor's reconstruction loss reaches aux_loss
    assert all(not t.requires_grad for layer in state.layers for t in layer.tensors().values())


@pytest.mark.parametrize("recurrent", [False, True])
def test_state_and_model_round_trip_exactly(recurrent):
    """Save the state mid-segment (read tokens, pending inputs, memory, kNN store) and the model;
    resuming from the copies gives exactly the logits of going on."""
    model = build(recurrent, **{"memory.xl.length": 8}, **KNN)
    ids = torch.randint(0, 256, (2, 4 * L))
    cut = 2 * L + 3
    _, state = by_segments(model, ids[:, :cut], L)
    assert state.layers[0].read is not None and state.stores[1].counts.tolist() == [2 * L, 2 * L]
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "state": state.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    going_on, _ = by_segments(model, ids[:, cut:], 3, state)
    copy = build(recurrent, **{"memory.xl.length": 8}, **KNN)
    copy.load_state_dict(saved["model"])
    resumed, _ = by_segments(copy, ids[:, cut:], 3, copy.load_state(saved["state"]))
    assert torch.equal(resumed, going_on)


def test_detach_cuts_gradients_and_generation_equals_recomputation():
    model = build(True, **{"memory.xl.length": 8, "memory.feedback.mode": "memory"}).train()
    ids = torch.randint(0, 256, (1, 2 * L + 3))
    out = model(ids, state=model.init_state(1))
    assert out.state.layers[0].mem.grad_fn is not None
    assert all(t.grad_fn is None for layer in out.state.detach().layers for t in layer.tensors().values())
    model.eval()
    prompt = torch.randint(0, 256, (2, 5))
    generated = memlm.generate(model, prompt, max_new_tokens=2 * L, temperature=0, decode="eager")
    for t in range(5, generated.shape[1]):  # greedy: each new token is the argmax of a pass over the prefix
        logits, _ = by_segments(model, generated[:, :t], L)
        assert torch.equal(generated[:, t], logits[:, -1].argmax(-1))


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@torch.no_grad()
def test_backends_agree_with_eager(backend):
    extra = {"position.kind": "t5", "attention.kv_heads": 2, "memory.xl.length": 8}
    torch.manual_seed(3)
    ref = build(True, **extra, **{"attention.backend": "eager"})
    torch.manual_seed(3)
    fast = build(True, **extra, **{"attention.backend": backend})
    ids = torch.randint(0, 256, (2, 3 * L))
    outputs = []
    for model in (ref, fast):
        _, state = by_segments(model, ids[:, :L + 2], L)
        state = state.reset(torch.tensor([False, True]))
        outputs.append(by_segments(model, ids, 3, state)[0])
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("extra", [{"memory.xl.length": 8}, {"memory.xl.lengths": [0, 4]}, {"memory.feedback.mode": "add"},
                                   {"memory.xl.length": 4, "memory.feedback.mode": "memory", "memory.compressive.rate": 2,
                                    "memory.compressive.length": 2}, KNN])
def test_combinations_are_accepted_and_tupe_is_still_refused(extra):
    assert build(True, **extra).config.recurrent
    with pytest.raises(ConfigError) as error:
        build(True, **extra, **{"position.kind": "tupe"})
    assert error.value.field_name == "position.kind"


def test_a_state_inside_a_segment_must_hold_its_read_tokens():
    model = build(True, **{"memory.xl.length": 8})
    state = model.init_state(2)
    state.position = L + 3
    with pytest.raises(ValueError, match=rf"the state at position {L + 3} holds no read tokens of its segment "
                                         rf"\(segments start at multiples of seq_len={L}\)"):
        model(torch.randint(0, 256, (2, 2)), state=state)
