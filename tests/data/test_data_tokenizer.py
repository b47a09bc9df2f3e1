"""Byte tokenizer: constants, round trip, and decoding of any id sequence."""

import numpy as np
import pytest
import torch

from memlm.data import EOD, VOCAB_SIZE, ByteTokenizer
from memlm.data.tokenizer import EOD_TEXT

TEXTS = ["", "hello world\n", "naïve café ☕ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "def f(x):\n\treturn x  # \x00 and \x7f\n"]


def test_constants():
    assert (EOD, VOCAB_SIZE) == (256, 257)
    assert (ByteTokenizer.eod, ByteTokenizer.vocab_size) == (EOD, VOCAB_SIZE)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == np.int64
    assert ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(torch.from_numpy(ids)) == text
    assert tok.decode(ids.tolist()) == text


def test_encode_bytes_eod_and_dtype():
    tok = ByteTokenizer()
    ids = tok.encode(b"\xff\x00a", eod=True, dtype=np.uint16)
    assert ids.dtype == np.uint16
    assert ids.tolist() == [255, 0, 97, EOD]
    assert tok.encode(memoryview(b"ab")).tolist() == [97, 98]


def test_decode_invalid_utf8_becomes_replacement():
    tok = ByteTokenizer()
    assert tok.decode([0xFF, 0x41]) == "\ufffdA"
    assert tok.decode([0xE2, 0x98]) == "\ufffd"  # truncated 3-byte character
    assert tok.decode([0xC3, 0xA9]) == "é"


def test_decode_eod_marker_and_custom_text():
    e1, e2 = "é".encode()
    assert ByteTokenizer().decode([104, 105, EOD, 106]) == f"hi{EOD_TEXT}j"
    assert ByteTokenizer(eod_text="\n").decode([104, EOD, EOD]) == "h\n\n"
    # EOD splits a multi-byte character: both halves are invalid on their own
    assert ByteTokenizer().decode([e1, EOD, e2]) == f"\ufffd{EOD_TEXT}\ufffd"


def test_decode_out_of_range_ids():
    tok = ByteTokenizer()
    assert tok.decode([-1, 257, 65, 10**30, 2**16]) == "\ufffd\ufffdA\ufffd\ufffd"
    assert tok.decode(torch.tensor([300, 66, -5])) == "\ufffdB\ufffd"
    assert tok.decode(np.array([], dtype=np.int64)) == ""
