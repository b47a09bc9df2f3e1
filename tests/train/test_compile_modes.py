"""torch.compile modes for training (memlm.compile_modes): what the CUDA-graph modes ask of a
loop (a step marked as new, the carried state copied out of the replayed graph's memory), in
the Trainer and the bench. CUDA graphs themselves run on a GPU only; here torch.compile and the
step mark are stand-ins that record their calls, and the copies are checked by storage."""

from __future__ import annotations

import pytest
import torch

import memlm
from memlm import compile_modes
from memlm.config import ConfigError
from memlm.train import Trainer, distributed
from memlm_bench.measure import measure_training
from memlm_bench.peers import RecurrentObjective
from memlm_bench.workloads import Shape, StreamObjective, Workload
from tests.train.train_helpers import fast_config, tiny_model


def storages(state) -> set[int]:
    """Data pointers of a State's own tensors (row start and every layer's)."""
    pointers = {state.row_start.data_ptr()}
    for layer in state.layers:
        pointers |= {t.data_ptr() for t in layer.tensors().values()}
    return pointers


def xl_state():
    model = memlm.build("seed-xl-tiny", layers=2, width=32, seq_len=16, **{"attention.heads": 2}).eval()
    state = model.init_state(2)
    with torch.no_grad():
        state = model(torch.randint(0, 257, (2, 16)), state=state).state
    return state


@pytest.mark.parametrize("mode", compile_modes.COMPILE_MODES)
def test_keep_copies_a_state_out_in_the_graph_modes_only(mode):
    state = xl_state()
    assert state.layers[0].tensors(), "the XL state must hold memory for this test to mean anything"
    store = object()
    state.stores = {0: store}
    kept = compile_modes.keep(state, mode)
    graphs = mode in ("reduce-overhead", "max-autotune")
    assert compile_modes.uses_cuda_graphs(mode) == graphs
    shared = storages(kept) & storages(state)
    assert (not shared) if graphs else shared == storages(state)
    assert kept.stores[0] is store  # kNN stores are written in place: never copied
    assert kept.position == state.position
    for mine, theirs in zip(kept.layers, state.layers):
        for name, t in theirs.tensors().items():
            assert torch.equal(mine.tensors()[name], t)


def test_keep_copies_a_peers_memory_list_in_the_graph_modes():
    memory = [torch.randn(2, 3), None, torch.randn(4)]
    copied = compile_modes.keep(memory, "reduce-overhead")
    same = compile_modes.keep(memory, "default")
    assert copied[1] is None and all(torch.equal(a, b) for a, b in zip(copied[::2], memory[::2]))
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(copied[::2], memory[::2]))
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(same[::2], memory[::2]))


def test_begin_step_marks_a_new_step_in_the_graph_modes_only(monkeypatch):
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    for mode in compile_modes.COMPILE_MODES:
        compile_modes.begin_step(mode)
    assert len(marks) == 2  # reduce-overhead and max-autotune
    with pytest.raises(ValueError, match="allowed: default, reduce-overhead"):
        compile_modes.begin_step("fast")


def recording_compile(calls: list):
    """A stand-in for torch.compile: records the mode, returns the module as it is."""

    def compile(module, mode=None, **kwargs):
        calls.append(mode)
        return module

    return compile


def recording_states(forward, returned: list):
    """forward, appending the State each call returns to `returned`."""

    def recording(*args, **kwargs):
        out = forward(*args, **kwargs)
        returned.append(out.state)
        return out

    return recording


def test_train_config_names_the_allowed_compile_modes(tmp_path):
    with pytest.raises(ConfigError, match="compile_mode.*allowed: default, reduce-overhead"):
        fast_config(tmp_path, tmp_path / "run", compile_mode="fast").validate()


def test_trainer_compiles_in_its_mode_and_copies_the_state_it_carries(corpus, tmp_path, monkeypatch):
    """reduce-overhead: the model compiled in that mode, every forward (warm-up passes and steps)
    marked as a new step, and the state carried to the next step a copy of the one the forward
    returned (a replay would overwrite it), equal to it; the run trains as in the default mode."""
    calls, marks = [], []
    monkeypatch.setattr(torch, "compile", recording_compile(calls))
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    model = tiny_model().replace(**{"memory.xl.length": 32})
    losses = {}
    for mode in ("default", "reduce-overhead"):
        torch.manual_seed(0)
        trainer = Trainer(model, fast_config(corpus, tmp_path / mode, steps=3, eval_every=3, compile=True,
                                             compile_mode=mode), distributed.setup("cpu"))
        returned = []
        trainer.train_model = recording_states(trainer.train_model, returned)
        losses[mode] = [trainer.train_step()[0].item() for _ in range(3)]
        carried = storages(trainer.state)
        assert torch.equal(trainer.state.layers[0].mem, returned[-1].layers[0].mem)
        if mode == "default":
            assert carried == storages(returned[-1])
        else:
            assert not carried & storages(returned[-1])
    assert calls == [None, "reduce-overhead"]
    assert len(marks) == 3  # one a step, in the graph mode only
    assert losses["default"] == losses["reduce-overhead"]


def test_bench_training_in_a_graph_mode_marks_steps_and_keeps_outputs(monkeypatch):
    """measure_training: the objective compiled in the mode, a StreamObjective compiling its
    model in the same mode and copying its state out; a peer's objective keeps its outputs
    after every step (warm-up, timed and the first)."""
    calls, marks = [], []
    monkeypatch.setattr(torch, "compile", recording_compile(calls))
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # as under the objective's compile
    config = memlm.config.resolve("seed-xl-tiny", layers=2, width=32, seq_len=16, **{"attention.heads": 2})
    model = memlm.LanguageModel(config)
    shape = Shape.of(config, batch_size=2)
    objective = StreamObjective(model, model.init_state(2))
    returned = []
    model.forward = recording_states(model.forward, returned)
    measure_training(Workload(objective, 1.0, 1), shape, steps=2, warmup=2, repeats=1, compile=True,
                     device=torch.device("cpu"), seed=0, compile_mode="reduce-overhead")
    assert calls == ["reduce-overhead", "reduce-overhead"]  # the objective, then its model
    assert len(marks) == 1 + 1 + 2  # the first step, the other warm-up step, the timed ones
    assert not storages(objective.state) & storages(returned[-1])

    kept = []
    peer = RecurrentObjective(torch.nn.Linear(1, 1), lambda m, x, y, memory: (m.weight.sum() * 0 + x.float().mean(),
                                                                              [x.float()]))
    peer.keep_outputs = lambda mode: kept.append(mode)
    measure_training(Workload(peer, 1.0, 1), shape, steps=2, warmup=2, repeats=1, compile=True,
                     device=torch.device("cpu"), seed=0, compile_mode="reduce-overhead")
    assert kept == ["reduce-overhead"] * 4


def test_keep_detaches_any_state_by_its_own_methods_and_copies_only_in_the_graph_modes():
    """An object with detach (a peer's state) is detached in the default mode, cloned in a graph
    mode, and one without clone cannot be carried across replays."""
    from memlm_bench.adapters import PeerState

    mems = [torch.randn(2, 3, 4, requires_grad=True) * 2]
    state = PeerState(position=3, rows=2, mems=mems)
    detached = compile_modes.keep(state, "default")
    assert not detached.mems[0].requires_grad and detached.mems[0].data_ptr() == mems[0].data_ptr()
    copied = compile_modes.keep(state, "reduce-overhead")
    assert not copied.mems[0].requires_grad and copied.mems[0].data_ptr() != mems[0].data_ptr()
    assert torch.equal(copied.mems[0], mems[0]) and copied.position == 3

    class DetachOnly:
        def detach(self):
            return "detached"

    assert compile_modes.keep(DetachOnly(), "default") == "detached"
    with pytest.raises(TypeError, match="DetachOnly has no clone"):
        compile_modes.keep(DetachOnly(), "max-autotune")
