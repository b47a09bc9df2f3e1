"""RandomWindows and Streams: shapes, targets, document starts, rank partitions, exact resume."""

import numpy as np
import pytest
import torch

from memlm.data import EOD, DataError, RandomWindows, Streams, TokenSplit


def split_from_docs(lengths, seed=0) -> TokenSplit:
    """Documents of random bytes with the given lengths, each followed by EOD."""
    rng = np.random.default_rng(seed)
    docs = [np.append(rng.integers(0, 256, n), EOD) for n in lengths]
    starts = np.cumsum([0] + [len(d) for d in docs[:-1]])
    return TokenSplit("train", np.concatenate(docs).astype(np.uint16), starts.astype(np.int64))


def positions_split(n: int) -> TokenSplit:
    """A split whose token at position i is i (as long as n <= 256), so values tell positions."""
    return TokenSplit("train", np.arange(n, dtype=np.uint16), np.array([0], np.int64))


SPLIT = split_from_docs([5, 17, 1, 40, 3, 9, 60, 2, 25])  # 171 tokens


def parts(n, count):
    bounds = [i * n // count for i in range(count + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(count)]


def test_random_windows_are_slices_with_shifted_targets():
    split = positions_split(200)
    loader = RandomWindows(split, batch_size=4, seq_len=16, seed=1)
    for _ in range(5):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
        assert x.is_contiguous() and y.is_contiguous()
        assert torch.equal(x, x[:, :1] + torch.arange(16))  # a contiguous slice of the split
        assert torch.equal(y, x + 1)
        assert int(y.max()) <= 199


def test_random_windows_resume_exactly():
    a = RandomWindows(SPLIT, batch_size=3, seq_len=8, seed=7)
    for _ in range(4):
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(3)]
    b = RandomWindows(SPLIT, batch_size=3, seq_len=8, seed=7)
    b.load_state_dict(state)
    for (x0, y0), (x1, y1) in zip(expected, (b.next_batch() for _ in range(3))):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert a.state_dict() == b.state_dict() and b.step == 7


def test_random_windows_differ_by_rank_and_seed():
    first = lambda **kw: RandomWindows(SPLIT, 4, 8, **kw).next_batch()[0]  # noqa: E731
    assert torch.equal(first(seed=3), first(seed=3))
    assert not torch.equal(first(seed=3, rank=0, world_size=2), first(seed=3, rank=1, world_size=2))
    assert not torch.equal(first(seed=3), first(seed=4))


@pytest.mark.parametrize("batch_size, seq_len", [(1, 5), (3, 7), (4, 16)])
def test_streams_continue_exactly_and_wrap(batch_size, seq_len):
    n = len(SPLIT)
    streams = Streams(SPLIT, batch_size, seq_len)
    steps = 2 * (n // batch_size) // seq_len + 3  # enough to wrap every row at least once
    segments = [streams.next_batch() for _ in range(steps)]
    x = torch.cat([s[0] for s in segments], dim=1)  # (B, steps * T)
    y = torch.cat([s[1] for s in segments], dim=1)
    doc_start = torch.cat([s[2] for s in segments], dim=1)
    tokens = SPLIT.tokens.astype(np.int64)
    for row, (lo, hi) in enumerate(parts(n, batch_size)):
        local = np.arange(x.shape[1]) % (hi - lo)
        pos = lo + local
        assert x[row].tolist() == tokens[pos].tolist()  # the part, cyclically
        assert y[row].tolist() == tokens[(pos + 1) % n].tolist()  # the true next token
        expected_start = (local == 0) | (tokens[(pos - 1) % n] == EOD)
        assert doc_start[row].tolist() == expected_start.tolist()
    assert doc_start.dtype == torch.bool and x.dtype == torch.int64


def test_streams_doc_start_positions_by_hand():
    #            doc0 E   doc1      E   doc2 E
    tokens = np.array([1, 2, EOD, 3, 4, 5, EOD, 6, EOD], np.uint16)
    split = TokenSplit("validation", tokens, np.array([0, 3, 7]))
    x, y, doc_start = Streams(split, batch_size=1, seq_len=9).next_batch()
    assert x.tolist() == [tokens.tolist()]
    assert y.tolist() == [[2, EOD, 3, 4, 5, EOD, 6, EOD, 1]]  # after the last EOD comes the first document
    assert doc_start.tolist() == [[True, False, False, True, False, False, False, True, False]]
    # two rows: row 1 starts mid-document at position 4 and is flagged there
    x, y, doc_start = Streams(split, batch_size=2, seq_len=4).next_batch()
    assert x.tolist() == [[1, 2, EOD, 3], [4, 5, EOD, 6]]
    assert doc_start.tolist() == [[True, False, False, True], [True, False, False, True]]


def test_streams_y_is_x_shifted_inside_a_part():
    streams = Streams(SPLIT, batch_size=2, seq_len=20)
    x, y, _ = streams.next_batch()
    x_next, _, _ = streams.next_batch()
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(y[:, -1], x_next[:, 0])  # no wrap yet: the stream continues across calls
    assert torch.equal(Streams(SPLIT, batch_size=2, seq_len=20).next_batch()[0], x)  # deterministic


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_streams_ranks_partition_the_split(world_size):
    n, batch_size, seq_len = 250, 2, 10
    split = positions_split(n)
    seen = []
    for rank in range(world_size):
        streams = Streams(split, batch_size, seq_len, rank=rank, world_size=world_size)
        steps = n // (batch_size * world_size) // seq_len  # no row wraps yet
        xs = torch.cat([streams.next_batch()[0] for _ in range(steps)], dim=1)
        seen.append(set(xs.flatten().tolist()))
    for a in range(world_size):
        for b in range(a + 1, world_size):
            assert not seen[a] & seen[b]
    assert sum(map(len, seen)) == world_size * batch_size * steps * seq_len


@pytest.mark.parametrize("world_size, batch_size, seq_len", [(1, 1, 50), (1, 4, 8), (2, 3, 7), (3, 5, 4), (2, 64, 4)])
def test_streams_without_wrap_cover_every_token_once(world_size, batch_size, seq_len):
    n = len(SPLIT)
    tokens = SPLIT.tokens.astype(np.int64)
    inputs, targets, shapes = [], [], []
    for rank in range(world_size):
        streams = Streams(SPLIT, batch_size, seq_len, rank=rank, world_size=world_size, wrap=False)
        segments = list(streams)
        assert streams.exhausted
        with pytest.raises(StopIteration):
            streams.next_segment()
        shapes.append([tuple(s.x.shape) for s in segments])
        x = torch.cat([s.x for s in segments], dim=1)
        y = torch.cat([s.y for s in segments], dim=1)
        valid = torch.cat([s.valid for s in segments], dim=1)
        for row in range(batch_size):
            inputs += x[row][valid[row]].tolist()
            targets += y[row][valid[row]].tolist()
            assert valid[row].tolist() == sorted(valid[row].tolist(), reverse=True)  # padding only at the end
        assert bool((x[~valid] == EOD).all()) and bool((y[~valid] == EOD).all())
    assert inputs == tokens.tolist()
    assert targets == np.roll(tokens, -1).tolist()  # every token a target exactly once
    assert all(s == shapes[0] for s in shapes)  # every rank takes the same steps with the same shapes
    longest = -(-n // (batch_size * world_size))
    assert [w for _, w in shapes[0]] == [seq_len] * (longest // seq_len) + ([longest % seq_len] if longest % seq_len else [])


def test_streams_resume_exactly():
    a = Streams(SPLIT, batch_size=3, seq_len=6)
    for _ in range(5):
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(8)]
    b = Streams(SPLIT, batch_size=3, seq_len=6)
    b.load_state_dict(state)
    for got, want in zip((b.next_batch() for _ in range(8)), expected):
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    with pytest.raises(DataError, match="cannot resume"):
        Streams(SPLIT, batch_size=2, seq_len=6).load_state_dict(state)


def test_loaders_read_memory_mapped_splits(tmp_path, monkeypatch):
    from memlm.data import prepare

    monkeypatch.setenv("MEMLM_CACHE", str(tmp_path / "cache"))
    (tmp_path / "c.txt").write_bytes(bytes(range(32, 127)) * 3)
    corpus = prepare(str(tmp_path / "c.txt"), fractions=(1, 0, 0))
    split = corpus.split("train")
    assert isinstance(split.tokens, np.memmap) and len(split) == 3 * 95 + 1
    x, y = RandomWindows(split, 2, 10).next_batch()
    assert torch.equal(y[:, :-1], x[:, 1:]) and x.dtype == torch.int64
    x, y, doc_start = Streams(split, 2, 10).next_batch()
    assert x[0].tolist() == list(range(32, 42)) and doc_start[:, 0].tolist() == [True, True]
