"""LanguageModel.flops_per_token against torch.utils.flop_counter.FlopCounterMode, which counts the
matmuls (mm, addmm, bmm) of one training step, forward and backward, as they run. With the eager
attention kernel the scores and the values are plain matmuls, so the count is exactly what the
formula says for the mechanisms it counts at the dense-kernel rate; where a mechanism computes less
(no gradient reaches retrieved kNN pairs, fused attention without a query gradient) or runs what
the formula leaves out (the kNN search), the difference is spelled out and asserted."""

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import memlm
from memlm import flops

B, T = 2, 16
SHAPE = {"layers": 2, "width": 32, "seq_len": T, "attention.heads": 4, "attention.backend": "eager"}
HD = 32  # heads x head_dim at SHAPE


def build(preset, **overrides):
    return memlm.build(preset, **{**SHAPE, **overrides}).train()


def steps_to_fill(config) -> int:
    """Training steps after which every memory of `config` is full, so the next step is steady."""
    m = config.memory
    steps = 2  # a first write, then a read of it (NTM replays its pending write)
    steps += math.ceil(max(config.memory_lengths()) / config.seq_len)
    if m.compressive.rate:
        steps += math.ceil(m.compressive.length / (config.seq_len // m.compressive.rate))
    if m.knn.layers:
        steps += math.ceil(m.knn.capacity / config.seq_len)
    return steps


def step(model, state):
    """One training step on random tokens: forward, backward; the next (detached) state."""
    x, y = torch.randint(0, 256, (B, T)), torch.randint(0, 256, (B, T))
    out = model(x, targets=y, state=state)
    (out.loss + out.aux_loss).backward()
    model.zero_grad(set_to_none=True)
    return out.state.detach() if state is not None else None


def counted_flops_per_token(model) -> float:
    """FlopCounterMode's FLOPs per token of one training step with every memory full (streams carry
    a state as `memlm train` does; models without recurrent state train without one)."""
    c = model.config
    state = model.init_state(B) if c.stateful else None
    for _ in range(steps_to_fill(c)):
        state = step(model, state)
    if state is not None:  # the memory is full: the counted step is the steady one
        for length, layer in zip(c.memory_lengths(), state.layers, strict=True):
            assert (layer.mem.shape[1] if layer.mem is not None else 0) == length
            if c.memory.compressive.rate:
                assert layer.cmem.shape[1] == c.memory.compressive.length
        for store in state.stores.values():
            assert store.filled == c.memory.knn.capacity
    counter = FlopCounterMode(display=False)
    with counter:
        step(model, state)
    return counter.get_total_flops() / (B * T)


EXACT = {
    "seed": ("seed-tiny", {}),
    "vanilla (biases, GELU, multi-head)": ("vanilla-tiny", {}),
    "XL, memory = segment": ("seed-xl-tiny", {"memory.xl.length": T}),
    "XL, memory not a multiple of the segment": ("seed-xl-tiny", {"memory.xl.length": 40}),
    "XL, per-layer lengths": ("seed-xl-top-tiny", {"memory.xl.lengths": [8, 32]}),
    "XL, linear schedule": ("seed-xl-tiny", {"memory.xl.schedule": "linear", "memory.xl.min_length": 8,
                                             "memory.xl.length": 24}),
    "XL, post-norm": ("seed-xl-tiny", {"memory.xl.length": T, "norm.placement": "post"}),
    "XL, grouped heads, feedback into memory": ("seed-xl-tiny", {"memory.xl.length": T, "attention.kv_heads": 2,
                                                                 "memory.feedback.mode": "memory"}),
    "XL, additive feedback": ("seed-xl-tiny", {"memory.xl.length": T, "memory.feedback.mode": "add"}),
    "XL, adaptive span": ("seed-xl-tiny", {"memory.xl.length": T, "memory.adaptive_span.enabled": True}),
    "persistent vectors": ("seed-tiny", {"memory.persistent.vectors": 4}),
    "memory tokens": ("seed-tiny", {"memory.tokens.count": 3}),
    "recurrent memory tokens": ("seed-tiny", {"memory.tokens.count": 3, "memory.tokens.recurrent": True}),
    "XL + recurrent memory tokens": ("seed-xl-tiny", {"memory.xl.length": T, "memory.tokens.count": 3,
                                                      "memory.tokens.recurrent": True}),
    "compressive, max": ("seed-compressive-tiny", {"memory.xl.length": T, "memory.compressive.length": 4,
                                                   "memory.compressive.fn": "max"}),
    "compressive, most_used": ("seed-compressive-tiny", {"memory.xl.length": T, "memory.compressive.length": 4,
                                                         "memory.compressive.fn": "most_used"}),
    "compressive, mean": ("seed-compressive-tiny", {"memory.xl.length": T, "memory.compressive.length": 4,
                                                    "memory.compressive.fn": "mean"}),
    "compressive, most_used, a rate that does not divide the segment": (
        "seed-compressive-tiny", {"memory.xl.length": T, "memory.compressive.rate": 3,
                                  "memory.compressive.length": 5, "memory.compressive.fn": "most_used"}),
    "XL with a compressed length but no compression": ("seed-xl-tiny", {"memory.xl.length": T,
                                                                        "memory.compressive.length": 4}),
    "NTM slots": ("seed-tiny", {"memory.ntm.layers": [1], "memory.ntm.slots": 4}),
}


@pytest.mark.parametrize("case", list(EXACT))
def test_the_formula_is_the_counted_training_step(case):
    preset, overrides = EXACT[case]
    model = build(preset, **overrides)
    assert counted_flops_per_token(model) == pytest.approx(model.flops_per_token(), rel=1e-9)


@pytest.mark.parametrize("preset", ["seed-compressive-tiny", "seed-mem-tiny"])
def test_compressive_conv_is_counted_but_for_the_query_gradient_its_content_attention_skips(preset):
    """The reconstruction loss's content attention (F.scaled_dot_product_attention, seen by the
    counter through the math kernel) over the compressed slots has no query gradient: 10, not 12,
    x heads x head_dim per query and slot, 2 less per slot for each of the segment's queries."""
    model = build(preset, **{"memory.xl.length": T, "memory.compressive.length": 4})
    c = model.config
    slots = T // c.memory.compressive.rate
    with sdpa_kernel([SDPBackend.MATH]):
        counted = counted_flops_per_token(model)
    assert counted == pytest.approx(model.flops_per_token() - 2 * HD * slots * c.layers, rel=1e-9)


@pytest.mark.parametrize("preset,overrides", [
    ("seed-knn-tiny", {"layers": 4}),
    ("seed-knn-tiny", {"layers": 4, "memory.knn.combine": "joint"}),
    ("seed-knn-tiny", {"layers": 4, "memory.knn.straight_through": True}),
    ("depth-xpos-knn-tiny", {"layers": 4, "memory.xl.lengths": [16, 16, 64, 64], "position.rope_dim": 4}),
    ("seed-knn-tiny", {"layers": 4, "memory.knn.layers": [1, 3]}),
])
def test_knn_adds_the_search_and_counts_retrieved_pairs_as_keys(preset, overrides):
    """Each kNN query also runs the exact search over its row's full store (`search_flops_per_token`,
    outside the formula), and no gradient reaches the retrieved keys and values unless
    straight_through: 8, not 12, x heads x head_dim per retrieved pair."""
    model = build(preset, **{**overrides, "memory.knn.capacity": 4 * T, "memory.knn.k": 4})
    knn = model.config.memory.knn
    layers = len(knn.layers)
    unused_gradients = 0 if knn.straight_through else 4 * HD * knn.k * layers
    expected = model.flops_per_token() - unused_gradients + flops.search_flops_per_token(model)
    assert counted_flops_per_token(model) == pytest.approx(expected, rel=1e-9)
    assert flops.search_flops_per_token(model) == 2 * HD * 4 * T * layers


def test_attended_keys_add_each_memory_to_the_segment():
    layers = SHAPE["layers"]
    assert flops.attended_keys_by_layer(build("seed-tiny")) == [T, T]
    assert flops.attended_keys_by_layer(build("seed-xl-top-tiny", **{"memory.xl.lengths": [8, 32]})) == [T + 8, T + 32]
    mem = build("seed-mem-tiny", **{"memory.xl.length": T, "memory.compressive.length": 4})
    assert flops.attended_keys_by_layer(mem) == [T + T + 4 + 16] * layers  # XL, compressed, 16 persistent
    tokens = build("seed-xl-tiny", **{"memory.xl.length": 8, "memory.tokens.count": 3, "memory.tokens.recurrent": True})
    assert flops.segment_positions(tokens) == 3 + T + 3
    assert flops.attended_keys_by_layer(tokens) == [8 + 3 + T + 3] * layers
    knn = build("seed-knn-tiny", layers=4, **{"memory.knn.k": 5, "memory.ntm.layers": [0], "memory.ntm.slots": 6})
    assert flops.attended_keys_by_layer(knn) == [T + 6, T, T + 5, T]


def test_an_explicit_context_keeps_the_dense_count_of_a_model_without_memory():
    seed, xl = build("seed-tiny"), build("seed-xl-tiny", **{"memory.xl.length": T})
    assert seed.flops_per_token() == seed.flops_per_token(T)  # no memory: one count
    assert xl.flops_per_token(T) == seed.flops_per_token(T)  # the same weights, memory ignored
    assert xl.flops_per_token(2 * T) - xl.flops_per_token(T) == 12 * SHAPE["layers"] * HD * T
    assert xl.flops_per_token() > xl.flops_per_token(T)
    assert xl.estimate_mfu(1000.0, xl.flops_per_token() * 1000.0) == pytest.approx(1.0)


def test_the_count_needs_no_weights_on_a_device():
    with torch.device("meta"):
        model = memlm.build("seed-xl-tiny")
    assert model.flops_per_token() == memlm.build("seed-xl-tiny").flops_per_token()
