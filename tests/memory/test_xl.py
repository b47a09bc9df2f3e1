"""Transformer-XL recurrence, per-layer lengths, layerwise feedback and persistent memory."""

import copy

import pytest
import torch

import memlm
from memlm.config import ConfigError
from memlm.nn.attention import SegmentContext
from tests.conftest import by_segments, tiny_overrides

KINDS = ["none", "sinusoidal", "rope", "xpos", "t5", "tupe"]


def build(**extra):
    base = tiny_overrides(layers=3, seq_len=8, max_positions=256)
    base.update(extra)
    return memlm.build("seed-tiny", **base).eval()


@pytest.mark.parametrize("kind", KINDS)
def test_segments_with_long_memory_equal_one_pass(kind):
    model = build(**{"position.kind": kind, "memory.xl.lengths": [40, 48, 64]})
    ids = torch.randint(0, 256, (2, 40))
    logits, state = by_segments(model, ids, 8)
    torch.testing.assert_close(logits, model(ids).logits, atol=1e-5, rtol=0)
    assert [layer.mem.shape[1] for layer in state.layers] == [40, 40, 40]


@pytest.mark.parametrize("kind", ["rope", "t5"])
def test_token_by_token_equals_segment_by_segment_with_short_memory(kind):
    """Generation rolls the pending segment into memory exactly as training segments do."""
    model = build(**{"position.kind": kind, "memory.xl.lengths": [4, 8, 12]})
    ids = torch.randint(0, 256, (2, 40))
    segments, seg_state = by_segments(model, ids, 8)
    tokens, tok_state = by_segments(model, ids, 1)
    torch.testing.assert_close(tokens, segments, atol=1e-5, rtol=0)
    assert [layer.mem.shape[1] for layer in tok_state.layers] == [4, 8, 12]
    # and a short memory really forgets: the logits differ from one pass over everything
    assert not torch.allclose(segments[:, 16:], model(ids).logits[:, 16:], atol=1e-3)


def test_per_layer_lengths_and_schedules():
    model = build(**{"memory.xl.length": 12, "memory.xl.schedule": "linear", "memory.xl.min_length": 4,
                     "memory.xl.eval_multiplier": 2.0})
    assert model.config.memory_lengths(training=True) == [4, 8, 12]
    assert model.config.memory_lengths(training=False) == [8, 16, 24]
    _, state = by_segments(model, torch.randint(0, 256, (1, 48)), 8)  # eval mode
    assert [layer.mem.shape[1] for layer in state.layers] == [8, 16, 24]
    model.train()
    _, state = by_segments(model, torch.randint(0, 256, (1, 48)), 8)
    assert [layer.mem.shape[1] for layer in state.layers] == [4, 8, 12]
    with pytest.raises(ConfigError, match="memory.xl.lengths"):
        build(**{"memory.xl.lengths": [1, 2]})
    with pytest.raises(ConfigError, match="position.kind"):
        build(**{"memory.xl.length": 4, "position.kind": "learned"})


def reference_segment(model, ids, memories, q_start):
    """Run the blocks by hand with explicit memories; return logits, block inputs and outputs."""
    x = model.embed(ids)
    ctx = SegmentContext(q_start=q_start, row_start=None, keep=None,
                         bias=model.position_bias(q_start, ids.shape[1], ids.device))
    inputs, outputs = [], []
    for block, memory in zip(model.blocks, memories):
        inputs.append(x)
        x, _ = block(x, ctx, None, memory)
        outputs.append(x)
    return model.head(model.final_norm(x)), inputs, outputs


@pytest.mark.parametrize("kind", ["rope", "t5"])
def test_xl_memory_matches_its_definition(kind):
    model = build(**{"position.kind": kind, "memory.xl.lengths": [3, 5, 8]})
    ids = torch.randint(0, 256, (2, 16))
    logits, _ = by_segments(model, ids, 8)
    _, inputs, _ = reference_segment(model, ids[:, :8], [None] * 3, 0)
    memories = [inputs[i][:, 8 - n:] for i, n in enumerate([3, 5, 8])]
    expected, _, _ = reference_segment(model, ids[:, 8:], memories, 8)
    torch.testing.assert_close(logits[:, 8:], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["rope", "xpos", "t5"])
def test_layerwise_feedback_matches_its_definition(kind):
    """Layer i's memory is the previous segment's output of layer i+1; the top layer its own."""
    model = build(**{"position.kind": kind, "memory.xl.length": 8, "memory.feedback.mode": "memory"})
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
    model = build(**{"memory.xl.length": 8, "memory.feedback.mode": "memory"})
    ids = torch.randint(0, 256, (1, 16))
    external = torch.randn(1, 8, 32)
    state = model(ids[:, :8], state=model.init_state(1)).state
    state.layers[-1].external = external
    state = model(ids[:, 8:], state=state).state  # rolls: top memory <- external
    torch.testing.assert_close(state.layers[-1].mem, torch.cat([external, external], dim=1)[:, -8:])


def test_additive_feedback_matches_its_definition():
    model = build(**{"memory.feedback.mode": "add"})
    ids = torch.randint(0, 256, (2, 16))
    logits, _ = by_segments(model, ids, 8)
    _, _, outputs = reference_segment(model, ids[:, :8], [None] * 3, 0)
    x = model.embed(ids[:, 8:])
    ctx = SegmentContext(q_start=8, row_start=None, keep=None, bias=model.position_bias(8, 8, ids.device))
    feedback = [outputs[1], outputs[2], outputs[2]]
    for block, fb in zip(model.blocks, feedback):
        x, _ = block(x + fb, ctx, None, None)
    torch.testing.assert_close(logits[:, 8:], model.head(model.final_norm(x)), atol=1e-5, rtol=0)
    tokens, _ = by_segments(model, ids, 1)
    torch.testing.assert_close(tokens, logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("extra", [{"memory.xl.length": 16}, {"memory.feedback.mode": "add"},
                                   {"memory.xl.length": 16, "memory.feedback.mode": "memory"}])
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
    model = build(**{"memory.xl.length": 16}).train()
    ids = torch.randint(0, 256, (2, 16))
    state = model(ids[:, :8], state=model.init_state(2)).state
    assert state.layers[1].mem.grad_fn is not None
    detached = state.detach()
    assert all(t.grad_fn is None and not t.requires_grad for layer in detached.layers for t in layer.tensors().values())
    # the loss of segment 2 after detach has the same gradient as with a constant memory
    out = model(ids[:, 8:], targets=ids[:, 8:], state=detached)
    grads = torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)
    constant = memlm.State(8, detached.row_start, [l.map(torch.clone) for l in detached.layers])
    again = torch.autograd.grad(model(ids[:, 8:], targets=ids[:, 8:], state=constant).loss,
                                list(model.parameters()), allow_unused=True)
    for a, b in zip(grads, again):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


def test_persistent_memory_parameters_and_cached_decoding():
    plain = build(**{"position.kind": "rope", "attention.kv_heads": 2})
    model = build(**{"position.kind": "rope", "attention.kv_heads": 2, "memory.persistent.vectors": 5,
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
            block.attention.persistent.v.zero_()
    assert not torch.allclose(model(ids).logits, full, atol=1e-4)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@torch.no_grad()
def test_memory_and_persistent_backends_agree_with_eager(backend):
    extra = {"position.kind": "t5", "memory.xl.length": 8, "memory.persistent.vectors": 3}
    torch.manual_seed(4)
    ref = build(**extra, **{"attention.backend": "eager"})
    torch.manual_seed(4)
    fast = build(**extra, **{"attention.backend": backend})
    ids = torch.randint(0, 256, (2, 24))
    torch.testing.assert_close(by_segments(fast, ids, 8)[0], by_segments(ref, ids, 8)[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("preset", ["seed-mem-tiny", "seed-xl-tiny"])
def test_memory_presets_decode_token_by_token_like_segments(preset):
    """Every mechanism combined: generation rolls, compresses and trims exactly as training does."""
    model = memlm.build(preset, layers=2, width=32, seq_len=8, **{"attention.heads": 4, "memory.xl.length": 8},
                        **({"memory.compressive.length": 2} if preset == "seed-mem-tiny" else {})).eval()
    if model.config.memory.adaptive_span.enabled:
        with torch.no_grad():
            for block in model.blocks:
                block.attention.span.span.uniform_(0, 12)
        model.after_optimizer_step()
    ids = torch.randint(0, 256, (2, 48))
    segments, seg_state = by_segments(model, ids, 8)
    tokens, tok_state = by_segments(model, ids, 1)
    torch.testing.assert_close(tokens, segments, atol=1e-5, rtol=0)
    if preset == "seed-mem-tiny":
        assert seg_state.layers[0].cmem.shape[1] == 2


def compress_group_reference(model, layer, leaving, segment_input):
    """The compressed slots of `leaving` (B, n*c, W) written out: max / mean over each run of c
    states, the strided convolution, or (most-used) the n states the segment's queries attend to
    most (the layer's content attention, by brute force), oldest first."""
    from tests.memory.test_compressive import manual_content_weights

    m, block = model.config.memory, model.blocks[layer]
    c, (B, N, W) = m.compressive.rate, leaving.shape
    groups = leaving.view(B, N // c, c, W)
    if m.compressive.fn == "max":
        return groups.amax(2)
    if m.compressive.fn == "mean":
        return groups.mean(2)
    if m.compressive.fn == "conv":
        conv = model.compressors[layer].conv
        out = torch.einsum("oik,bnki->bno", conv.weight, groups)
        return out + conv.bias if conv.bias is not None else out
    norm = block.attn_norm if block.pre_norm else (lambda t: t)
    usage = manual_content_weights(block.attention, norm(segment_input), norm(leaving)).sum(dim=(1, 2))  # (B, N)
    return torch.stack([leaving[b, usage[b].topk(N // c).indices.sort().values] for b in range(B)])


@torch.no_grad()
def reference_stream(model, ids, external=None):
    """Segment by segment with the memories kept by the test as the stream of each layer's memory
    sources (block inputs; with feedback 'memory' the next block's outputs, the top block's own or
    `external`): a layer's memory is the last `length` states of its stream; with compression,
    the states that left memory at a roll, less their oldest (count mod c), are compressed c to 1
    and the compressed memory is the last compress_length slots. Returns the logits (B, T, V) and,
    per segment, each layer's (mem, cmem or None)."""
    config, m = model.config, model.config.memory
    lengths, layers, S = config.memory_lengths(model.training), len(model.blocks), config.seq_len
    stream = [ids.new_zeros(ids.shape[0], 0, config.width, dtype=torch.float32) for _ in range(layers)]
    left = [0] * layers  # states of each stream that have left memory
    slots = [[] for _ in range(layers)]  # compressed slots, oldest first
    logits, states = [], []
    for start in range(0, ids.shape[1], S):
        def cmem(i):
            return torch.cat(slots[i], dim=1)[:, -m.compressive.length:] if slots[i] else None

        mems = [stream[i][:, max(0, stream[i].shape[1] - lengths[i]):] for i in range(layers)]
        memories = [torch.cat([t for t in (cmem(i), mems[i]) if t is not None], dim=1) for i in range(layers)]
        seg_logits, inputs, outputs = reference_segment(model, ids[:, start:start + S],
                                                        [t if t.shape[1] else None for t in memories], start)
        logits.append(seg_logits)
        for i in range(layers):
            if m.feedback.mode == "memory":
                source = outputs[i + 1] if i + 1 < layers else (external if external is not None else outputs[-1])
            else:
                source = inputs[i]
            stream[i] = torch.cat([stream[i], source], dim=1)
            boundary = max(0, stream[i].shape[1] - lengths[i])
            if m.compressive.rate and boundary > left[i]:
                leaving = stream[i][:, left[i]:boundary]
                leaving = leaving[:, leaving.shape[1] % m.compressive.rate:]
                if leaving.shape[1]:
                    slots[i].append(compress_group_reference(model, i, leaving, inputs[i]))
            left[i] = boundary
        states.append([(stream[i][:, max(0, stream[i].shape[1] - lengths[i]):], cmem(i)) for i in range(layers)])
    return torch.cat(logits, dim=1), states


def assert_state_matches(state, expected):
    for layer, (mem, cmem) in zip(state.layers, expected):
        torch.testing.assert_close(layer.mem, mem, atol=1e-5, rtol=0)
        if cmem is None:
            assert layer.cmem is None
        else:
            torch.testing.assert_close(layer.cmem, cmem, atol=1e-5, rtol=0)


def pieces_of(ids, sizes):
    out, start = [], 0
    for size in sizes:
        out.append(ids[:, start:start + size])
        start += size
    assert start == ids.shape[1]
    return out


@pytest.mark.parametrize("feedback", ["none", "memory"])
def test_memory_after_every_segment_is_the_last_length_states_of_its_stream(feedback):
    """Per layer: XL memory = the last `length` block inputs (feedback: next block's outputs), also
    of length 0 (no memory at all) and longer than what was seen; pieces that end inside a
    segment wait in 'pending' (the inputs so far) and roll when it completes."""
    model = build(**{"position.kind": "rope", "memory.xl.lengths": [0, 5, 11], "memory.feedback.mode": feedback})
    ids = torch.randint(0, 256, (2, 32))
    expected_logits, expected = reference_stream(model, ids)
    state, logits, position = model.init_state(2), [], 0
    inputs = [[] for _ in model.blocks]
    hooks = [block.register_forward_pre_hook(lambda module, args, i=i: inputs[i].append(args[0]))
             for i, block in enumerate(model.blocks)]
    try:
        for piece in pieces_of(ids, [3, 5, 8, 1, 2, 4, 1, 6, 2]):
            out = model(piece, state=state)
            logits.append(out.logits)
            state, position = out.state, position + piece.shape[1]
            done, segment = position // 8, position % 8
            if segment == 0:
                assert_state_matches(state, expected[done - 1])
                assert all(layer.pending is None for layer in state.layers)
            else:
                for i, layer in enumerate(state.layers):
                    torch.testing.assert_close(layer.pending, torch.cat(inputs[i], dim=1)[:, -segment:])
                if done:
                    assert_state_matches(state, expected[done - 1])
    finally:
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(torch.cat(logits, dim=1), expected_logits, atol=1e-5, rtol=0)
    assert state.layers[0].mem.shape == (2, 0, 32)


@pytest.mark.parametrize("fn,feedback,placement", [("max", "none", "pre"), ("mean", "memory", "pre"),
                                                   ("conv", "none", "pre"), ("most_used", "none", "pre"),
                                                   ("most_used", "memory", "pre"), ("most_used", "none", "post")])
def test_compression_at_roll_time_matches_the_stream_definition(fn, feedback, placement):
    """Rate 3 with memories of 5, 8 and 3 states: rolls compress overflows of 3 and 6 states and drop
    (overflow mod 3) oldest ones; compressed memory keeps its last 5 slots; every layer attends to
    [cmem | mem | segment]; token by token rolls and compresses exactly like segments. most-used
    ranks by the content attention of the layer's normed inputs (pre-norm) or raw ones (post-norm)."""
    model = build(**{"position.kind": "rope", "memory.xl.lengths": [5, 8, 3], "memory.feedback.mode": feedback,
                     "memory.compressive.rate": 3, "memory.compressive.length": 5, "memory.compressive.fn": fn, "bias": True, "norm.placement": placement})
    with torch.no_grad():
        for block in model.blocks:
            block.attention.qkv.bias.normal_()
    ids = torch.randint(0, 256, (2, 32))
    expected_logits, expected = reference_stream(model, ids)
    assert [cmem.shape[1] for _, cmem in expected[-1]] == [5, 5, 5]
    state, logits = model.init_state(2), []
    for seg in range(4):
        out = model(ids[:, 8 * seg:8 * seg + 8], state=state)
        logits.append(out.logits)
        state = out.state
        assert_state_matches(state, expected[seg])
    torch.testing.assert_close(torch.cat(logits, dim=1), expected_logits, atol=1e-5, rtol=0)
    state, logits = model.init_state(2), []
    for piece in pieces_of(ids, [3, 5, 1, 7, 8, 2, 6]):  # pieces that end inside segments
        out = model(piece, state=state)
        logits.append(out.logits)
        state = out.state
    torch.testing.assert_close(torch.cat(logits, dim=1), expected_logits, atol=1e-5, rtol=0)
    assert_state_matches(state, expected[-1])


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_compression_loss_is_the_mean_reconstruction_loss_of_the_layers_that_compressed(placement):
    """Training with a learned (conv) compressor: aux_loss = mean over the layers whose memory
    overflowed at this roll of |attn(h, old) - attn(h, conv(old))|^2, h the layer's segment inputs,
    all through the attention norm where it comes first; no loss in evaluation, under no_grad, or
    for a compression without parameters."""
    from tests.memory.test_compressive import manual_content_attention

    extra = {"position.kind": "rope", "memory.xl.lengths": [5, 8, 3], "memory.compressive.rate": 3,
             "memory.compressive.length": 5, "memory.compressive.loss_weight": 1.0, "norm.placement": placement}
    model = build(**extra).train()
    assert model.compressors[0].conv.bias is None
    ids = torch.randint(0, 256, (2, 16))
    inputs = [[] for _ in model.blocks]
    hooks = [block.register_forward_pre_hook(lambda module, args, i=i: inputs[i].append(args[0].detach()))
             for i, block in enumerate(model.blocks)]
    try:
        first = model(ids[:, :8], state=model.init_state(2))
        second = model(ids[:, 8:], state=first.state)
    finally:
        for hook in hooks:
            hook.remove()

    @torch.no_grad()
    def reconstruction(i, segment, old):
        block, conv = model.blocks[i], model.compressors[i].conv
        norm = block.attn_norm if block.pre_norm else (lambda t: t)
        compressed = torch.einsum("oik,bnki->bno", conv.weight, old.unflatten(1, (-1, 3)))  # bias-free (seed)
        return (manual_content_attention(block.attention, norm(segment), norm(old))
                - manual_content_attention(block.attention, norm(segment), norm(compressed))).pow(2).mean()

    stream = [torch.cat(inputs[i], dim=1) for i in range(3)]  # (2, 16, 32) block inputs of both segments
    # first roll: 8 - 5 = 3 states leave layer 0, none layer 1, 5 layer 2 (its oldest 2 dropped)
    expected_first = [reconstruction(0, stream[0][:, :8], stream[0][:, :3]),
                      reconstruction(2, stream[2][:, :8], stream[2][:, 2:5])]
    # second roll: 8 leave each layer, the oldest 2 of them dropped
    expected_second = [reconstruction(0, stream[0][:, 8:], stream[0][:, 5:11]),
                       reconstruction(1, stream[1][:, 8:], stream[1][:, 2:8]),
                       reconstruction(2, stream[2][:, 8:], stream[2][:, 7:13])]
    torch.testing.assert_close(first.aux_loss.double(), torch.stack(expected_first).mean(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(second.aux_loss.double(), torch.stack(expected_second).mean(), rtol=1e-4, atol=1e-7)
    assert second.aux_loss > 0
    with torch.no_grad():
        assert model(ids[:, 8:], state=first.state).aux_loss == 0
    assert model.eval()(ids[:, 8:], state=first.state).aux_loss == 0
    pooled = build(**extra, **{"memory.compressive.fn": "max"}).train()
    pooled_first = pooled(ids[:, :8], state=pooled.init_state(2))
    assert pooled_first.aux_loss == 0 and pooled(ids[:, 8:], state=pooled_first.state).aux_loss == 0


def test_additive_feedback_covers_segments_longer_than_the_width():
    """Every position of a segment gets the previous segment's upper output at its own index, also
    when a segment (24 positions) is longer than the model is wide (16), and in pieces."""
    model = memlm.build("seed-tiny", layers=2, width=16, seq_len=24, max_positions=256,
                        **{"attention.heads": 2, "memory.feedback.mode": "add"}).eval()
    ids = torch.randint(0, 256, (1, 48))
    _, _, outputs = reference_segment(model, ids[:, :24], [None] * 2, 0)
    x = model.embed(ids[:, 24:])
    ctx = SegmentContext(q_start=24, row_start=None, keep=None, bias=model.position_bias(24, 24, ids.device))
    for block, fb in zip(model.blocks, [outputs[1], outputs[1]]):
        x, _ = block(x + fb, ctx, None, None)
    expected = model.head(model.final_norm(x))
    state, logits = model.init_state(1), []
    for piece in pieces_of(ids, [24, 5, 19]):
        out = model(piece, state=state)
        logits.append(out.logits)
        state = out.state
    torch.testing.assert_close(torch.cat(logits, dim=1)[:, 24:], expected, atol=1e-5, rtol=0)


def test_a_float32_state_resumes_in_a_bfloat16_model():
    """The additive feedback a float32 run leaves is added in the model's own dtype."""
    model = build(**{"memory.feedback.mode": "add"})
    ids = torch.randint(0, 256, (2, 16))
    state = model(ids[:, :8], state=model.init_state(2)).state
    reference = model(ids[:, 8:], state=state).logits
    half = copy.deepcopy(model).to(torch.bfloat16)
    logits = half(ids[:, 8:], state=state).logits
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), reference, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("layers", [[0], [1, 2]])
def test_knn_stores_receive_each_completed_segment_at_its_stream_positions(layers):
    """A kNN layer's store gets a segment's unit keys and values (of its normed block inputs) once
    the segment completes, at its stream positions, whatever pieces it arrives in; an unfinished
    segment writes nothing."""
    model = build(**{"memory.xl.length": 4, "memory.knn.layers": layers, "memory.knn.k": 4,
                     "memory.knn.capacity": 64})
    ids = torch.randint(0, 256, (2, 30))
    inputs = [[] for _ in model.blocks]
    hooks = [block.register_forward_pre_hook(lambda module, args, i=i: inputs[i].append(args[0]))
             for i, block in enumerate(model.blocks)]
    state, position = model.init_state(2), 0
    try:
        for piece in pieces_of(ids, [3, 5, 8, 2, 6, 1, 5]):
            state = model(piece, state=state).state
            position += piece.shape[1]
            completed = position - position % 8
            for layer in layers:
                block = model.blocks[layer]
                x = torch.cat(inputs[layer], dim=1)[:, :completed]
                k, v = block.attention.project_kv(block.attn_norm(x))
                for row in range(2):
                    keys, values, positions = state.stores[layer].entries(row)
                    assert positions.tolist() == list(range(completed))
                    torch.testing.assert_close(keys, torch.nn.functional.normalize(k[row], dim=-1))
                    torch.testing.assert_close(values, v[row])
    finally:
        for hook in hooks:
            hook.remove()


def test_a_single_layer_model_rolls_like_the_stream_definition():
    """One block (its own output is the top): memory and logits per segment and per piece."""
    model = build(**{"layers": 1, "position.kind": "rope", "memory.xl.length": 6})
    ids = torch.randint(0, 256, (2, 24))
    expected_logits, expected = reference_stream(model, ids)
    state, logits = model.init_state(2), []
    for piece in pieces_of(ids, [5, 3, 8, 1, 7]):
        out = model(piece, state=state)
        logits.append(out.logits)
        state = out.state
    torch.testing.assert_close(torch.cat(logits, dim=1), expected_logits, atol=1e-5, rtol=0)
    assert_state_matches(state, expected[-1])


def test_external_feedback_feeds_the_top_layer_at_every_roll():
    """An 'external' tensor set once on the top layer stays in the state and is what the top layer's
    memory receives at every roll; the layers below still take the next block's outputs."""
    model = build(**{"position.kind": "rope", "memory.xl.lengths": [4, 6, 8], "memory.feedback.mode": "memory"})
    ids = torch.randint(0, 256, (2, 24))
    external = torch.randn(2, 5, 32)
    expected_logits, expected = reference_stream(model, ids, external=external)
    state, logits = model.init_state(2), []
    state.layers[-1].external = external
    for seg in range(3):
        out = model(ids[:, 8 * seg:8 * seg + 8], state=state)
        logits.append(out.logits)
        state = out.state
        assert_state_matches(state, expected[seg])
        assert state.layers[-1].external is external
    torch.testing.assert_close(torch.cat(logits, dim=1), expected_logits, atol=1e-5, rtol=0)


def test_a_checkpoint_with_the_old_persistent_vector_names_loads_into_the_same_weights():
    """Weights saved when the vectors were attention.persistent_k / persistent_v load into
    attention.persistent.k / .v unchanged, and an incomplete old checkpoint is still refused."""
    torch.manual_seed(0)
    saved = memlm.build("seed-tiny", layers=2, **{"memory.persistent.vectors": 3}).state_dict()
    old = {key.replace("persistent.k", "persistent_k").replace("persistent.v", "persistent_v"): value
           for key, value in saved.items()}
    assert "blocks.1.attention.persistent_k" in old and "blocks.1.attention.persistent.k" not in old
    fresh = memlm.build("seed-tiny", layers=2, **{"memory.persistent.vectors": 3})
    fresh.load_state_dict(old)
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0)
    del old["blocks.0.attention.persistent_v"]
    with pytest.raises(RuntimeError, match="persistent.v"):
        memlm.build("seed-tiny", layers=2, **{"memory.persistent.vectors": 3}).load_state_dict(old)


def test_registry_extensions_are_carried_unchanged_between_segment_completions():
    """A registry mechanism's state (here NTM slots) rides through xl.next_layers untouched while a
    segment is unfinished: after a partial piece it is the same as before it, and the segment
    completed in two pieces leaves the same slots as the whole segment at once."""
    torch.manual_seed(0)
    model = build(**{"memory.xl.length": 8, "memory.ntm.layers": [1], "memory.ntm.slots": 4})
    ids = torch.randint(0, 256, (2, 16))
    first = model(ids[:, :8], state=model.init_state(2)).state
    before = first.layers[1].extensions["ntm"]
    half = model(ids[:, 8:12], state=first).state
    carried = half.layers[1].extensions["ntm"]
    for name in ("slots", "segment", "keep", "written"):
        torch.testing.assert_close(getattr(carried, name), getattr(before, name), rtol=0, atol=0)
    whole = model(ids[:, 8:], state=first).state.layers[1].extensions["ntm"]
    split = model(ids[:, 12:], state=half).state.layers[1].extensions["ntm"]
    for name in ("slots", "segment", "keep", "written"):
        torch.testing.assert_close(getattr(split, name), getattr(whole, name), atol=1e-6, rtol=0)
    assert not torch.allclose(whole.segment, before.segment)  # the completed segment was written
