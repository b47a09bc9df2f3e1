"""Streaming generation (memlm.decode.stream): the ids `memlm.generate` samples, one at a time,
stop ids, and text pieces that end before a stop string."""

import pytest
import torch

import memlm
from memlm.data import EOD, ByteTokenizer
from memlm.decode.streaming import TextStream, stream
from memlm.train.sample import sample_text
from tests.conftest import tiny_overrides


@pytest.mark.parametrize("preset,decode", [("seed-tiny", "eager"), ("seed-tiny", "static"),
                                           ("seed-xl-tiny", "eager"), ("seed-xl-tiny", "static")])
def test_stream_yields_what_generate_samples(preset, decode):
    model = memlm.build(preset, **tiny_overrides(seq_len=16)).eval()
    prompt = torch.randint(0, 256, (5,))
    expected = memlm.generate(model, prompt, 40, temperature=1.0, top_k=50,
                              generator=torch.Generator().manual_seed(7), decode="eager")[5:].tolist()
    got = list(stream(model, prompt, 40, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(7),
                      decode=decode))
    assert got == expected  # past two segments of 16: the XL memory rolled on both paths


def test_a_stop_id_ends_the_stream_unyielded():
    model = memlm.build("seed-tiny", **tiny_overrides()).eval()
    prompt = torch.randint(0, 256, (4,))
    full = list(stream(model, prompt, 30, temperature=0))
    stop = full[10]
    first = full.index(stop)
    assert list(stream(model, prompt, 30, temperature=0, stop_ids=[stop])) == full[:first]
    with pytest.raises(ValueError, match="one stream"):
        next(stream(model, prompt[None], 3))


def text_of(stream_, pieces):
    """Feed the byte ids of each piece in turn; the released texts, then finish()."""
    out = [stream_.feed(list(piece.encode()) if isinstance(piece, str) else piece) for piece in pieces]
    return out + [stream_.finish()]


def test_text_stream_ends_before_a_stop_string_split_across_tokens():
    released = text_of(TextStream(["END"]), ["ab", "cE", "N", "Dxyz", "more"])
    assert released == ["ab", "c", "", "", "", ""]  # "E" and "EN" are held: they may begin "END"
    assert "".join(released) == "abc"


def test_text_stream_releases_a_held_prefix_that_did_not_become_a_stop_string():
    s = TextStream(["END", "\n\n"])
    assert s.feed(list(b"xEN")) == "x"
    assert s.feed(list(b"y\n")) == "ENy"  # "EN" + "y" is no stop string; "\n" may begin "\n\n"
    assert s.finish() == "\n" and not s.stopped


def test_text_stream_keeps_utf8_characters_whole_and_writes_eod():
    data = "é€😀".encode()  # 2 + 3 + 4 bytes
    s = TextStream()
    released = [s.feed([b]) for b in data]
    assert released == ["", "é", "", "", "€", "", "", "", "😀"]
    assert s.feed([EOD]) == "<|eod|>"
    assert TextStream().feed(list(b"\xff") + [EOD]) == ByteTokenizer().decode([255, EOD])  # invalid -> U+FFFD


def test_sample_text_stops_and_streams_what_it_returns():
    model = memlm.build("seed-tiny", **tiny_overrides()).eval()
    full, full_ids = sample_text(model, "ab", 60, temperature=1.0, seed=3)
    assert full == ByteTokenizer().decode(full_ids) and len(full_ids) == 60
    stop = full[20:22]
    pieces = []
    text, ids = sample_text(model, "ab", 60, temperature=1.0, seed=3, stop_strings=[stop], on_text=pieces.append)
    assert text == full[:full.index(stop)] == "".join(pieces)
    assert ids == full_ids[:len(ids)] and len(ids) < 60  # decoding stopped at the stop string
    eod_model = memlm.build("seed-tiny", **tiny_overrides()).eval()
    with torch.no_grad():
        eod_model.head.weight.zero_()
        eod_model.head.weight[EOD] = 1.0  # the end-of-document token always wins
        eod_model.embed.weight.abs_()
    assert sample_text(eod_model, "x", 10, temperature=0, stop_at_eod=True) == ("", [])
    assert sample_text(eod_model, "x", 3, temperature=0)[1] == [EOD] * 3


def test_text_stream_decodes_a_bpe_through_its_token_bytes():
    tokenizers = pytest.importorskip("tokenizers", reason="the tok extra (tokenizers) is not installed")
    assert tokenizers
    from memlm.data import make_tokenizer
    bpe = make_tokenizer("bpe:300", iter(["hello world\n" * 3] * 10))  # merges of ASCII only
    text = "hello 日本語 😀 world\n"
    ids = bpe.encode(text).tolist()
    assert len(ids) < len(text.encode()) and len(bpe.token_bytes(ids[-5])) == 1  # 😀's 4 bytes, one token each
    s = TextStream([" world\n"], tokenizer=bpe)
    pieces = [s.feed([i]) for i in ids]
    assert "".join(pieces) + s.finish() == "hello 日本語 😀" and "" in pieces  # characters whole, ended at the stop
    s = TextStream(tokenizer=bpe)
    assert s.feed(ids[:3] + [bpe.eod]) + s.finish() == bpe.decode(ids[:3]) + "<|eod|>"
