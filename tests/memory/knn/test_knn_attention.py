"""kNN memory (Memorizing Transformers): the layer around the external store."""

import sys

import pytest
import torch

import memlm
from memlm.memory.knn import KnnAttention
from memlm.memory.knn.stores import make_store
from tests.conftest import by_segments, tiny_overrides


def under_mutation_testing():
    """True when memlm runs trampolined by mutmut (scripts/mutate.py): its wrappers read os.environ
    at every call, which dynamo guards on and recompiles for, so compile counts mean nothing there."""
    return "mutmut.mutation.trampoline" in sys.modules


def build(**extra):
    base = tiny_overrides(layers=2, seq_len=8, **{"memory.knn.layers": [1], "memory.knn.k": 4,
                                                  "memory.knn.capacity": 64})
    base.update(extra)
    return memlm.build("seed-tiny", **base).eval()


@pytest.mark.parametrize("gate", [-1e4, 3.0])
def test_an_empty_store_leaves_local_attention_whatever_the_gate(gate):
    """A query that retrieves nothing takes its local result alone, even with the gate open
    (the paper's gate would scale it by 1 - g)."""
    torch.manual_seed(0)
    plain = memlm.build("seed-tiny", **tiny_overrides(layers=2, seq_len=8)).eval()
    for combine in ("gate", "joint"):
        model = build(**{"memory.knn.combine": combine})
        model.load_state_dict(plain.state_dict(), strict=False)
        if combine == "gate":
            with torch.no_grad():
                model.blocks[1].attention.knn.gate.fill_(gate)
        ids = torch.randint(0, 256, (2, 8))
        torch.testing.assert_close(model(ids, state=model.init_state(2)).logits, plain(ids).logits,
                                   atol=1e-5, rtol=0)
        if combine == "gate" and gate > 0:  # once the store holds the first segment, the open gate mixes it in
            _, state = by_segments(model, ids, 8)
            assert not torch.allclose(model(ids, state=state).logits, plain(ids).logits, atol=1e-3)


def test_segments_are_written_and_read_back():
    model = build()
    state = model.init_state(2)
    store = state.stores[1]
    ids = torch.randint(0, 256, (2, 24))
    logits, state = by_segments(model, ids, 8, state)
    assert state.stores[1] is store
    # three completed segments of 8 positions per row and key/value head
    keys, values, scores, valid = store.search(torch.nn.functional.normalize(torch.randn(2, 4, 1, 8), dim=-1), 64)
    assert valid.sum(-1).flatten().tolist() == [24] * 8
    # token-by-token decoding reads exactly what segment-by-segment processing reads
    fresh = build()
    fresh.load_state_dict(model.state_dict())
    tokens, _ = by_segments(fresh, ids, 1)
    torch.testing.assert_close(tokens, logits, atol=1e-5, rtol=0)


def test_retrieved_memory_changes_the_output_and_reset_clears_rows():
    model = build()
    ids = torch.randint(0, 256, (2, 24))
    with_memory, state = by_segments(model, ids, 8)
    without = model(ids[:, 16:], state=model.init_state(2)).logits
    assert not torch.allclose(with_memory[:, 16:], without, atol=1e-4)
    _, state = by_segments(model, ids[:, :16], 8)
    state = state.reset(torch.tensor([True, False]))
    after = model(ids[:, 16:], state=state).logits
    fresh = model(ids[:1, 16:], state=model.init_state(1)).logits
    torch.testing.assert_close(after[:1], fresh, atol=1e-5, rtol=0)


@pytest.mark.parametrize("straight_through", [False, True])
def test_gradients_reach_gate_and_queries_not_the_store(straight_through):
    model = build(**{"memory.knn.straight_through": straight_through}).train()
    ids = torch.randint(0, 256, (2, 24))
    state = model.init_state(2)
    for start in (0, 8):
        state = model(ids[:, start:start + 8], state=state).state.detach()
    out = model(ids[:, 16:], targets=ids[:, 16:], state=state)
    out.loss.backward()
    knn = model.blocks[1].attention
    assert knn.knn.gate.grad is not None and knn.knn.gate.grad.abs().sum() > 0
    grad_with_memory = knn.qkv.weight.grad.clone()
    for tensor in state.stores[1].state_dict().values():
        if torch.is_tensor(tensor):
            assert not tensor.requires_grad
    model.zero_grad()
    empty = model.init_state(2)
    empty.position = state.position
    model(ids[:, 16:], targets=ids[:, 16:], state=empty).loss.backward()
    assert not torch.allclose(knn.qkv.weight.grad, grad_with_memory)  # the queries learn from retrieval


def test_straight_through_changes_only_the_gradient():
    torch.manual_seed(3)
    layer = KnnAttention(heads=2, k=3, combine="joint", straight_through=False)
    through = KnnAttention(heads=2, k=3, combine="joint", straight_through=True)
    store = make_store("exact", rows=1, heads=1, dim=4, capacity=16, device="cpu")
    keys = torch.nn.functional.normalize(torch.randn(1, 1, 10, 4), dim=-1)
    store.write(keys, torch.randn(1, 1, 10, 4), torch.arange(10))
    q = torch.randn(1, 2, 5, 4, requires_grad=True)
    local, lse = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5)
    a = layer(local, lse, store, q, 0.5, 0.0)
    b = through(local, lse, store, q, 0.5, 0.0)
    torch.testing.assert_close(a, b)
    (ga,) = torch.autograd.grad(a.sum(), q)
    (gb,) = torch.autograd.grad(b.sum(), q)
    assert not torch.allclose(ga, gb)


def test_joint_read_equals_one_softmax_over_local_and_retrieved():
    torch.manual_seed(4)
    layer = KnnAttention(heads=1, k=2, combine="joint", straight_through=False)
    store = make_store("exact", rows=1, heads=1, dim=4, capacity=8, device="cpu")
    mem_k = torch.nn.functional.normalize(torch.randn(1, 1, 5, 4), dim=-1)
    mem_v = torch.randn(1, 1, 5, 4)
    store.write(mem_k, mem_v, torch.arange(5))
    q = torch.randn(1, 1, 1, 4)
    local_k, local_v = torch.randn(3, 4), torch.randn(3, 4)
    local_scores = (q[0, 0, 0] @ local_k.T) * 0.7
    local_out = local_scores.softmax(-1) @ local_v
    out = layer(local_out.view(1, 1, 1, 4), local_scores.logsumexp(-1).view(1, 1, 1), store, q, 0.7, 0.0)
    mem_scores = (q[0, 0, 0] @ mem_k[0, 0].T) * 0.7
    top = mem_scores.topk(2).indices
    scores = torch.cat([local_scores, mem_scores[top]])
    expected = scores.softmax(-1) @ torch.cat([local_v, mem_v[0, 0][top]])
    torch.testing.assert_close(out.view(4), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gate_logits", [[-2.0, 0.5, 3.0], [0.0, 0.0, 0.0]])
def test_gate_mixes_retrieved_and_local_attention_as_the_paper_writes(gate_logits):
    """out = g * attn(retrieved) + (1 - g) * local, g = sigmoid(gate) per head; the retrieved
    scores are the scaled query times the unit key, by brute force over every stored pair."""
    torch.manual_seed(5)
    layer = KnnAttention(heads=3, k=6, combine="gate", straight_through=False)
    with torch.no_grad():
        layer.gate.copy_(torch.tensor(gate_logits))
    store = make_store("exact", rows=2, heads=1, dim=4, capacity=8, device="cpu")
    mem_k = torch.nn.functional.normalize(torch.randn(2, 1, 6, 4), dim=-1)
    mem_v = torch.randn(2, 1, 6, 4)
    store.write(mem_k, mem_v, torch.arange(6))
    q, local, scale = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4), 0.6
    out = layer(local, None, store, q, scale, 0.0)
    g = torch.sigmoid(torch.tensor(gate_logits, dtype=torch.float64))[None, :, None, None]
    scores = torch.einsum("bhtd,bkd->bhtk", q.double(), mem_k[:, 0].double()) * scale  # every pair: k = 6
    retrieved = scores.softmax(-1) @ mem_v[:, 0, None].double()  # (B, H, T, D)
    torch.testing.assert_close(out.double(), g * retrieved + (1 - g) * local.double(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", ["xl2-knn-tiny", "seed-knn-tiny"])
def test_written_keys_are_unit_whatever_the_models_qk_norm(preset):
    """The store holds unit keys (inner-product search) also in presets without QK-norm, whose
    layer keys are not unit: each written key is the normalised key of its position."""
    model = memlm.build(preset, **{"layers": 2, "width": 32, "seq_len": 8, "attention.heads": 4,
                                   "memory.knn.layers": [1], "memory.knn.capacity": 16, "memory.knn.dtype": "float32", "position.rope_dim": 4, "dropout": 0.0,
                                   "feedforward.dropout": 0.0, "attention.dropout": 0.0}).eval()
    ids = torch.randint(0, 256, (1, 8))
    seen = []
    block = model.blocks[1]
    hook = block.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    _, state = by_segments(model, ids, 8)
    hook.remove()
    h = block.attn_norm(seen[0]) if block.pre_norm else seen[0]
    raw_k, raw_v = block.attention.project_kv(h)  # (1, Hkv, 8, D)
    keys, values, positions = state.stores[1].entries(0)
    if model.config.attention.qk_norm is False:
        assert not torch.allclose(raw_k.norm(dim=-1), torch.ones(()), atol=1e-2)  # the layer's keys are not unit
    torch.testing.assert_close(keys.float(), torch.nn.functional.normalize(raw_k[0], dim=-1).float(),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values.float(), raw_v[0].float(), atol=1e-5, rtol=1e-5)


def test_knn_config_errors():
    for bad, field in [({"memory.knn.layers": [5]}, "memory.knn.layers"),
                       ({"memory.knn.k": 0}, "memory.knn.k"),
                       ({"memory.knn.backend": "annoy"}, "memory.knn.backend"),
                       ({"memory.knn.combine": "sum"}, "memory.knn.combine")]:
        with pytest.raises(memlm.ConfigError) as info:
            build(**bad)
        assert info.value.field_name == field


def test_knn_dtype_sets_the_exact_store_precision_and_is_checked():
    import memlm
    from memlm.config import ConfigError
    model = memlm.build("seed-tiny", layers=2, width=32, seq_len=16,
                        **{"attention.heads": 2, "memory.knn.layers": [1], "memory.knn.capacity": 64,
                           "memory.knn.dtype": "bfloat16"})
    state = model.init_state(2)
    assert state.stores[1].dtype == torch.bfloat16 and state.stores[1].keys.dtype == torch.bfloat16
    ids = torch.randint(0, 256, (2, 32))
    out = model(ids[:, :16], state=state)
    out = model(ids[:, 16:], state=out.state)  # the second segment reads what the first wrote
    assert int(state.stores[1].counts[0]) == 32 and torch.isfinite(out.logits).all()
    assert memlm.build("seed-knn-tiny").init_state(1).stores[2].dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="knn.dtype"):
        memlm.build("seed-tiny", **{"memory.knn.layers": [1], "memory.knn.dtype": "float16"})
    with pytest.raises(ConfigError, match="float32"):
        memlm.build("seed-tiny", **{"memory.knn.layers": [1], "memory.knn.backend": "faiss",
                                    "memory.knn.dtype": "bfloat16"})


def test_compiled_model_does_not_recompile_while_the_store_fills():
    """Under torch.compile the store's Python fill bound is neither read nor specialised on: a
    kNN model filling its store compiles twice (empty state, then carried memory), not once per
    segment (which hit dynamo's recompile limit and fell back to eager), and computes what the
    eager model computes (the compiled search covers every slot, masked by counts)."""
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    model = build(**{"memory.knn.capacity": 40})  # fills over 5 segments of 8, then evicts
    ids = torch.randint(0, 256, (2, 8 * 7))
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    torch._dynamo.reset()
    eager_state, compiled_state = model.init_state(2), model.init_state(2)
    for start in range(0, ids.shape[1], 8):
        segment = ids[:, start:start + 8]
        eager = model(segment, state=eager_state)
        out = compiled(segment, state=compiled_state)
        torch.testing.assert_close(out.logits, eager.logits, atol=1e-5, rtol=0)
        eager_state, compiled_state = eager.state, out.state
    if not under_mutation_testing():
        assert counter.frame_count == 2
    assert compiled_state.stores[1].counts.tolist() == eager_state.stores[1].counts.tolist() == [40, 40]


def test_states_made_on_two_names_of_one_device_share_the_compiled_graphs():
    """A store takes its tensors' device, not the name it was given: "cpu:0" here, "cuda" against
    "cuda:0" on a GPU (tests/gpu/test_store_device.py), where the race warm-up's states and the
    trainer's differed so and the first training step recompiled the whole forward."""
    from torch._dynamo.testing import CompileCounter

    assert make_store("exact", 1, 1, 8, 16, device="cpu:0").device == torch.device("cpu")
    torch.manual_seed(0)
    model = build(**{"memory.xl.length": 8})
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    torch._dynamo.reset()
    ids = torch.randint(0, 256, (2, 8))
    frames = []
    for device in ("cpu:0", None):  # None: the model's device
        state = model.init_state(2, device=device)
        for _ in range(3):
            state = compiled(ids, state=state).state.detach()
        frames.append(counter.frame_count)
    if not under_mutation_testing():
        assert frames[1] == frames[0]


def filled_store(rows, heads, dim, n, dtype=torch.float32):
    """An exact store holding n unit keys and values per row and kv head; returns it and them (float64)."""
    store = make_store("exact", rows=rows, heads=heads, dim=dim, capacity=32, device="cpu", dtype=dtype)
    keys = torch.nn.functional.normalize(torch.randn(rows, heads, n, dim), dim=-1)
    values = torch.randn(rows, heads, n, dim)
    store.write(keys, values, torch.arange(n))
    keys, values = keys.to(dtype), values.to(dtype)  # what the store holds
    return store, keys.double(), values.double()


def brute_force_read(q, keys, values, k, scale):
    """Every query head (kv head = head // G) scores every stored pair by q . unit key * scale and
    attends over its k best: (out (B, H, T, D), lse (B, H, T)), float64."""
    B, H, T, D = q.shape
    G = H // keys.shape[1]
    out, lse = torch.zeros(B, H, T, D, dtype=torch.float64), torch.zeros(B, H, T, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                scores = (keys[b, h // G] @ q[b, h, t].double()) * scale  # (n,)
                top = scores.topk(k).indices
                out[b, h, t] = scores[top].softmax(-1) @ values[b, h // G][top]
                lse[b, h, t] = scores[top].logsumexp(-1)
    return out, lse


def test_read_attends_over_the_k_best_of_everything_stored():
    """k = 3 of 10 stored pairs per row and kv head, two query heads per kv head, queries of any norm:
    the k best by q . unit key (scaled), one softmax over them; its log-sum-exp is returned."""
    torch.manual_seed(6)
    layer = KnnAttention(heads=4, k=3, combine="gate", straight_through=False)
    store, keys, values = filled_store(rows=2, heads=2, dim=4, n=10)
    q = torch.randn(2, 4, 5, 4) * torch.rand(2, 4, 5, 1) * 3
    out, lse = layer.read(store, q, 0.8, 0.0)
    expected, expected_lse = brute_force_read(q, keys, values, 3, 0.8)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), expected_lse, atol=1e-5, rtol=1e-5)


def test_read_in_bfloat16_returns_the_queries_dtype():
    """A bfloat16 layer reads a bfloat16 store: keys and values come back in the query's dtype."""
    torch.manual_seed(7)
    layer = KnnAttention(heads=2, k=4, combine="gate", straight_through=False)
    store, keys, values = filled_store(rows=1, heads=2, dim=8, n=6, dtype=torch.bfloat16)
    q = torch.randn(1, 2, 3, 8).to(torch.bfloat16)
    out, lse = layer.read(store, q, 0.5, 0.0)
    assert out.dtype == torch.bfloat16
    expected, _ = brute_force_read(q, keys, values, 4, 0.5)
    torch.testing.assert_close(out.double(), expected, atol=0.03, rtol=0.03)


def test_gate_is_closed_only_for_rows_that_retrieve_nothing():
    """Row 1 of the store is cleared (a new document): its queries take the local result alone, while
    row 0 mixes g * retrieved + (1 - g) * local."""
    torch.manual_seed(8)
    layer = KnnAttention(heads=2, k=2, combine="gate", straight_through=False)
    with torch.no_grad():
        layer.gate.copy_(torch.tensor([1.5, -0.5]))
    store, keys, values = filled_store(rows=2, heads=1, dim=4, n=5)
    store.reset(torch.tensor([False, True]))
    q, local = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)
    out = layer(local, None, store, q, 0.7, 0.0)
    retrieved, _ = brute_force_read(q[:1], keys[:1], values[:1], 2, 0.7)
    g = torch.sigmoid(torch.tensor([1.5, -0.5], dtype=torch.float64))[None, :, None, None]
    torch.testing.assert_close(out[:1].double(), g * retrieved + (1 - g) * local[:1].double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], local[1], atol=0, rtol=0)
    _, lse = layer.read(store, q, 0.7, 0.0)
    assert torch.isinf(lse[1]).all() and torch.isfinite(lse[0]).all()


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_dropout_drops_retrieved_weights_and_rescales_the_others(p):
    """Retrieved attention weights under dropout p are each 0 or weight / (1 - p): with one-hot values
    the output shows every weight (and about a fraction 1 - p of them survive)."""
    torch.manual_seed(9)
    layer = KnnAttention(heads=1, k=8, combine="gate", straight_through=False)
    store = make_store("exact", rows=1, heads=1, dim=8, capacity=8, device="cpu")
    keys = torch.nn.functional.normalize(torch.randn(1, 1, 8, 8), dim=-1)
    store.write(keys, torch.eye(8)[None, None], torch.arange(8))  # value j = e_j
    q = torch.randn(1, 1, 64, 8)
    weights = ((q[0, 0] @ keys[0, 0].T) * 0.9).softmax(-1)  # (64, 8): every stored pair retrieved
    plain, _ = layer.read(store, q, 0.9, 0.0)
    torch.testing.assert_close(plain[0, 0], weights, atol=1e-5, rtol=1e-5)
    dropped, _ = layer.read(store, q, 0.9, p)
    kept = dropped[0, 0] != 0
    torch.testing.assert_close(dropped[0, 0][kept], weights[kept] / (1 - p), atol=1e-5, rtol=1e-5)
    assert abs(kept.float().mean() - (1 - p)) < 0.12  # 512 weights: a few standard deviations


@pytest.mark.parametrize("straight_through", [False, True])
def test_query_gradient_matches_the_formula(straight_through):
    """The retrieved pairs are constants; straight-through adds the unit query's gradient path to them,
    k' = k + (q^ - sg(q^)), v' = v + (q^ - sg(q^)): the query gradient against autograd through
    the formula written out in float64."""
    torch.manual_seed(10)
    layer = KnnAttention(heads=2, k=3, combine="joint", straight_through=straight_through)
    store, keys, values = filled_store(rows=1, heads=1, dim=4, n=7)
    q = torch.randn(1, 2, 4, 4, requires_grad=True)
    weight = torch.randn(1, 2, 4, 4)
    out, lse = layer.read(store, q, 0.6, 0.0)
    (grad,) = torch.autograd.grad((out * weight).sum() + lse.sum(), q)
    q64 = q.detach().double().requires_grad_()
    total = 0
    for h in range(2):
        for t in range(4):
            qv = q64[0, h, t]
            top = (keys[0, 0] @ qv.detach()).topk(3).indices
            k, v = keys[0, 0][top], values[0, 0][top]
            if straight_through:
                unit = qv / qv.norm()
                k, v = k + (unit - unit.detach()), v + (unit - unit.detach())
            scores = (k @ qv) * 0.6
            total = total + scores.softmax(-1) @ v @ weight[0, h, t].double() + scores.logsumexp(-1)
    (expected,) = torch.autograd.grad(total, q64)
    torch.testing.assert_close(grad.double(), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_completed_segments_write_their_keys_values_and_positions(placement):
    """Each completed segment of the kNN layer writes, at its stream positions, the unit keys and the
    values of its block inputs (through the attention norm only where it comes first), also when
    the segment arrives in pieces; an unfinished segment writes nothing."""
    model = build(**{"norm.placement": placement, "attention.kv_heads": 2, "memory.knn.layers": [0, 1]})
    ids = torch.randint(0, 256, (2, 20))
    inputs = {0: [], 1: []}
    hooks = [model.blocks[i].register_forward_pre_hook(lambda module, args, i=i: inputs[i].append(args[0]))
             for i in (0, 1)]
    state = model.init_state(2)
    try:
        for start, size in [(0, 3), (3, 5), (8, 8), (16, 4)]:
            state = model(ids[:, start:start + size], state=state).state
    finally:
        for hook in hooks:
            hook.remove()
    for layer in (0, 1):
        block = model.blocks[layer]
        x = torch.cat(inputs[layer], dim=1)[:, :16]  # the two completed segments
        h = block.attn_norm(x) if placement == "pre" else x
        kv = torch.nn.functional.linear(h, block.attention.qkv.weight[32:], block.attention.qkv.bias[32:]
                                        if block.attention.qkv.bias is not None else None)
        k, v = kv.unflatten(-1, (2, 2, 8)).permute(2, 0, 3, 1, 4)  # (2: k/v, B, Hkv, T, D)
        for row in range(2):
            keys, values, positions = state.stores[layer].entries(row)
            assert positions.tolist() == list(range(16))
            torch.testing.assert_close(keys, torch.nn.functional.normalize(k[row], dim=-1), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(values, v[row], atol=1e-5, rtol=1e-5)


def test_gate_combines_in_the_layers_dtype():
    """A bfloat16 layer's gated result stays bfloat16 and equals the gate formula (float64 reference)."""
    torch.manual_seed(11)
    layer = KnnAttention(heads=2, k=3, combine="gate", straight_through=False)
    with torch.no_grad():
        layer.gate.copy_(torch.tensor([0.8, -1.2]))
    store, keys, values = filled_store(rows=1, heads=1, dim=8, n=5, dtype=torch.bfloat16)
    q, local = torch.randn(1, 2, 4, 8).to(torch.bfloat16), torch.randn(1, 2, 4, 8).to(torch.bfloat16)
    out = layer(local, None, store, q, 0.5, 0.0)
    assert out.dtype == torch.bfloat16
    retrieved, _ = brute_force_read(q, keys, values, 3, 0.5)
    g = torch.sigmoid(torch.tensor([0.8, -1.2], dtype=torch.float64))[None, :, None, None]
    torch.testing.assert_close(out.double(), g * retrieved + (1 - g) * local.double(), atol=0.03, rtol=0.03)


def test_only_the_gate_combination_has_parameters():
    """The paper's gate is one learned logit per head; the joint softmax learns nothing of its own."""
    gate = KnnAttention(heads=3, k=2, combine="gate", straight_through=False)
    joint = KnnAttention(heads=3, k=2, combine="joint", straight_through=True)
    assert [(n, tuple(t.shape)) for n, t in gate.named_parameters()] == [("gate", (3,))]
    assert joint.gate is None and list(joint.parameters()) == []


def test_straight_through_read_in_bfloat16_keeps_the_queries_dtype_and_values():
    """The straight-through term (zero in the forward pass) is added in the query's dtype: a bfloat16
    read returns bfloat16 results equal to the brute-force read."""
    torch.manual_seed(12)
    layer = KnnAttention(heads=2, k=3, combine="joint", straight_through=True)
    store, keys, values = filled_store(rows=1, heads=2, dim=8, n=6, dtype=torch.bfloat16)
    q = torch.randn(1, 2, 3, 8).to(torch.bfloat16)
    out, lse = layer.read(store, q, 0.5, 0.0)
    assert out.dtype == torch.bfloat16
    expected, expected_lse = brute_force_read(q, keys, values, 3, 0.5)
    torch.testing.assert_close(out.double(), expected, atol=0.03, rtol=0.03)
    torch.testing.assert_close(lse.double(), expected_lse, atol=0.03, rtol=0.03)
