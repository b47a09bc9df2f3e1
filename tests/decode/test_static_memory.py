"""The static memory decode step (memlm.decode.static_memory) against the model's own forward.

Reference: the forward fed segment by segment with its State (the identity "segments == token by
token" holds for every mechanism, tests/memory). The decoder's step must give the same logits to
float32 rounding across memory rolls, compressions, kNN and slot writes, and row resets. The
compiled and CUDA-graph variants run the same step; they are checked on a GPU."""

import pytest
import torch

import memlm
from memlm.decode.static_memory import MemoryStaticDecoder, captured_per_segment, unsupported_reason
from tests.conftest import by_segments, tiny_overrides

SEQ = 16
VARIANTS = {
    "xl": ("seed-xl-tiny", {}),
    "xl lengths by depth, longer in evaluation": (
        "depth-xpos-knn-tiny", {"memory.xl.lengths": [8, 24], "memory.xl.eval_multiplier": 2.0,
                                "memory.knn.layers": [1], "position.rope_dim": 8}),
    "compressive": ("seed-compressive-tiny", {}),
    "seed-mem (feedback, span, compressive, persistent)": ("seed-mem-tiny", {}),
    "knn joint": ("seed-knn-tiny", {"memory.knn.layers": [1]}),
    "knn gate, rope": ("seed-knn-tiny", {"memory.knn.layers": [0], "memory.knn.combine": "gate",
                                         "position.kind": "rope"}),
    "ntm slots": ("seed-xl-tiny", {"memory.ntm.layers": [0, 1]}),
    "feedback add": ("seed-xl-tiny", {"memory.feedback.mode": "add"}),
    "feedback memory": ("seed-xl-tiny", {"memory.feedback.mode": "memory"}),
    "t5 bias per layer": ("seed-xl-tiny", {"position.kind": "t5", "position.t5_shared": False}),
    "sinusoidal": ("seed-xl-tiny", {"position.kind": "sinusoidal"}),
    "adaptive span": ("seed-xl-tiny", {"memory.adaptive_span.enabled": True}),
    "post-norm, multi-head": ("seed-xl-tiny", {"norm.placement": "post", "attention.kv_heads": 4}),
    "persistent, grouped heads": ("seed-xl-tiny", {"memory.persistent.vectors": 4, "attention.kv_heads": 2}),
}


def build(name):
    preset, extra = VARIANTS[name]
    return memlm.build(preset, **tiny_overrides(seq_len=SEQ, **extra)).eval()


def decode(decoder, ids, prompt, resets=None):
    """Logits (B, T - prompt + 1, V) of the decoder after the prompt and after each later token;
    resets: {position: mask} applied before the token at that position."""
    logits = [decoder.prefill(ids[:, :prompt])]
    for t in range(prompt, ids.shape[1]):
        if resets and t in resets:
            decoder.reset(resets[t])
        logits.append(decoder.step(ids[:, t:t + 1]).clone())
    return torch.stack(logits, dim=1)


def eager(model, ids, prompt, resets=None):
    """The same logits from the forward: the prompt in one call, then token by token."""
    out = model(ids[:, :prompt], state=model.init_state(ids.shape[0]))
    logits, state = [out.logits[:, -1]], out.state
    for t in range(prompt, ids.shape[1]):
        if resets and t in resets:
            state = state.reset(resets[t])
        out = model(ids[:, t:t + 1], state=state)
        logits.append(out.logits[:, -1])
        state = out.state
    return torch.stack(logits, dim=1), state


@pytest.mark.parametrize("name", list(VARIANTS))
def test_steps_equal_the_forward_by_segments(name):
    model = build(name)
    ids = torch.randint(0, 256, (2, 6 * SEQ))  # six segments: the memory rolls five times after the prompt's
    reference, _ = by_segments(model, ids, SEQ)
    got = decode(MemoryStaticDecoder(model, batch_size=2), ids, prompt=5)
    torch.testing.assert_close(got, reference[:, 4:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["seed-mem (feedback, span, compressive, persistent)", "knn joint", "ntm slots",
                                  "feedback add"])
def test_row_resets_equal_the_forward(name):
    """A row reset mid-segment and another at a segment boundary: the decoder forgets what the
    forward's State.reset forgets (row starts, feedback, kNN rows, slot memories)."""
    model = build(name)
    ids = torch.randint(0, 256, (3, 5 * SEQ))
    resets = {SEQ + 5: torch.tensor([True, False, False]), 3 * SEQ: torch.tensor([False, True, True])}
    reference, _ = eager(model, ids, 7, resets)
    got = decode(MemoryStaticDecoder(model, batch_size=3), ids, 7, resets)
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=0)


def test_state_is_the_forwards_state_and_a_long_prompt_prefills():
    """A prompt longer than a segment prefills through the forward; mid-segment, the decoder's
    State equals the forward's, and the forward continues from it as from its own."""
    model = build("compressive")
    ids = torch.randint(0, 256, (2, 5 * SEQ + 3))
    done = 4 * SEQ + 3
    decoder = MemoryStaticDecoder(model, batch_size=2)
    decode(decoder, ids[:, :done], prompt=SEQ + 4)
    _, reference = eager(model, ids[:, :done], SEQ + 4)
    state = decoder.state()
    assert state.position == reference.position == done
    for mine, theirs in zip(state.layers, reference.layers):
        assert mine.tensors().keys() == theirs.tensors().keys()
        assert mine.pending.shape[1] == (done - SEQ - 4) % SEQ == 15  # segments count from the prompt's end
        for key, tensor in theirs.tensors().items():
            torch.testing.assert_close(mine.tensors()[key], tensor, atol=1e-5, rtol=0)
    rest = ids[:, done:]
    torch.testing.assert_close(model(rest, state=state).logits, model(rest, state=reference).logits,
                               atol=1e-5, rtol=0)


def test_greedy_generation_through_the_static_memory_path():
    model = build("xl")
    prompt = torch.randint(0, 256, (2, 5))
    eager_ids = memlm.generate(model, prompt, 3 * SEQ, temperature=0, decode="eager")
    static_ids = memlm.generate(model, prompt, 3 * SEQ, temperature=0, decode="static")
    assert torch.equal(static_ids, eager_ids)


def assert_same_state(mine, theirs):
    """Position, masking, every layer's tensors and the kNN stores' contents to 1e-5."""
    a, b = mine.state_dict(), theirs.state_dict()
    assert (a["position"], a["masked"]) == (b["position"], b["masked"])
    assert a["tensors"].keys() == b["tensors"].keys() and a["stores"].keys() == b["stores"].keys()
    torch.testing.assert_close(a["tensors"], b["tensors"], atol=1e-5, rtol=0)
    torch.testing.assert_close(a["stores"], b["stores"], atol=1e-5, rtol=0)


def first_call(model, prompt):
    """A session's first call: its state after the prompt and 20 sampled tokens (eager; made anew
    for each use, since a kNN store in a State is written in place)."""
    torch.manual_seed(3)
    return memlm.generate(model, prompt, 20, temperature=0, decode="eager", return_state=True)[1]


@pytest.mark.parametrize("name", ["xl", "compressive", "seed-mem (feedback, span, compressive, persistent)",
                                  "knn joint", "ntm slots", "xl lengths by depth, longer in evaluation"])
def test_a_session_continues_through_the_static_path_as_through_the_forward(name):
    """generate(state=..., return_state=True) on the static path: the prompt continues the earlier
    stream's State (memory, pending segment, stores), the tokens equal the eager path's across
    memory rolls, and the returned State equals the eager one's (the last token run too)."""
    model = build(name)
    prompt, more = torch.randint(0, 256, (2, 5)), torch.randint(0, 256, (2, 3))
    runs = {}
    for decode in ("eager", "static"):
        state = first_call(model, prompt)
        ids, final = memlm.generate(model, more, 2 * SEQ + 3, temperature=0, state=state, return_state=True,
                                    decode=decode)
        runs[decode] = ids, final
    (eager_ids, eager_state), (static_ids, static_state) = runs["eager"], runs["static"]
    assert torch.equal(static_ids, eager_ids)
    assert static_state.position == eager_state.position == 5 + 20 + 3 + 2 * SEQ + 3
    assert_same_state(static_state, eager_state)
    check = torch.randint(0, 256, (2, SEQ + 2))  # the returned states read on alike
    torch.testing.assert_close(model(check, state=static_state).logits, model(check, state=eager_state).logits,
                               atol=1e-5, rtol=0)


def test_static_generation_without_new_tokens_returns_the_state_after_the_prompt():
    model = build("xl")
    prompt = torch.randint(0, 256, (1, 7))
    ids, state = memlm.generate(model, prompt, 0, state=first_call(model, prompt), return_state=True, decode="static")
    _, reference = memlm.generate(model, prompt, 0, state=first_call(model, prompt), return_state=True, decode="eager")
    assert torch.equal(ids, prompt) and state.position == reference.position == 7 + 20 + 7
    assert_same_state(state, reference)
    decoder = MemoryStaticDecoder(model, batch_size=2)
    with pytest.raises(ValueError, match="^the state holds 1 rows, the prompt has 2$"):
        decoder.prefill(torch.zeros(2, 3, dtype=torch.long), model.init_state(1))


def test_unsupported_models_and_errors():
    tokens = memlm.build("seed-xl-tiny", **tiny_overrides(seq_len=SEQ, **{"memory.tokens.count": 4}))
    assert "memory tokens" in unsupported_reason(tokens)
    with pytest.raises(ValueError, match="does not support"):
        MemoryStaticDecoder(tokens, batch_size=1)
    tupe = memlm.build("seed-xl-tiny", **tiny_overrides(seq_len=SEQ, **{"position.kind": "tupe"}))
    assert "TUPE" in unsupported_reason(tupe)
    assert "no recurrent memory" in unsupported_reason(memlm.build("seed-tiny", **tiny_overrides()))
    assert captured_per_segment(build("ntm slots")) and not captured_per_segment(build("knn joint"))
    assert not captured_per_segment(build("seed-mem (feedback, span, compressive, persistent)"))
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA model"):
        MemoryStaticDecoder(build("xl"), batch_size=1, graph=True)
    decoder = MemoryStaticDecoder(build("xl"), batch_size=2)
    with pytest.raises(RuntimeError, match="prefill"):
        decoder.step(torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="rows"):
        decoder.prefill(torch.zeros(1, 3, dtype=torch.long))


def test_a_knn_step_is_captured_once_across_rolls_and_again_for_other_stores():
    """An exact kNN store is written in place at every roll, so the decoder keeps its captured
    step (a stand-in marks it) across rolls and row resets, and captures again only when a State
    with other stores is loaded; slot memories capture again at every roll. The decoder's logits
    still equal the forward's (the eager step runs on the CPU)."""
    captured = object()
    model = build("knn joint")
    ids = torch.randint(0, 256, (2, 3 * SEQ))
    decoder = MemoryStaticDecoder(model, batch_size=2)
    decoder.prefill(ids[:, :5])
    decoder._cuda_graph = captured
    tensors = [t for store in decoder._host.stores.values() for t in store.tensors()]
    for t in range(5, 3 * SEQ):  # two rolls
        decoder.step(ids[:, t:t + 1])
    decoder.reset(torch.tensor([True, False]))
    assert decoder._cuda_graph is captured
    assert all(a is b for a, b in zip(tensors, [t for s in decoder._host.stores.values() for t in s.tensors()]))
    decoder.prefill(ids[:, :5])  # a new State: new stores
    assert decoder._cuda_graph is None

    slots = MemoryStaticDecoder(build("ntm slots"), batch_size=2)
    slots.prefill(ids[:, :5])
    slots._cuda_graph = captured
    for t in range(5, SEQ + 1):  # one roll
        slots.step(ids[:, t:t + 1])
    assert slots._cuda_graph is None
