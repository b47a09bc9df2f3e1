"""The attention layer against a reference written with explicit per-head loops in float64 from
the layer's own weights: grouped heads, QK-norm with its scale g, rotary/xPos positions, score
biases, key masks, adaptive spans, recurrent memory, a key/value cache, persistent vectors and
kNN memories, each merged as one softmax over the union of all keys a query may see."""

import math

import pytest
import torch
import torch.nn.functional as F

import memlm
from memlm.memory.knn.stores import ExactStore
from memlm.nn.attention import SegmentContext
from tests.conftest import by_segments

H, HKV, D, WIDTH = 4, 2, 4, 16


def layer(layer_index=0, **overrides):
    """A one-layer-per-index model's attention: width 16, 4 heads of 4 dims, 2 key/value heads."""
    base = {"layers": layer_index + 1, "width": WIDTH, "seq_len": 8, "attention.heads": H,
            "attention.kv_heads": HKV, "attention.backend": "eager", "position.kind": "none", "bias": True}
    base.update(overrides)
    model = memlm.build("vanilla-tiny", **base).eval()
    attn = model.blocks[layer_index].attention
    with torch.no_grad():  # biases start at zero: make them show
        if attn.qkv.bias is not None:
            attn.qkv.bias.normal_(0.0, 0.5)
            attn.out.bias.normal_(0.0, 0.5)
        attn.qkv.weight.normal_(0.0, 0.5)
    return model.config, attn


def context(q_start=0, row_start=None, keep=None, bias=None, stores=None):
    return SegmentContext(q_start=q_start, row_start=row_start, keep=keep,
                          bias=bias or (lambda layer, k_offset, k_len: None), stores=stores)


def rotate(x, n, sign, position):
    """One vector x (D,) at relative position n, RoPE pairs (i, i + r/2) turned by n * base^(-2i/r),
    times zeta_i^(sign * n / scale_base) under xPos; dimensions past rope_dim unchanged."""
    if position.kind not in ("rope", "xpos"):
        return x
    r = position.rope_dim or x.shape[0]
    y = x.clone()
    for i in range(r // 2):
        angle = n * position.rope_base ** (-2 * i / r)
        c, s = math.cos(angle), math.sin(angle)
        scale = 1.0
        if position.kind == "xpos":
            zeta = (2 * i / r + position.xpos_gamma) / (1 + position.xpos_gamma)
            scale = zeta ** (sign * n / position.xpos_scale_base)
        y[i] = (x[i] * c - x[i + r // 2] * s) * scale
        y[i + r // 2] = (x[i + r // 2] * c + x[i] * s) * scale
    return y


def reference(config, attn, h, *, memory=None, cache=None, q_start=0, row_start=None, keep=None, bias=None,
              stored=None, straight_through=False, dropout_masks=None):
    """float64, one query and one head at a time. memory (B, M, W) is projected with the layer's
    key/value rows; cache {'k', 'v'} (B, Hkv, Tc, D) holds projected keys/values; stored: per row
    and key/value head, (unit keys (N, D), values (N, D)) of a kNN memory. Keys sit at relative
    positions -past..T-1 (past = cached + memory keys), queries at 0..T-1."""
    B, T, _ = h.shape
    H, HKV, D = attn.heads, attn.kv_heads, attn.head_dim
    G = H // HKV
    W = attn.qkv.weight.double()
    b_qkv = attn.qkv.bias.double() if config.bias else torch.zeros(W.shape[0], dtype=torch.float64)

    def proj(x, start):  # rows start..start+D of the fused projection
        return x.double() @ W[start:start + D].T + b_qkv[start:start + D]

    qk_norm = config.attention.qk_norm  # the mechanisms from the config, their values from the layer
    g = attn.qk_scale.double().item() if qk_norm else 1.0
    scale = 1.0 if qk_norm else 1.0 / math.sqrt((2 if config.position.kind == "tupe" else 1) * D)
    unit = (lambda x: x / x.norm(dim=-1, keepdim=True)) if qk_norm else (lambda x: x)
    out = torch.zeros(B, T, H * D, dtype=torch.float64)
    bias_table = None
    for b in range(B):
        for head in range(H):
            kv = head // G
            q = unit(proj(h[b], head * D))  # (T, D)
            keys, values = [], []
            if cache is not None:
                keys.append(cache["k"][b, kv].double())
                values.append(cache["v"][b, kv].double())
            if memory is not None:
                keys.append(proj(memory[b], H * D + kv * D))
                values.append(proj(memory[b], (H + HKV) * D + kv * D))
            keys.append(proj(h[b], H * D + kv * D))
            values.append(proj(h[b], (H + HKV) * D + kv * D))
            K, V = unit(torch.cat(keys)), torch.cat(values)
            past = K.shape[0] - T
            if bias is not None and bias_table is None:
                bias_table = bias(attn.layer, -past, K.shape[0]).double()  # (H, T, Tk)
            for i in range(T):
                logits, vals, drop = [], [], []
                q_rot = rotate(q[i], i, +1.0, config.position)
                for j in range(K.shape[0]):
                    n = j - past  # the key's position relative to the first query
                    visible = n <= i
                    if n != i:
                        if keep is not None and n >= 0 and not keep[b, n]:
                            visible = False
                        if row_start is not None and q_start + n < row_start[b]:
                            visible = False
                    weight_log = 0.0
                    if config.memory.adaptive_span.enabled:
                        m = (attn.span.ramp + attn.span.span[head].item() - (i - n)) / attn.span.ramp
                        m = min(max(m, 0.0), 1.0)
                        if m == 0.0:
                            visible = False
                        else:
                            weight_log = math.log(m)  # weights m * exp(s)
                    if not visible:
                        continue
                    s = g * scale * (q_rot @ rotate(K[j], n, -1.0, config.position))
                    if bias_table is not None:
                        s = s + bias_table[head, i, j]
                    logits.append(s + weight_log)
                    vals.append(V[j])
                    drop.append(1.0 if dropout_masks is None else dropout_masks[0][b, head, i, j].item())
                if config.memory.persistent.vectors:  # no position, no bias, no mask
                    pk = unit(attn.persistent.k[kv].double())
                    for p in range(pk.shape[0]):
                        logits.append(g * scale * (q[i] @ pk[p]))
                        vals.append(attn.persistent.v[kv, p].double())
                        drop.append(1.0 if dropout_masks is None else dropout_masks[1][b, head, i, p].item())
                if stored is not None:  # kNN memories: unit keys, scored by the scaled unrotated query
                    sk, sv = stored[b][kv]
                    through = 0.0
                    if straight_through:  # k + (u - sg(u)), v + (u - sg(u)), u the unit query: q's gradient path
                        u = g * q[i] / (g * q[i]).norm()
                        through = u - u.detach()
                    for p in range(sk.shape[0]):
                        logits.append(g * scale * (q[i] @ (sk[p].double() + through)))
                        vals.append(sv[p].double() + through)
                        drop.append(1.0)
                logits = torch.stack([torch.as_tensor(x, dtype=torch.float64) for x in logits])
                weights = torch.softmax(logits, 0) * torch.tensor(drop, dtype=torch.float64)
                out[b, i, head * D:(head + 1) * D] = weights @ torch.stack(vals)
    w_out = attn.out.weight.double()
    return out @ w_out.T + (attn.out.bias.double() if config.bias else 0.0)


def close(actual, expected):
    torch.testing.assert_close(actual.double(), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("overrides", [
    {},
    {"bias": False, "attention.kv_heads": 1},
    {"attention.qk_norm": True, "attention.qk_norm_scale": 3.0},
    {"attention.kv_heads": 4, "position.kind": "rope", "position.rope_dim": 2, "position.rope_base": 30.0},
    {"position.kind": "xpos", "position.xpos_gamma": 0.7, "position.xpos_scale_base": 6.0,
     "position.rope_base": 40.0},
])
def test_segment_against_per_head_loops(overrides):
    config, attn = layer(**overrides)
    h = torch.randn(2, 5, WIDTH)
    y, new_cache = attn(h, context(), None)
    assert new_cache is None
    close(y, reference(config, attn, h))


def test_sdpa_backend_computes_the_same_function():
    config, attn = layer(**{"attention.backend": "sdpa", "position.kind": "rope"})
    h, memory = torch.randn(2, 5, WIDTH), torch.randn(2, 3, WIDTH)
    close(attn(h, context(), None)[0], reference(config, attn, h))
    close(attn(h, context(), None, memory)[0], reference(config, attn, h, memory=memory))


@pytest.mark.parametrize("overrides", [
    {"position.kind": "xpos", "position.xpos_scale_base": 5.0},
    {"attention.qk_norm": True, "position.kind": "rope", "bias": False},
])
def test_recurrent_memory_is_projected_with_the_layers_key_value_weights(overrides):
    """Memory keys/values are this layer's projections of the memory states, at positions -M..-1."""
    config, attn = layer(**{"memory.xl.length": 6, **overrides})
    h, memory = torch.randn(2, 4, WIDTH), torch.randn(2, 6, WIDTH)
    y, new_cache = attn(h, context(q_start=6), None, memory)
    assert new_cache is None
    close(y, reference(config, attn, h, memory=memory))
    close(attn(h, context(q_start=6), None, memory[:, :0])[0], reference(config, attn, h))  # empty memory


@pytest.mark.parametrize("qk_norm", [False, True])
def test_key_value_cache_extends_the_keys_and_returns_them_unrotated(qk_norm):
    config, attn = layer(**{"position.kind": "rope", "attention.qk_norm": qk_norm})
    h0, h1 = torch.randn(2, 3, WIDTH), torch.randn(2, 4, WIDTH)
    y0, cache = attn(h0, context(), None, cache=True)
    close(y0, reference(config, attn, h0))
    assert len(cache) == 2 and cache[0].shape == (2, HKV, 3, D)
    k0, v0 = attn.project_kv(h0)
    torch.testing.assert_close(cache[0], k0)
    torch.testing.assert_close(cache[1], v0)
    y1, cache = attn(h1, context(q_start=3), cache, cache=True)
    close(y1, reference(config, attn, h1, cache={"k": k0, "v": v0}))
    k1, v1 = attn.project_kv(h1)
    torch.testing.assert_close(cache[0], torch.cat([k0, k1], 2))
    torch.testing.assert_close(cache[1], torch.cat([v0, v1], 2))
    # the cached keys are the layer's keys: projected from h as the queries' own keys are
    _, k_full, v_full = attn.project(torch.cat([h0, h1], 1))
    torch.testing.assert_close(cache[0], k_full)
    torch.testing.assert_close(cache[1], v_full)


def test_project_splits_queries_keys_values_by_head():
    _, attn = layer(**{"attention.qk_norm": True})
    h = torch.randn(2, 3, WIDTH)
    q, k, v = attn.project(h)
    assert q.shape == (2, H, 3, D) and k.shape == v.shape == (2, HKV, 3, D)
    W, bias = attn.qkv.weight, attn.qkv.bias
    for head in range(H):
        raw = h @ W[head * D:(head + 1) * D].T + bias[head * D:(head + 1) * D]
        torch.testing.assert_close(q[:, head], raw / raw.norm(dim=-1, keepdim=True))
    for kv in range(HKV):
        raw = h @ W[(H + kv) * D:(H + kv + 1) * D].T + bias[(H + kv) * D:(H + kv + 1) * D]
        torch.testing.assert_close(k[:, kv], raw / raw.norm(dim=-1, keepdim=True))
        val = h @ W[(H + HKV + kv) * D:(H + HKV + kv + 1) * D].T + bias[(H + HKV + kv) * D:(H + HKV + kv + 1) * D]
        torch.testing.assert_close(v[:, kv], val)


@pytest.mark.parametrize("layer_index", [0, 1])
def test_score_bias_is_asked_for_this_layer_and_the_whole_key_range(layer_index):
    """ctx.bias(layer, k_offset, Tk) is added to every score the causal mask keeps."""
    config, attn = layer(layer_index, **{"memory.xl.length": 3, "position.kind": "tupe"})
    tables = {i: torch.randn(H, 30, 30) for i in range(2)}
    calls = []

    def bias(index, k_offset, k_len):  # window positions: keys 0..k_len-1, queries from -k_offset
        calls.append((index, k_offset, k_len))
        return tables[index][:, -k_offset:-k_offset + 4, :k_len]

    h, memory = torch.randn(2, 4, WIDTH), torch.randn(2, 3, WIDTH)
    y, _ = attn(h, context(q_start=3, bias=bias), None, memory)
    assert calls == [(layer_index, -3, 7)]
    close(y, reference(config, attn, h, memory=memory,
                       bias=lambda index, k_offset, k_len: tables[layer_index][:, 3:7, :7]))


def test_key_mask_formula():
    row_start = torch.tensor([5, 9])
    keep = torch.tensor([[True, False, True], [False, True, True]])
    assert context(q_start=8).key_mask(4, 3, torch.device("cpu")) is None
    # keys at stream positions 4..10: the cache's 4 and the segment's 3
    only_keep = context(q_start=8, keep=keep).key_mask(4, 3, torch.device("cpu"))
    assert only_keep.dtype == torch.bool
    assert only_keep.tolist() == [[True] * 4 + [True, False, True], [True] * 4 + [False, True, True]]
    only_rows = context(q_start=8, row_start=row_start).key_mask(4, 3, torch.device("cpu"))
    assert only_rows.tolist() == [[p >= 5 for p in range(4, 11)], [p >= 9 for p in range(4, 11)]]
    both = context(q_start=8, row_start=row_start, keep=keep).key_mask(4, 3, torch.device("cpu"))
    assert only_rows.dtype == both.dtype == torch.bool
    assert both.tolist() == [[a and b for a, b in zip(r, k)] for r, k in zip(only_rows.tolist(), only_keep.tolist())]
    assert context(q_start=8, row_start=row_start).key_positions(4, 3, torch.device("cpu")).tolist() == \
        list(range(4, 11))


@pytest.mark.parametrize("source", ["memory", "cache"])
def test_key_masks_hide_past_rows_and_dropped_keys_but_never_the_query_itself(source):
    config, attn = layer(**{"position.kind": "rope", "memory.xl.length": 3 if source == "memory" else 0})
    h, past = torch.randn(2, 4, WIDTH), torch.randn(2, 3, WIDTH)
    row_start = torch.tensor([4, 1])  # row 0 starts a document at its segment's second token
    keep = torch.tensor([[True, False, True, False], [False, True, False, True]])
    ctx = context(q_start=3, row_start=row_start, keep=keep)
    if source == "memory":
        y, _ = attn(h, ctx, None, past)
        expected = reference(config, attn, h, memory=past, q_start=3, row_start=row_start, keep=keep)
    else:
        k, v = attn.project_kv(past)
        y, _ = attn(h, ctx, (k, v))
        expected = reference(config, attn, h, cache={"k": k, "v": v}, q_start=3, row_start=row_start, keep=keep)
    close(y, expected)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_persistent_vectors_join_one_softmax_without_position(qk_norm):
    """Persistent keys are scored against the unrotated queries (unit keys under QK-norm), seen by
    every query whatever the masks, and share one softmax with the segment's keys."""
    config, attn = layer(**{"memory.persistent.vectors": 3, "position.kind": "xpos", "position.xpos_scale_base": 4.0,
                            "attention.qk_norm": qk_norm})
    with torch.no_grad():
        attn.persistent.v.normal_(0.0, 1.0)
    assert attn.persistent.k.shape == attn.persistent.v.shape == (HKV, 3, D)
    h = torch.randn(2, 5, WIDTH)
    keep = torch.tensor([[True, False, False, True, False], [False] * 5])
    row_start = torch.tensor([2, 0])
    y, _ = attn(h, context(q_start=0, keep=keep, row_start=row_start), None)
    close(y, reference(config, attn, h, keep=keep, row_start=row_start))


def test_persistent_vectors_init_scales():
    _, attn = layer(**{"memory.persistent.vectors": 256, "attention.kv_heads": 4, "attention.head_dim": 16,
                       "init_std": 0.05})
    assert attn.persistent.k.std().item() == pytest.approx(1 / math.sqrt(16), rel=0.05)
    assert attn.persistent.v.std().item() == pytest.approx(0.05, rel=0.05)


@pytest.mark.parametrize("persistent", [0, 2])
def test_dropout_acts_on_the_joint_probabilities_in_training_only(persistent):
    """The configured kernel (eager) drops attention probabilities in training only; persistent
    vectors' probabilities are dropped with the same rate, as dropout on the joint softmax."""
    config, attn = layer(**{"attention.dropout": 0.5, "memory.persistent.vectors": persistent})
    h = torch.randn(2, 5, WIDTH)
    expected = reference(config, attn, h)
    close(attn(h, context(), None)[0], expected)  # evaluation: no dropout
    attn.train()
    torch.manual_seed(3)
    y = attn(h, context(), None)[0]
    torch.manual_seed(3)  # the same draws: the kernel's mask over the keys, then the persistent ones'
    masks = (F.dropout(torch.ones(2, H, 5, 5), 0.5), F.dropout(torch.ones(2, H, 5, persistent), 0.5))
    close(y, reference(config, attn, h, dropout_masks=masks))
    assert not torch.allclose(y.double(), expected, atol=1e-3)


@pytest.mark.parametrize("spans,limit", [([0.5, 7.0, 1.5, 2.0], 9), ([0.5, 14.0, 1.5, 2.0], 16)])
@pytest.mark.parametrize("overrides", [{}, {"position.kind": "tupe"}])
@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])
def test_adaptive_span_weights_keys_by_the_soft_mask(overrides, spans, limit, backend):
    """Weights m(x) * exp(s) with m = clamp((R + z_h - x) / R, 0, 1) at distance x, through every
    kernel with the span's window (keys at distance >= limit masked for every head; flex builds its
    block mask from it), with and without a window-position bias."""
    config, attn = layer(**{"memory.xl.length": 12, "memory.adaptive_span.enabled": True, "memory.adaptive_span.ramp": 2,
                            "memory.adaptive_span.init": 0.0, "attention.backend": backend, **overrides})
    with torch.no_grad():
        attn.span.span.copy_(torch.tensor(spans))
    attn.span.clamp_()
    assert attn.span.limit == limit  # keys at this distance or more are masked for every head
    table = torch.randn(H, 30, 30)

    def bias(index, k_offset, k_len):
        return table[:, -k_offset:-k_offset + 4, :k_len]

    h, memory = torch.randn(2, 4, WIDTH), torch.randn(2, 12, WIDTH)
    expected = reference(config, attn, h, memory=memory, q_start=12)
    expected_bias = reference(config, attn, h, memory=memory, q_start=12, bias=bias)
    with torch.no_grad():  # the forward (flex has no backward on a CPU)
        close(attn(h, context(q_start=12), None, memory)[0], expected)
        close(attn(h, context(q_start=12, bias=bias), None, memory)[0], expected_bias)


def test_knn_memories_join_the_local_softmax_as_unit_keys_without_position():
    """combine='joint': the retrieved pairs (here every stored pair: k = capacity) are scored by
    scale * q . k_unit with the unrotated query and share the local keys' softmax; persistent
    vectors join the same softmax."""
    config, attn = layer(**{"position.kind": "rope", "memory.knn.layers": [0], "memory.knn.k": 3,
                            "memory.knn.combine": "joint", "memory.persistent.vectors": 2})
    store = ExactStore(rows=2, heads=HKV, dim=D, capacity=3)
    keys, values = F.normalize(torch.randn(2, HKV, 3, D), dim=-1), torch.randn(2, HKV, 3, D)
    store.write(keys, values, torch.arange(3))
    stored = [[(keys[b, kv], values[b, kv]) for kv in range(HKV)] for b in range(2)]
    h = torch.randn(2, 4, WIDTH)
    y, _ = attn(h, context(q_start=3, stores={0: store}), None)
    close(y, reference(config, attn, h, stored=stored))
    close(attn(h, context(q_start=3, stores={1: store}), None)[0], reference(config, attn, h))  # another layer's
    close(attn(h, context(q_start=3, stores={}), None)[0], reference(config, attn, h))


@pytest.mark.parametrize("memory", [
    {"memory.xl.length": 4},
    {"memory.xl.length": 2, "memory.compressive.rate": 2, "memory.compressive.length": 20},
    {"memory.xl.length": 2, "memory.tokens.count": 10},
    {"memory.xl.lengths": [2, 12], "memory.xl.eval_multiplier": 4.0},
])
def test_rotary_table_covers_every_position_a_memory_model_asks_for(memory, monkeypatch):
    """With recurrent memory the key range is bounded (segment, evaluation memory, compressed
    memory, memory tokens): the layer's cos/sin table covers it, so once the memory is full no
    call computes float64 trigonometry again, and the stream's logits are those of the same
    model computing every rotation."""
    from memlm.nn.positions import Rotary

    overrides = {"layers": 2, "width": 8, "seq_len": 4, "attention.heads": 2, "feedforward.kind": "none",
                 "position.kind": "xpos", **memory}
    model = memlm.build("seed-tiny", **overrides).eval()
    computing = memlm.build("seed-tiny", **overrides).eval()
    computing.load_state_dict(model.state_dict())
    for block in computing.blocks:
        block.attention.rotary.table_reach = 0  # the same rotations, computed at every call
    ids = torch.randint(0, 256, (1, 64))
    expected, _ = by_segments(computing, ids, 4)

    def computed(*args, **kwargs):
        raise AssertionError("rotary cos/sin computed outside the table")

    monkeypatch.setattr(Rotary, "_tables", computed)
    torch.testing.assert_close(by_segments(model, ids, 4)[0], expected, atol=1e-5, rtol=0)


def test_a_layer_without_knn_ignores_the_stores():
    config, attn = layer(**{"position.kind": "rope"})
    assert attn.knn is None
    store = ExactStore(rows=2, heads=HKV, dim=D, capacity=3)
    store.write(F.normalize(torch.randn(2, HKV, 3, D), dim=-1), torch.randn(2, HKV, 3, D), torch.arange(3))
    h = torch.randn(2, 4, WIDTH)
    close(attn(h, context(stores={0: store}), None)[0], reference(config, attn, h))


@pytest.mark.parametrize("straight_through", [False, True])
def test_knn_gradients_reach_the_queries_through_the_retrieved_pairs(straight_through):
    """Gradients of the layer equal the reference's: the store is detached, and in straight-through
    mode the retrieved keys and values carry the unit query's gradient path (k + u - sg(u))."""
    config, attn = layer(**{"attention.qk_norm": True, "memory.knn.layers": [0], "memory.knn.k": 2,
                            "memory.knn.combine": "joint", "memory.knn.straight_through": straight_through})
    store = ExactStore(rows=1, heads=HKV, dim=D, capacity=2)
    keys, values = F.normalize(torch.randn(1, HKV, 2, D), dim=-1), torch.randn(1, HKV, 2, D)
    store.write(keys, values, torch.arange(2))
    stored = [[(keys[0, kv], values[0, kv]) for kv in range(HKV)]]
    h = torch.randn(1, 3, WIDTH, requires_grad=True)
    weights = torch.randn(1, 3, WIDTH)
    (attn(h, context(stores={0: store}), None)[0] * weights).sum().backward()
    h_ref = h.detach().double().requires_grad_()
    (reference(config, attn, h_ref, stored=stored, straight_through=straight_through) * weights).sum().backward()
    torch.testing.assert_close(h.grad.double(), h_ref.grad, atol=1e-4, rtol=1e-4)
    h_other = h.detach().double().requires_grad_()
    (reference(config, attn, h_other, stored=stored, straight_through=not straight_through) * weights).sum().backward()
    assert not torch.allclose(h_other.grad, h_ref.grad, atol=1e-3)


def test_layer_computes_on_its_inputs_device_not_torchs_default():
    """Masks, positions, spans and biases are built on h's device: with torch's default device set
    to another one (meta here) the layer gives the same output on the CPU."""
    config, attn = layer(**{"position.kind": "tupe", "memory.xl.length": 12, "memory.adaptive_span.enabled": True,
                            "memory.adaptive_span.ramp": 2, "memory.persistent.vectors": 2, "attention.qk_norm": True})
    with torch.no_grad():
        attn.span.span.copy_(torch.tensor([0.5, 7.0, 1.5, 2.0]))
    attn.span.clamp_()
    table = torch.randn(H, 30, 30)
    h, memory = torch.randn(2, 4, WIDTH), torch.randn(2, 12, WIDTH)
    ctx = context(q_start=12, row_start=torch.tensor([14, 0]), keep=torch.tensor([[True, False, True, False]] * 2),
                  bias=lambda index, k_offset, k_len: table[:, -k_offset:-k_offset + 4, :k_len])
    expected = reference(config, attn, h, memory=memory, q_start=12, row_start=ctx.row_start, keep=ctx.keep,
                         bias=ctx.bias)
    with torch.device("meta"):
        y, _ = attn(h, ctx, None, memory)
        mask = ctx.key_mask(12, 4, torch.device("cpu"))
    assert y.device.type == "cpu" and mask.device.type == "cpu"
    close(y, expected)


@pytest.mark.parametrize("overrides", [
    {},
    {"bias": False, "attention.kv_heads": 1},
    {"attention.qk_norm": True, "attention.qk_norm_scale": 3.0},
    {"position.kind": "tupe"},
])
def test_content_scores_are_position_free_scores_with_every_weight_detached(overrides):
    """content_scores(h, memory): float32 scores g q̂·k̂ (QK-norm) or q·k / sqrt(d) (sqrt(2d) under
    TUPE) of queries from h over keys from memory, with the layer's biases and grouped heads and
    no position, and the values; gradients reach h and memory but no weight of the layer."""
    config, attn = layer(**{"position.kind": "rope", **overrides})
    h = torch.randn(2, 5, WIDTH, requires_grad=True)
    memory = torch.randn(2, 6, WIDTH, requires_grad=True)
    scores, values = attn.content_scores(h, memory)
    assert scores.shape == (2, H, 5, 6) and scores.dtype == torch.float32 and values.shape == (2, H, 6, D)
    W = attn.qkv.weight.detach().double()
    b = attn.qkv.bias.detach().double() if config.bias else torch.zeros(W.shape[0], dtype=torch.float64)
    kv_heads = attn.kv_heads
    qk_norm = config.attention.qk_norm
    scale = attn.qk_scale.item() if qk_norm else 1.0 / math.sqrt((2 if config.position.kind == "tupe" else 1) * D)
    for head in range(H):
        g = head // (H // kv_heads)
        q = h.detach().double() @ W[head * D:(head + 1) * D].T + b[head * D:(head + 1) * D]
        k = memory.detach().double() @ W[(H + g) * D:(H + g + 1) * D].T + b[(H + g) * D:(H + g + 1) * D]
        v = memory.detach().double() @ W[(H + kv_heads + g) * D:(H + kv_heads + g + 1) * D].T \
            + b[(H + kv_heads + g) * D:(H + kv_heads + g + 1) * D]
        if qk_norm:
            q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
        torch.testing.assert_close(scores[:, head].double(), scale * q @ k.transpose(1, 2), atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(values[:, head].double(), v, atol=2e-5, rtol=2e-5)
    (scores.sum() + values.sum()).backward()
    assert all(p.grad is None for p in attn.parameters())
    assert h.grad.abs().sum() > 0 and memory.grad.abs().sum() > 0


def test_recurrent_memory_keys_and_values_train_the_layers_projection():
    """Transformer-XL stops gradients into the memory states, not into this layer's weights that
    project them: the layer's gradients equal the reference's, memory keys included."""
    config, attn = layer(**{"memory.xl.length": 6, "position.kind": "rope"})
    h, memory = torch.randn(2, 4, WIDTH), torch.randn(2, 6, WIDTH)
    weights = torch.randn(2, 4, WIDTH)
    (attn(h, context(q_start=6), None, memory)[0] * weights).sum().backward()
    got = {name: p.grad.clone() for name, p in attn.named_parameters()}
    attn.zero_grad()
    (reference(config, attn, h, memory=memory) * weights).sum().backward()
    for name, p in attn.named_parameters():
        torch.testing.assert_close(got[name], p.grad, atol=1e-4, rtol=1e-4, msg=name)
    memory_rows = slice(H * D, (H + 2 * HKV) * D)  # keys and values: the memory's share matters
    attn.zero_grad()
    (reference(config, attn, h) * weights).sum().backward()
    assert not torch.allclose(got["qkv.weight"][memory_rows], attn.qkv.weight.grad[memory_rows], atol=1e-3)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_per_row_sources_join_one_softmax_without_position(qk_norm):
    """ctx.sources[layer]: each read(q unrotated and scaled, dropout) -> (out, lse) is merged
    exactly; a read whose lse is -inf (nothing to read) changes nothing; another layer's sources
    are not read. Persistent vectors read as a source give the layer with persistent vectors."""
    overrides = {"position.kind": "xpos", "position.xpos_scale_base": 4.0, "attention.qk_norm": qk_norm}
    config_p, attn_p = layer(**{"memory.persistent.vectors": 3, **overrides})
    with torch.no_grad():
        attn_p.persistent.v.normal_(0.0, 1.0)
    config, attn = layer(**overrides)
    attn.load_state_dict({k: v for k, v in attn_p.state_dict().items() if not k.startswith("persistent.")})
    seen = []

    def read(q, dropout_p):
        seen.append((q.shape, dropout_p))
        return attn_p.persistent(q, attn.scale if not qk_norm else 1.0, dropout_p, qk_norm)

    def nothing(q, dropout_p):
        return torch.zeros_like(q), torch.full(q.shape[:-1], float("-inf"))

    h = torch.randn(2, 5, WIDTH)
    keep = torch.tensor([[True, False, False, True, False], [False] * 5])
    row_start = torch.tensor([2, 0])
    ctx = context(keep=keep, row_start=row_start)
    ctx.sources = {0: [nothing, read, nothing]}
    close(attn(h, ctx, None)[0], reference(config_p, attn_p, h, keep=keep, row_start=row_start))
    assert seen == [((2, H, 5, D), 0.0)]
    ctx.sources = {1: [read]}
    close(attn(h, ctx, None)[0], reference(config, attn, h, keep=keep, row_start=row_start))


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])
def test_the_configured_backend_computes_the_layer(backend, monkeypatch):
    from memlm.nn import kernels

    config, attn = layer(**{"attention.backend": backend, "position.kind": "rope"})
    calls = []
    for name, kernel in list(kernels.KERNELS.items()):
        def spy(*args, _name=name, _kernel=kernel, **kwargs):
            calls.append(_name)
            return _kernel(*args, **kwargs)
        monkeypatch.setitem(kernels.KERNELS, name, spy)
    h = torch.randn(2, 5, WIDTH)
    with torch.no_grad():  # FlexAttention has no backward on the CPU
        close(attn(h, context(), None)[0], reference(config, attn, h))
    assert calls == [backend]


def test_adaptive_span_without_memory():
    """A layer with an adaptive span and no memory (the first segment): the soft mask alone."""
    config, attn = layer(**{"memory.xl.length": 4, "memory.adaptive_span.enabled": True,
                            "memory.adaptive_span.ramp": 2, "memory.adaptive_span.init": 0.0})
    with torch.no_grad():
        attn.span.span.copy_(torch.tensor([0.5, 3.0, 1.5, 2.0]))
    attn.span.clamp_()
    h = torch.randn(2, 6, WIDTH)
    close(attn(h, context(), None)[0], reference(config, attn, h))

