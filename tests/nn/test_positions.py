import math

import pytest
import torch

import memlm
from memlm.config import ConfigError
from memlm.nn.positions import Rotary, T5RelativeBias, TupeBias, sinusoidal_table, t5_buckets
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


@pytest.mark.parametrize("memory", [{"memory.xl.length": 4}, {"memory.xl.lengths": [2, 6]},
                                    {"memory.xl.length": 2, "memory.compressive.rate": 2, "memory.compressive.length": 3},
                                    {"memory.xl.length": 4, "memory.feedback.mode": "memory"}])
def test_tupe_follows_a_stream_ten_times_longer_than_its_table(memory):
    model = tupe_stream_model(**memory)
    limit = model.config.positions_limit
    assert limit == model.config.attention_window == model.tupe.table.num_embeddings
    ids = torch.randint(0, 256, (2, 10 * limit))
    segments, _ = by_segments(model, ids, 4)
    assert torch.isfinite(segments).all()
    pieces = 1 if "memory.xl.length" in memory and len(memory) == 1 else 2  # token by token once
    torch.testing.assert_close(by_segments(model, ids, pieces)[0], segments, atol=1e-5, rtol=0)
    if "memory.feedback.mode" not in memory:  # while memory holds the whole stream, one pass agrees
        held = 4 * (1 + min(model.config.memory_lengths(training=False)) // 4)
        torch.testing.assert_close(model(ids[:, :held]).logits, segments[:, :held], atol=1e-5, rtol=0)


def test_tupe_memory_rolls_by_window_not_by_stream():
    """Once memory rolls, a segment sees the same window wherever it lies in the stream: the
    same tokens give the same logits at stream position 12 and 408 (TUPE is translation-free)."""
    model = tupe_stream_model(**{"memory.xl.length": 4})
    window = torch.randint(0, 256, (1, 12))  # the last segment's two layers reach back two segments
    early = by_segments(model, torch.cat([torch.randint(0, 256, (1, 4)), window], 1), 4)[0][:, -4:]
    late = by_segments(model, torch.cat([torch.randint(0, 256, (1, 400)), window], 1), 4)[0][:, -4:]
    torch.testing.assert_close(late, early, atol=1e-5, rtol=0)


def test_tupe_with_memory_checks_max_positions_at_config_time():
    with pytest.raises(ConfigError, match="max_positions.*spans up to 20 positions"):
        memlm.build("seed-tiny", **{"seq_len": 8, "position.kind": "tupe", "memory.xl.length": 12, "max_positions": 19})
    assert memlm.build("seed-tiny", **{"seq_len": 8, "position.kind": "tupe", "memory.xl.length": 12,
                                       "max_positions": 20}).tupe.limit == 20
    assert memlm.build("seed-tiny", **{"seq_len": 8, "position.kind": "tupe", "memory.xl.length": 4,
                                       "memory.xl.eval_multiplier": 3.0}).config.positions_limit == 8 + 12


def test_tupe_logits_are_content_and_position_terms_each_over_sqrt_2d(monkeypatch):
    """TUPE (arXiv 2006.15595, eq. 5): (x W_q)(x W_k)^T / sqrt(2d) + (p U_q)(p U_k)^T / sqrt(2d),
    written out from the layer's weights and compared with what the kernel is given."""
    from memlm.nn import attention as attention_module

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


# ----- formulas written out entry by entry ---------------------------------------------------

def rotate_by_pairs(x, positions, rope_dim, base, gamma=None, scale_base=512.0, sign=+1.0):
    """RoPE (rotate-half layout) and xPos written out per dimension pair, in float64: pair
    (i, i + r/2) turns by position * base^(-2i/r); xPos scales both by zeta_i^(sign * n / scale_base)."""
    x = x.double()
    y = x.clone()
    half = rope_dim // 2
    for t, n in enumerate(positions):
        for i in range(half):
            angle = n * base ** (-2 * i / rope_dim)
            c, s = math.cos(angle), math.sin(angle)
            a, b = x[..., t, i], x[..., t, i + half]
            scale = 1.0
            if gamma is not None:
                zeta = (2 * i / rope_dim + gamma) / (1 + gamma)
                scale = zeta ** (sign * n / scale_base)
            y[..., t, i] = (a * c - b * s) * scale
            y[..., t, i + half] = (b * c + a * s) * scale
    return y


@pytest.mark.parametrize("gamma", [None, 0.4])
@pytest.mark.parametrize("reach", [0, 8])
def test_rotary_against_rotation_written_out_per_pair(gamma, reach):
    """Each of the first rope_dim dimensions turned pairwise (and decayed under xPos), the rest
    passed through, for positions given as a tensor or as a first int, inside and outside a table."""
    rope_dim, head_dim, base, scale_base = 6, 10, 50.0, 7.0
    rotary = Rotary(rope_dim, base, xpos_gamma=gamma, xpos_scale_base=scale_base, table_reach=reach)
    x = torch.randn(2, 3, 5, head_dim)
    for sign in (+1.0, -1.0):
        for start in (-8, -3, 0, 2, 4, 40):
            positions = list(range(start, start + 5))
            expected = rotate_by_pairs(x, positions, rope_dim, base, gamma, scale_base, sign)
            as_tensor = rotary.rotate(x, torch.tensor(positions), sign)
            as_int = rotary.rotate(x, start, sign)
            assert as_int.dtype == torch.float32
            torch.testing.assert_close(as_tensor.double(), expected, atol=2e-5, rtol=2e-5)
            torch.testing.assert_close(as_int.double(), expected, atol=2e-5, rtol=2e-5)
    # a float64 input is rotated in float64 when positions are computed, not looked up
    xd = x.double()
    torch.testing.assert_close(rotary.rotate(xd, torch.arange(30, 35), -1.0),
                               rotate_by_pairs(xd, range(30, 35), rope_dim, base, gamma, scale_base, -1.0))


@pytest.mark.parametrize("reach", [0, 6])
@pytest.mark.parametrize("gamma", [None, 0.4])
def test_rotary_forward_places_queries_from_zero_and_keys_from_the_offset(gamma, reach):
    """forward(q, k, k_offset): q at 0..Tq-1 scaled up by xPos (sign +1), k at k_offset.. scaled down."""
    rotary = Rotary(4, 30.0, xpos_gamma=gamma, xpos_scale_base=5.0, table_reach=reach)
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 7, 4)
    q_rot, k_rot = rotary(q, k, -4)
    torch.testing.assert_close(q_rot.double(), rotate_by_pairs(q, range(0, 3), 4, 30.0, gamma, 5.0, +1.0),
                               atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(k_rot.double(), rotate_by_pairs(k, range(-4, 3), 4, 30.0, gamma, 5.0, -1.0),
                               atol=2e-5, rtol=2e-5)


def t5_bucket_formula(n, buckets, max_distance):
    """The paper's causal bucket (Mesh TensorFlow's _relative_position_bucket, bidirectional=False)
    of n = query position - key position."""
    n = max(n, 0)
    exact = buckets // 2
    if n < exact:
        return n
    large = exact + int(math.log(n / exact) / math.log(max_distance / exact) * (buckets - exact))
    return min(large, buckets - 1)


@pytest.mark.parametrize("buckets,max_distance", [(32, 128), (7, 30), (10, 200), (3, 4), (2, 9)])
def test_t5_buckets_equal_the_papers_formula_at_every_distance(buckets, max_distance):
    distance = torch.arange(-6, 3 * max_distance)
    got = t5_buckets(distance, buckets, max_distance)
    assert got.dtype == torch.long
    assert got.tolist() == [t5_bucket_formula(n, buckets, max_distance) for n in distance.tolist()]
    assert got.max().item() == buckets - 1


def test_t5_bias_entries_are_the_table_at_each_pairs_bucket():
    bias = T5RelativeBias(heads=3, buckets=6, max_distance=12)
    with torch.no_grad():
        bias.table.weight.normal_(0.0, 1.0)
    for q_len, k_len, k_offset in [(4, 9, -5), (3, 3, 0), (1, 20, -19)]:
        table = bias(q_len, k_len, k_offset, torch.device("cpu"))
        assert table.shape == (3, q_len, k_len)
        for i in range(q_len):
            for j in range(k_len):
                bucket = t5_bucket_formula(i - (k_offset + j), 6, 12)
                torch.testing.assert_close(table[:, i, j], bias.table.weight[bucket])


@pytest.mark.parametrize("width", [8, 7])
def test_sinusoidal_table_every_entry(width):
    """sin(p / 10000^(i/half)) then cos of the same angles; an odd width ends in a zero column."""
    half = width // 2
    positions = [0, 1, 3, 17, 250]
    table = sinusoidal_table(torch.tensor(positions), width)
    assert table.shape == (len(positions), width) and table.dtype == torch.float32
    expected = torch.zeros(len(positions), width, dtype=torch.float64)
    for t, p in enumerate(positions):
        for i in range(half):
            angle = p / 10000 ** (i / half)
            expected[t, i], expected[t, half + i] = math.sin(angle), math.cos(angle)
    torch.testing.assert_close(table.double(), expected, atol=1e-5, rtol=0)  # float32 frequencies


def test_absolute_positions_learned_rows_sinusoidal_formula_and_range():
    from memlm.nn.positions import AbsolutePositions

    learned = AbsolutePositions("learned", 6, 8)
    torch.testing.assert_close(learned(3, 4, torch.device("cpu")), learned.table.weight[3:7])
    torch.testing.assert_close(learned(0, 8, torch.device("cpu")), learned.table.weight)
    with pytest.raises(ValueError, match=r"learned positions cover 0\.\.7, but this segment needs positions 5\.\.8;"):
        learned(5, 4, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"needs positions -1\.\.1; raise max_positions"):
        learned(-1, 3, torch.device("cpu"))
    sinusoidal = AbsolutePositions("sinusoidal", 6, 8)
    assert sinusoidal.table is None and list(sinusoidal.parameters()) == []
    torch.testing.assert_close(sinusoidal(100, 3, torch.device("cpu")),  # no table, no limit
                               sinusoidal_table(torch.arange(100, 103), 6))


def test_tupe_window_is_the_longer_of_keys_and_queries():
    """Queries may reach past the last key (k_len < q_first + q_len): the window is then the
    queries' end, both for the table rows used and for the limit check."""
    tupe = TupeBias(width=6, heads=2, head_dim=2, limit=5)
    with torch.no_grad():
        for weight in (tupe.table.weight, tupe.query.weight, tupe.key.weight):
            weight.normal_(0.0, 1.0)
    term = tupe(q_len=3, k_len=2, k_offset=-2)  # queries at 2, 3, 4; keys at 0, 1: window 5
    p = tupe.table.weight.double()
    uq = (p[2:5] @ tupe.query.weight.double().T).view(3, 2, 2).transpose(0, 1)
    uk = (p[0:2] @ tupe.key.weight.double().T).view(2, 2, 2).transpose(0, 1)
    torch.testing.assert_close(term.double(), uq @ uk.transpose(1, 2) / 2.0, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"covers windows of 5 positions, but this call attends 6 "):
        tupe(q_len=3, k_len=2, k_offset=-3)


def test_rotary_buffers_stay_out_of_checkpoints():
    """inv_freq, log_zeta and the cos/sin table are derived from the config, not learned: a
    checkpoint holds none of them, so it loads into a model whose table reaches further (a longer
    evaluation memory) and that model computes the same function on a short input."""
    for gamma in (None, 0.4):
        assert Rotary(8, 100.0, xpos_gamma=gamma, table_reach=4).state_dict() == {}
    overrides = {"layers": 1, "width": 16, "seq_len": 4, "attention.heads": 2, "position.kind": "xpos",
                 "memory.xl.length": 2}
    short = memlm.build("seed-tiny", **overrides).eval()
    long = memlm.build("seed-tiny", **overrides, **{"memory.xl.eval_multiplier": 8.0}).eval()
    assert short.blocks[0].attention.rotary.table.shape != long.blocks[0].attention.rotary.table.shape
    assert not any("rotary" in name for name in short.state_dict())
    long.load_state_dict(short.state_dict())  # strict
    ids = torch.randint(0, 256, (1, 4))
    torch.testing.assert_close(long(ids).logits, short(ids).logits)


def test_rotary_table_serves_every_window_within_its_reach(monkeypatch):
    """Every run of positions inside -reach..reach-1 is read from the float32 table (no float64
    trigonometry per call), whatever the input's dtype; a Rotary built without a reach keeps none."""
    assert "table" not in dict(Rotary(8, 100.0, xpos_gamma=0.4).named_buffers())
    rotary = Rotary(4, 30.0, xpos_gamma=0.4, xpos_scale_base=6.0, table_reach=5)
    assert rotary.table.dtype == torch.float32  # kept in float32
    x = torch.randn(1, 2, 10, 6, dtype=torch.float64)
    expected = {(start, length, sign): rotate_by_pairs(x[:, :, :length], range(start, start + length), 4, 30.0,
                                                       0.4, 6.0, sign)
                for start in range(-5, 6) for length in range(0, 11) if start + length <= 5 for sign in (1.0, -1.0)}

    def computed(*args, **kwargs):
        raise AssertionError("cos/sin computed inside the table's reach")

    monkeypatch.setattr(Rotary, "_tables", computed)
    for (start, length, sign), want in expected.items():
        got = rotary.rotate(x[:, :, :length], start, sign)
        assert got.dtype == torch.float64 and got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    for dtype in (torch.bfloat16, torch.float16):  # a half-precision input stays half precision
        got = rotary.rotate(x.to(dtype), -5, -1.0)
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), expected[(-5, 10, -1.0)], atol=3e-2, rtol=3e-2)


def test_rotary_keeps_the_shape_of_empty_inputs():
    for reach in (0, 3):
        rotary = Rotary(4, 30.0, xpos_gamma=0.4, table_reach=reach)
        for start in (-3, 0, 3, 10):
            assert rotary.rotate(torch.randn(1, 2, 0, 6), start, 1.0).shape == (1, 2, 0, 6)  # no positions
            assert rotary.rotate(torch.randn(1, 0, 3, 6), start, -1.0).shape == (1, 0, 3, 6)  # no heads


def test_xpos_default_scale_base_is_the_papers_512():
    rotary = Rotary(4, 30.0, xpos_gamma=0.5)
    x = torch.randn(1, 1, 3, 4)
    torch.testing.assert_close(rotary.rotate(x, torch.tensor([100, 700, -300]), -1.0).double(),
                               rotate_by_pairs(x, [100, 700, -300], 4, 30.0, 0.5, 512.0, -1.0), atol=2e-5, rtol=2e-5)


def test_position_terms_live_on_the_requested_device_not_torchs_default():
    """Built and called for the CPU while torch's default device is another one (meta here): every
    position index is made where the caller or the term's table says, so the terms are unchanged."""
    from memlm.nn.positions import AbsolutePositions

    cpu = torch.device("cpu")
    learned, sinusoidal = AbsolutePositions("learned", 6, 8), AbsolutePositions("sinusoidal", 7, 8)
    t5, tupe = T5RelativeBias(heads=2, buckets=6, max_distance=12), TupeBias(width=6, heads=2, head_dim=3, limit=9)
    rotary = Rotary(4, 30.0, xpos_gamma=0.4, xpos_scale_base=6.0)
    x, positions = torch.randn(1, 2, 3, 6), torch.arange(4)
    calls = {
        "learned": lambda: learned(2, 5, cpu), "sinusoidal": lambda: sinusoidal(2, 5, cpu),
        "sinusoidal_table": lambda: sinusoidal_table(positions, 7),
        "t5": lambda: t5(3, 7, -4, cpu), "tupe": lambda: tupe(3, 7, -4),
        "rotary": lambda: rotary.rotate(x, 5, -1.0),
    }
    expected = {name: call() for name, call in calls.items()}
    with torch.device("meta"):
        for name, call in calls.items():
            got = call()
            assert got.device == cpu, name
            torch.testing.assert_close(got, expected[name])


@pytest.mark.parametrize("gamma", [None, 0.4])
def test_reset_buffers_rebuilds_every_buffer_on_the_device_asked_for(gamma):
    """reset_buffers(device) remakes inv_freq, log_zeta and the cos/sin table on `device`, not on
    torch's default device (meta stands for an accelerator), with the constructor's values."""
    rotary = Rotary(4, 30.0, xpos_gamma=gamma, xpos_scale_base=6.0, table_reach=3)
    expected = {name: b.clone() for name, b in rotary.named_buffers()}
    assert set(expected) == ({"inv_freq", "table"} | ({"log_zeta"} if gamma else set()))
    rotary.reset_buffers("meta")
    assert {name: (b.device.type, b.shape, b.dtype) for name, b in rotary.named_buffers()} == \
        {name: ("meta", b.shape, b.dtype) for name, b in expected.items()}
    with torch.device("meta"):
        rotary.reset_buffers("cpu")
    got = dict(rotary.named_buffers())
    for name, want in expected.items():
        assert got[name].device.type == "cpu", name
        torch.testing.assert_close(got[name], want)
