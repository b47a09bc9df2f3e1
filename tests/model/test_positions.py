import math

import torch

from memlm.model.positions import Rotary, T5RelativeBias, TupeBias, sinusoidal_table, t5_buckets


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


def test_tupe_term_formula():
    tupe = TupeBias(width=12, heads=2, head_dim=3, limit=32)
    term = tupe(q_start=5, q_len=2, k_start=3, k_len=4)
    p = tupe.table.weight
    uq = (p[6] @ tupe.query.weight.T).view(2, 3)[1]
    uk = (p[4] @ tupe.key.weight.T).view(2, 3)[1]
    torch.testing.assert_close(term[1, 1, 1], uq @ uk / math.sqrt(6))


def test_sinusoidal_table_formula():
    table = sinusoidal_table(torch.tensor([0, 3]), 8)
    assert table.shape == (2, 8)
    torch.testing.assert_close(table[1, 1], torch.tensor(math.sin(3 * 10000 ** (-1 / 4))))
    torch.testing.assert_close(table[1, 4], torch.tensor(math.cos(3.0)))
