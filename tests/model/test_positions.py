import math

import pytest
import torch

import memlm
from memlm.config import ConfigError
from memlm.model.positions import Rotary, T5RelativeBias, TupeBias, sinusoidal_table, t5_buckets
from tests.conftest import by_segments


def scores(rotary, q, k, q_pos, k_pos):
    q_rot = rotary.rotate(q, q_pos, +1.0)
    k_rot = rotary.rotate(k, k_pos, -1.0)
    return q_rot @ k_rot.transpose(-1, -2)


def test_rope_scores_are_invariant_to_a_shift_of_all_positions():
    rope = Rotary(rope_dim=16, base=10000.0)
    q, k = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 7, 16)
    q_pos, k_pos = torch.arange(10, 15), torch.arange(6, 13)
    base = scores(rope, q, k, q_pos, k_pos)
    for shift in (1, 37, 5000):
        torch.testing.assert_close(scores(rope, q, k, q_pos + shift, k_pos + shift), base, atol=1e-4, rtol=1e-4)
    # and the scores do depend on the distance
    assert not torch.allclose(scores(rope, q, k, q_pos + 3, k_pos), base, atol=1e-3)


def test_rope_rotates_only_rope_dim_and_preserves_norm():
    rope = Rotary(rope_dim=4, base=100.0)
    x = torch.randn(1, 1, 6, 10)
    y = rope.rotate(x, torch.arange(6), +1.0)
    torch.testing.assert_close(y[..., 4:], x[..., 4:])
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    # position 0 is the identity; position 1 rotates pair (0, 2) by angle 1 (inv_freq[0] = 1)
    torch.testing.assert_close(y[..., 0, :], x[..., 0, :])
    c, s = math.cos(1.0), math.sin(1.0)
    torch.testing.assert_close(y[0, 0, 1, 0], x[0, 0, 1, 0] * c - x[0, 0, 1, 2] * s)


def test_xpos_differs_from_rope_only_by_the_decay_scale():
    gamma, base_scale, d = 0.4, 512.0, 8
    rope = Rotary(rope_dim=d, base=10000.0)
    xpos = Rotary(rope_dim=d, base=10000.0, xpos_gamma=gamma, xpos_scale_base=base_scale)
    x = torch.randn(1, 1, 6, d).double()
    pos = torch.arange(-3, 3)
    zeta = (torch.arange(0, d, 2).double() / d + gamma) / (1 + gamma)
    zeta = torch.cat([zeta, zeta])
    for sign in (+1.0, -1.0):
        expected = rope.rotate(x, pos, sign) * zeta ** (sign * pos.double()[:, None] / base_scale)
        torch.testing.assert_close(xpos.rotate(x, pos, sign), expected)
    # the product of the q and k scales depends only on the distance
    q, k = torch.ones(1, 1, 1, d).double(), torch.ones(1, 1, 1, d).double()
    near = scores(xpos, q, k, torch.tensor([5]), torch.tensor([4])) / scores(rope, q, k, torch.tensor([5]), torch.tensor([4]))
    shifted = scores(xpos, q, k, torch.tensor([105]), torch.tensor([104])) / scores(rope, q, k, torch.tensor([105]), torch.tensor([104]))
    torch.testing.assert_close(near, shifted)


def test_rotary_table_equals_computed_positions_inside_and_outside_its_reach():
    for gamma in (None, 0.4):
        computed = Rotary(rope_dim=8, base=10000.0, xpos_gamma=gamma)
        tabled = Rotary(rope_dim=8, base=10000.0, xpos_gamma=gamma, table_reach=16)
        assert tabled.table.shape == (2 if gamma else 1, 2, 32, 8)
        x = torch.randn(2, 3, 10, 12)
        for start in (-16, -7, 0, 6, 7, 30):  # 7 and 30 run past the reach: computed instead
            for sign in (+1.0, -1.0):
                expected = computed.rotate(x, torch.arange(start, start + 10), sign)
                torch.testing.assert_close(tabled.rotate(x, start, sign), expected, atol=1e-6, rtol=1e-6)


def test_t5_buckets_exact_then_logarithmic():
    distance = torch.tensor([-5, 0, 1, 15, 16, 40, 127, 128, 10_000])
    b = t5_buckets(distance, buckets=32, max_distance=128)
    assert b[:4].tolist() == [0, 0, 1, 15]
    assert b[4].item() == 16 and b[-1].item() == 31 and b[-2].item() == 31
    expected_40 = 16 + int(math.log(40 / 16) / math.log(128 / 16) * 16)
    assert b[5].item() == expected_40
    assert (b.diff() >= 0).all()


def test_t5_bias_depends_only_on_distance():
    bias = T5RelativeBias(heads=3, buckets=8, max_distance=20)
    table = bias(4, 6, -2, torch.device("cpu"))  # (H, Tq, Tk)
    assert table.shape == (3, 4, 6)
    # same distance q - k along each diagonal
    torch.testing.assert_close(table[:, 1, 2], table[:, 3, 4])
    torch.testing.assert_close(table[:, 0, 2], bias.table.weight[0])


def test_tupe_term_formula_at_window_positions():
    tupe = TupeBias(width=12, heads=2, head_dim=3, limit=32)
    term = tupe(q_len=2, k_len=5, k_offset=-3)  # keys at window positions 0..4, queries at 3, 4
    p = tupe.table.weight.double()
    wq, wk = tupe.query.weight.double(), tupe.key.weight.double()
    assert term.shape == (2, 2, 5)
    for h in range(2):
        for i in range(2):
            for j in range(5):
                uq = (p[3 + i] @ wq.T).view(2, 3)[h]
                uk = (p[j] @ wk.T).view(2, 3)[h]
                torch.testing.assert_close(term[h, i, j].double(), uq @ uk / math.sqrt(6), rtol=1e-5, atol=1e-6)


def test_tupe_window_must_fit_the_table():
    tupe = TupeBias(width=8, heads=1, head_dim=4, limit=6)
    assert tupe(q_len=2, k_len=6, k_offset=-4).shape == (1, 2, 6)
    with pytest.raises(ValueError, match=r"TUPE's table covers windows of 6 positions, but this call attends 7"):
        tupe(q_len=2, k_len=7, k_offset=-5)


def test_sinusoidal_table_formula():
    table = sinusoidal_table(torch.tensor([0, 3]), 8)
    assert table.shape == (2, 8)
    torch.testing.assert_close(table[1, 1], torch.tensor(math.sin(3 * 10000 ** (-1 / 4))))
    torch.testing.assert_close(table[1, 4], torch.tensor(math.cos(3.0)))


def tupe_stream_model(**extra):
    overrides = {"layers": 2, "width": 16, "seq_len": 4, "attention.heads": 2, "position.kind": "tupe",
                 "attention.backend": "eager"}
    overrides.update(extra)
    model = memlm.build("seed-tiny", **overrides).eval()
    with torch.no_grad():  # at init the term is ~1e-5: large enough here to show in every logit
        for weight in (model.tupe.table.weight, model.tupe.query.weight, model.tupe.key.weight):
            weight.normal_(0.0, 1.0)
    return model


@pytest.mark.parametrize("memory", [{"memory.length": 4}, {"memory.lengths": [2, 6]},
                                    {"memory.length": 2, "memory.compress_rate": 2, "memory.compress_length": 3},
                                    {"memory.length": 4, "memory.feedback": "memory"}])
def test_tupe_follows_a_stream_ten_times_longer_than_its_table(memory):
    model = tupe_stream_model(**memory)
    limit = model.config.positions_limit
    assert limit == model.config.attention_window == model.tupe.table.num_embeddings
    ids = torch.randint(0, 256, (2, 10 * limit))
    segments, _ = by_segments(model, ids, 4)
    assert torch.isfinite(segments).all()
    pieces = 1 if "memory.length" in memory and len(memory) == 1 else 2  # token by token once
    torch.testing.assert_close(by_segments(model, ids, pieces)[0], segments, atol=1e-5, rtol=0)
    if "memory.feedback" not in memory:  # while memory holds the whole stream, one pass agrees
        held = 4 * (1 + min(model.config.memory_lengths(training=False)) // 4)
        torch.testing.assert_close(model(ids[:, :held]).logits, segments[:, :held], atol=1e-5, rtol=0)


def test_tupe_memory_rolls_by_window_not_by_stream():
    """Once memory rolls, a segment sees the same window wherever it lies in the stream: the
    same tokens give the same logits at stream position 12 and 408 (TUPE is translation-free)."""
    model = tupe_stream_model(**{"memory.length": 4})
    window = torch.randint(0, 256, (1, 12))  # the last segment's two layers reach back two segments
    early = by_segments(model, torch.cat([torch.randint(0, 256, (1, 4)), window], 1), 4)[0][:, -4:]
    late = by_segments(model, torch.cat([torch.randint(0, 256, (1, 400)), window], 1), 4)[0][:, -4:]
    torch.testing.assert_close(late, early, atol=1e-5, rtol=0)


def test_tupe_with_memory_checks_max_positions_at_config_time():
    with pytest.raises(ConfigError, match="max_positions.*spans up to 20 positions"):
        memlm.build("seed-tiny", **{"seq_len": 8, "position.kind": "tupe", "memory.length": 12, "max_positions": 19})
    assert memlm.build("seed-tiny", **{"seq_len": 8, "position.kind": "tupe", "memory.length": 12,
                                       "max_positions": 20}).tupe.limit == 20
    assert memlm.build("seed-tiny", **{"seq_len": 8, "position.kind": "tupe", "memory.length": 4,
                                       "memory.eval_multiplier": 3.0}).config.positions_limit == 8 + 12


def test_tupe_term_ignores_the_adaptive_span_trim(monkeypatch):
    """Memory trimmed to the longest span (a speed-up) must not move the window positions."""
    from memlm.model import attention as attention_module

    model = tupe_stream_model(**{"memory.length": 12, "memory.adaptive_span": True, "memory.span_ramp": 2,
                                 "memory.span_init": 0.0})
    with torch.no_grad():
        for block in model.blocks:
            block.attention.span.span.fill_(3.0)
    model.after_optimizer_step()
    monkeypatch.setattr(attention_module, "SPAN_TRIM_STEP", 4)
    ids = torch.randint(0, 256, (2, 24))
    trimmed, _ = by_segments(model, ids, 4)
    monkeypatch.setattr(attention_module, "SPAN_TRIM_STEP", 1000)  # keeps the whole memory
    untrimmed, _ = by_segments(model, ids, 4)
    torch.testing.assert_close(trimmed, untrimmed, atol=1e-5, rtol=0)


def test_tupe_logits_are_content_and_position_terms_each_over_sqrt_2d(monkeypatch):
    """TUPE (arXiv 2006.15595, eq. 5): (x W_q)(x W_k)^T / sqrt(2d) + (p U_q)(p U_k)^T / sqrt(2d),
    written out from the layer's weights and compared with what the kernel is given."""
    from memlm.model import attention as attention_module

    model = memlm.build("vanilla-tiny", **{"layers": 1, "width": 32, "attention.heads": 4, "seq_len": 16,
                                           "position.kind": "tupe", "attention.backend": "eager"}).eval()
    with torch.no_grad():
        for weight in (model.tupe.table.weight, model.tupe.query.weight, model.tupe.key.weight):
            weight.normal_(0.0, 1.0)
    seen = []
    original = attention_module.attend
    monkeypatch.setattr(attention_module, "attend",
                        lambda q, k, v, **kw: seen.append((q, k, kw)) or original(q, k, v, **kw))
    ids = torch.randint(0, 256, (2, 6))
    model(ids)
    q, k, kw = seen[0]
    given = (q @ k.transpose(-1, -2)) * kw["scale"] + kw["bias"]  # (B, H, T, T)

    H, D = 4, 8
    block = model.blocks[0]
    h = block.attn_norm(model.embed(ids)).double()  # (B, T, W)
    w, b = block.attention.qkv.weight.double(), block.attention.qkv.bias.double()
    q_x = (h @ w[:H * D].T + b[:H * D]).view(2, 6, H, D).transpose(1, 2)
    k_x = (h @ w[H * D:2 * H * D].T + b[H * D:2 * H * D]).view(2, 6, H, D).transpose(1, 2)
    p = model.tupe.table.weight[:6].double()
    u_q = (p @ model.tupe.query.weight.double().T).view(6, H, D).transpose(0, 1)
    u_k = (p @ model.tupe.key.weight.double().T).view(6, H, D).transpose(0, 1)
    expected = (q_x @ k_x.transpose(-1, -2) + (u_q @ u_k.transpose(-1, -2))[None]) / math.sqrt(2 * D)
    torch.testing.assert_close(given.double(), expected, atol=1e-4, rtol=1e-4)
