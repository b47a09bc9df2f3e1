"""State (memlm.state): construction, detach/to, reset, the checkpoint round trip, and the
recompile limit for compiled models with memory."""

import dataclasses
import re

import pytest
import torch

import memlm

from memlm.state import (MEMORY_RECOMPILE_LIMIT, LayerState, State, allow_memory_recompiles, cleared_on_reset,
                         register_extension_state, slot)
from memlm.memory.knn.stores import make_store


def filled_store(rows: int, shared: bool = False):
    """An exact kNN store with 3 entries written in every row."""
    store = make_store("exact", rows=rows, heads=1, dim=4, capacity=8, shared=shared)
    if shared:
        store.shared = False  # fill it as a per-row store, then make it read-only
    store.write(torch.randn(rows, 1, 3, 4), torch.randn(rows, 1, 3, 4), torch.arange(3))
    store.shared = shared
    return store


def sample_state(requires_grad: bool = False) -> State:
    """Two layers, batch 3, with position-keyed tensors and the per-row tensors reset must clear."""
    def t(*shape):
        return torch.randn(*shape, requires_grad=requires_grad) * 1.0  # non-leaf when requires_grad
    layers = [LayerState(mem=t(3, 5, 4), feedback=t(3, 2, 4), memory_tokens=t(3, 2, 4),
                         memory_written=torch.tensor([True, True, False])),
              LayerState(k=t(3, 2, 6, 4), v=t(3, 2, 6, 4), feedback=t(3, 2, 4))]
    return State(position=12, row_start=torch.tensor([0, 4, 8]), layers=layers, masked=False,
                 stores={1: filled_store(3)})


def assert_same_tensors(a: State, b: State):
    assert a.position == b.position and a.masked == b.masked
    assert torch.equal(a.row_start, b.row_start)
    assert [sorted(layer.tensors()) for layer in a.layers] == [sorted(layer.tensors()) for layer in b.layers]
    for la, lb in zip(a.layers, b.layers):
        other = lb.tensors()
        for name, t in la.tensors().items():
            assert t.dtype == other[name].dtype and torch.equal(t, other[name]), name


def test_allow_memory_recompiles_raises_the_limit_and_never_lowers_it():
    config = torch._dynamo.config
    assert MEMORY_RECOMPILE_LIMIT > 8  # more than dynamo's default: a memory model compiles up to 7 graphs filling
    with config.patch(recompile_limit=8):
        allow_memory_recompiles()
        assert config.recompile_limit == max(8, MEMORY_RECOMPILE_LIMIT)
    with config.patch(recompile_limit=MEMORY_RECOMPILE_LIMIT + 100):
        allow_memory_recompiles()
        assert config.recompile_limit == MEMORY_RECOMPILE_LIMIT + 100


def test_empty_state():
    state = State.empty(batch_size=3, num_layers=2)
    assert state.position == 0 and state.batch_size == 3 and not state.masked and state.stores == {}
    assert state.row_start.dtype == torch.long and state.row_start.tolist() == [0, 0, 0]
    assert state.layers == [LayerState(), LayerState()] and state.layers[0].tensors() == {}
    state.layers[0].k = torch.zeros(1)
    assert state.layers[1].tensors() == {}  # one LayerState per layer
    on_meta = State.empty(batch_size=2, num_layers=1, device="meta")
    assert on_meta.row_start.device.type == "meta" and on_meta.row_start.dtype == torch.long
    assert on_meta.batch_size == 2


def test_detach_keeps_values_and_cuts_the_history():
    state = sample_state(requires_grad=True)
    state.masked = True
    detached = state.detach()
    assert_same_tensors(detached, state)
    assert detached.stores is state.stores  # external memory is shared, not copied
    for layer in detached.layers:
        for t in layer.tensors().values():
            assert t.grad_fn is None and not t.requires_grad
    assert state.layers[0].mem.grad_fn is not None  # the original keeps its history


@pytest.mark.parametrize("masked", [False, True])
def test_to_moves_every_tensor_and_keeps_the_rest(masked):
    state = sample_state()
    state.masked = masked
    moved = state.to("meta")
    assert moved.position == 12 and moved.masked == masked and moved.stores is state.stores
    assert moved.row_start.device.type == "meta" and moved.row_start.dtype == torch.long
    assert [sorted(layer.tensors()) for layer in moved.layers] == [sorted(layer.tensors()) for layer in state.layers]
    for layer, original in zip(moved.layers, state.layers):
        for name, t in layer.tensors().items():
            want = getattr(original, name)
            assert t.device.type == "meta" and t.shape == want.shape and t.dtype == want.dtype
    assert state.row_start.device.type == "cpu"


def test_reset_moves_row_start_and_clears_exactly_the_forgotten_rows():
    state = sample_state()
    before = {(i, name): t.clone() for i, layer in enumerate(state.layers) for name, t in layer.tensors().items()}
    mask = torch.tensor([True, False, True])
    out = state.reset(mask)
    assert out.position == state.position and out.masked
    assert out.row_start.tolist() == [12 if forget else start for forget, start in zip(mask.tolist(), [0, 4, 8])]
    for i, layer in enumerate(out.layers):
        assert sorted(layer.tensors()) == sorted(state.layers[i].tensors())
        for name, t in layer.tensors().items():
            old = before[(i, name)]
            assert t.dtype == old.dtype and t.shape == old.shape, name
            for b, forget in enumerate(mask.tolist()):
                if name in cleared_on_reset() and forget:
                    assert not t[b].any(), (i, name, b)  # zeros, False for bool
                else:
                    assert torch.equal(t[b], old[b]), (i, name, b)
    # the state reset from is left as it was
    assert state.row_start.tolist() == [0, 4, 8] and not state.masked
    for (i, name), old in before.items():
        assert torch.equal(getattr(state.layers[i], name), old)


def test_reset_keeps_bool_and_low_precision_dtypes():
    state = State(4, torch.zeros(2, dtype=torch.long),
                  [LayerState(memory_written=torch.tensor([True, True]),
                              feedback=torch.full((2, 3, 2), 1.5, dtype=torch.bfloat16),
                              memory_tokens=torch.full((2, 2, 2), 2.0, dtype=torch.float64))])
    out = state.reset(torch.tensor([False, True]))
    layer = out.layers[0]
    assert layer.memory_written.dtype == torch.bool and layer.memory_written.tolist() == [True, False]
    assert layer.feedback.dtype == torch.bfloat16 and layer.memory_tokens.dtype == torch.float64
    assert layer.feedback[0].eq(1.5).all() and layer.feedback[1].eq(0).all()
    assert layer.memory_tokens[0].eq(2.0).all() and layer.memory_tokens[1].eq(0).all()


def test_reset_takes_a_mask_from_another_device():
    """A mask on the CPU resets a state whose tensors live elsewhere (meta stands for an accelerator),
    also when the layer tensors are not on row_start's device."""
    state = sample_state().to("meta")
    state.stores = {}  # a store cannot read a meta mask
    out = state.reset(torch.tensor([True, False, False]))
    assert out.row_start.device.type == "meta"
    assert all(t.device.type == "meta" for layer in out.layers for t in layer.tensors().values())
    mixed = State(3, torch.zeros(2, dtype=torch.long), [LayerState(feedback=torch.zeros(2, 4, 3, device="meta"))])
    out = mixed.reset(torch.tensor([True, False]))
    assert out.row_start.tolist() == [3, 0]
    assert out.layers[0].feedback.device.type == "meta" and out.layers[0].feedback.shape == (2, 4, 3)


@pytest.mark.parametrize("shape", [(2,), (4,), (3, 1)])
def test_reset_rejects_a_mask_of_the_wrong_shape(shape):
    with pytest.raises(ValueError, match=re.escape(f"reset mask must have shape (3,), got {shape}")):
        sample_state().reset(torch.zeros(shape, dtype=torch.bool))


def test_reset_clears_the_rows_of_per_row_stores_only():
    state = sample_state()
    knowledge = filled_store(1, shared=True)
    state.stores[0] = knowledge
    own = state.stores[1]
    own_before, knowledge_before = own.written.clone(), knowledge.written.clone()
    mask = torch.tensor([False, True, False])
    out = state.reset(mask)
    assert out.stores is state.stores
    assert own.written.tolist() == [0 if forget else w for forget, w in zip(mask.tolist(), own_before.tolist())]
    assert (own.positions[1] == -1).all() and (own.positions[0] >= 0).sum() == 3
    assert torch.equal(knowledge.written, knowledge_before)


def test_state_dict_round_trip():
    state = sample_state().reset(torch.tensor([False, True, False]))  # masked, row_start moved
    state.layers.append(LayerState())  # a layer without tensors still counts
    state.stores[0] = filled_store(1, shared=True)
    data = state.state_dict()
    assert data["position"] == 12 and data["num_layers"] == 3 and data["masked"] is True
    expected_keys = {"row_start"} | {f"layers.{i}.{name}" for i, layer in enumerate(state.layers)
                                     for name in layer.tensors()}
    assert set(data["tensors"]) == expected_keys
    assert data["tensors"]["row_start"] is state.row_start
    assert data["tensors"]["layers.1.k"] is state.layers[1].k
    # per-row stores by layer; the shared knowledge store is never checkpointed
    assert set(data["stores"]) == {1}
    own = state.stores[1].state_dict()
    assert set(data["stores"][1]) == set(own) and all(torch.equal(data["stores"][1][k], own[k]) for k in own)

    loaded = State.from_state_dict(data)
    assert_same_tensors(loaded, state)
    assert loaded.batch_size == 3

    unmasked = sample_state()
    assert_same_tensors(State.from_state_dict(unmasked.state_dict()), unmasked)


def test_a_checkpoint_without_the_masked_flag_loads_as_masked():
    """Older checkpoints did not record `masked`: assume some row was reset, so row_start is applied."""
    data = sample_state().state_dict()
    del data["masked"]
    assert State.from_state_dict(data).masked is True


def test_reset_clears_the_per_row_fields_without_positions_and_only_those():
    """Fields keyed by stream position are hidden by row_start; the others must be cleared. Each
    LayerState field declares which it is; this is the list the mechanisms rely on."""
    assert set(cleared_on_reset()) == {"feedback", "memory_tokens", "memory_written"}
    assert set(LayerState().__dataclass_fields__) - set(cleared_on_reset()) - {"extensions"} == {
        "k", "v", "mem", "pending", "top", "cmem", "external", "read"}


@dataclasses.dataclass
class ProbeState:
    """An extension state as a registry mechanism declares it (memlm.memory.ntm does the same)."""
    kept: torch.Tensor | None = slot("probe", "(B, 2) keyed by position")
    cleared: torch.Tensor | None = slot("probe", "(B, 3) per row", clear_on_reset=True)


register_extension_state("probe", ProbeState)


def probe_state(requires_grad: bool = False) -> State:
    state = sample_state(requires_grad)
    state.layers[1].extensions = {"probe": ProbeState(kept=torch.randn(3, 2, requires_grad=requires_grad) * 1.0,
                                                      cleared=torch.randn(3, 3, requires_grad=requires_grad) * 1.0)}
    return state


def test_every_state_field_declares_its_owner_and_shape():
    for cls in (LayerState, ProbeState):
        for f in dataclasses.fields(cls):
            if f.name != "extensions":
                assert f.default is None and set(f.metadata) == {"owner", "shape", "clear_on_reset"}, f.name
    assert dataclasses.fields(ProbeState)[0].metadata["owner"] == "probe"
    assert dataclasses.fields(ProbeState)[1].metadata["shape"] == "(B, 3) per row"


def test_extension_states_are_named_detached_moved_reset_and_checkpointed():
    state = probe_state(requires_grad=True)
    probe = state.layers[1].extensions["probe"]
    assert set(state.layers[1].tensors()) == {"k", "v", "feedback", "probe.kept", "probe.cleared"}
    assert state.layers[1].tensors()["probe.cleared"] is probe.cleared
    detached = state.detach().layers[1].extensions["probe"]
    assert isinstance(detached, ProbeState) and detached.cleared.grad_fn is None
    assert torch.equal(detached.kept, probe.kept) and probe.kept.grad_fn is not None
    assert state.to("meta").layers[1].extensions["probe"].cleared.device.type == "meta"
    mask = torch.tensor([True, False, True])
    reset = state.reset(mask).layers[1].extensions["probe"]
    assert torch.equal(reset.kept, probe.kept)  # keyed by position: row_start hides it
    assert not reset.cleared[0].any() and not reset.cleared[2].any() and torch.equal(reset.cleared[1], probe.cleared[1])
    data = state.detach().state_dict()
    assert {"layers.1.probe.kept", "layers.1.probe.cleared"} <= set(data["tensors"])
    loaded = State.from_state_dict(data)
    assert_same_tensors(loaded, state.detach())
    assert isinstance(loaded.layers[1].extensions["probe"], ProbeState)
    data["tensors"]["layers.0.nobody.x"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unknown memory mechanisms \['nobody'\]"):
        State.from_state_dict(data)


def test_advancing_keeps_rows_mask_flag_and_stores():
    state = sample_state().reset(torch.tensor([False, True, False]))
    later = state.advanced(5, state.layers)
    assert later.position == state.position + 5 and later.masked is True and later.stores is state.stores
    assert later.row_start is state.row_start


# ----- stacking States of separate streams into one batch (the server's cross-client batching) --

STACKED_MODELS = {
    "plain (key/value cache)": ("seed-tiny", {}),
    "xl": ("seed-xl-tiny", {}),
    "seed-mem (feedback, span, compressive, persistent)": ("seed-mem-tiny", {}),
    "memory tokens, recurrent": ("seed-xl-tiny", {"memory.tokens.count": 2, "memory.tokens.recurrent": True}),
    "ntm slots": ("seed-xl-tiny", {"memory.ntm.layers": [0, 1]}),
    "feedback add": ("seed-xl-tiny", {"memory.feedback.mode": "add"}),
}


@pytest.mark.parametrize("name", list(STACKED_MODELS))
def test_stacked_states_give_each_row_what_its_own_state_gives(name):
    """Three streams read separately to one position (a reset in one), stacked with State.cat, read
    on in one batch (across a memory roll) and split with State.rows: logits and States equal the
    three read on alone."""
    import memlm
    from tests.conftest import tiny_overrides
    preset, extra = STACKED_MODELS[name]
    model = memlm.build(preset, **tiny_overrides(seq_len=8, **extra)).eval()
    ids = torch.randint(0, 256, (3, 29))
    with torch.no_grad():
        alone = []
        for b in range(3):
            state = model.init_state(1)
            state = model(ids[b:b + 1, :13], state=state).state
            if b == 1:
                state = state.reset(torch.tensor([True]))  # a row that started a new document
            alone.append(state)
        keys = {state.batch_key() for state in alone}
        assert len(keys) == 1 and None not in keys
        stacked = State.cat(alone)
        assert stacked.batch_size == 3 and stacked.masked
        together = model(ids[:, 13:], state=stacked)
        for b, (row, state) in enumerate(zip(together.state.rows(), alone)):
            out = model(ids[b:b + 1, 13:], state=state)
            torch.testing.assert_close(together.logits[b:b + 1], out.logits, atol=1e-5, rtol=0)
            assert row.position == out.state.position == 29
            assert torch.equal(row.row_start, out.state.row_start)
            for mine, theirs in zip(row.layers, out.state.layers):
                assert mine.tensors().keys() == theirs.tensors().keys()
                for key, tensor in theirs.tensors().items():
                    torch.testing.assert_close(mine.tensors()[key], tensor, atol=1e-5, rtol=0, msg=key)


def test_states_at_other_positions_or_with_knn_stores_are_not_stacked():
    a, b = State.empty(1, 2), State.empty(1, 2)
    assert a.batch_key() == b.batch_key()
    assert State.cat([a, b]).batch_size == 2 and [s.batch_size for s in State.cat([a, b]).rows()] == [1, 1]
    one = sample_state()
    one.stores = {}
    assert_same_tensors(State.cat([one]), one)  # a batch of one is itself
    later = a.advanced(1, a.layers)
    assert later.batch_key() != a.batch_key()
    with pytest.raises(ValueError, match="^only States at one position with the same tensors and no kNN stores can"):
        State.cat([a, later])
    wider = State(0, torch.zeros(1, dtype=torch.long), [LayerState(mem=torch.zeros(1, 4, 8)), LayerState()])
    narrower = State(0, torch.zeros(1, dtype=torch.long), [LayerState(mem=torch.zeros(1, 2, 8)), LayerState()])
    assert wider.batch_key() != narrower.batch_key()
    with_store = sample_state()
    assert with_store.batch_key() is None
    with pytest.raises(ValueError, match="^a State with kNN stores cannot be split into rows$"):
        with_store.rows()


def _compiled_memory_shapes(mark_static: bool) -> list[bool]:
    """Per graph dynamo builds while an XL memory of 3 segments fills and then rolls: whether
    any of its tensor inputs has a symbolic size (a graph for any memory length)."""
    graphs = []

    def record(gm, example_inputs):
        values = [node.meta.get("example_value") for node in gm.graph.nodes if node.op == "placeholder"]
        graphs.append(any(isinstance(size, torch.SymInt) for t in values if isinstance(t, torch.Tensor)
                          for size in t.shape))
        return gm.forward

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = memlm.build("seed-xl-tiny", layers=1, width=32, seq_len=8, **{"attention.heads": 2,
                                                                         "memory.xl.length": 24})
    compiled = torch.compile(model, backend=record)
    state = model.init_state(2)
    for _ in range(6):
        if mark_static:
            state.mark_static()
        state = compiled(torch.randint(0, 256, (2, 8)), state=state).state.detach()
    torch._dynamo.reset()
    return graphs


def test_mark_static_keeps_a_filling_memory_out_of_symbolic_shapes():
    assert any(_compiled_memory_shapes(mark_static=False))  # dynamo's default: the length goes symbolic
    marked = _compiled_memory_shapes(mark_static=True)
    assert len(marked) >= 4 and not any(marked)  # one static graph per memory length (0, 8, 16, 24)
