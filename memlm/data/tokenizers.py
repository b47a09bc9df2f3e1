"""Tokenizers beyond bytes: the `--tokenizer` spec, byte-level BPE training, and bytes per token.

    bytes      ids 0-255 are the UTF-8 bytes, 256 ends a document (`ByteTokenizer`, the default)
    bpe:N      a byte-level BPE of N tokens (Sennrich et al., "Neural Machine Translation of Rare
               Words with Subword Units", arXiv:1508.07909; GPT-2's byte-level variant), trained
               with the Hugging Face `tokenizers` library on the train split of the corpus, with
               ``<|eod|>`` as its end-of-document token (the vocabulary may come out smaller than
               N when the corpus offers fewer merges)
    hf:PATH    any local ``tokenizer.json`` of the `tokenizers` library; its end-of-document token
               is the first of `EOD_NAMES` it has, else ``<|eod|>`` is added to it

Every tokenizer speaks `Tokenizer`. Bits per byte stay comparable across tokenizers because
evaluation divides the nats of the scored targets by the bytes those targets stand for,
looked up per id in `byte_lengths()` (memlm.eval), not by the number of tokens. The
end-of-document token counts as one byte in every tokenizer (the byte tokenizer scores it as a
target too), so a byte model and a BPE model scored on the same documents divide by the same
byte count. For a byte-level tokenizer (bytes, bpe:N, and hf:PATH files whose pre-tokenizer or
decoder is ByteLevel) a token's bytes are exact; for other hf:PATH tokenizers they are read off
the token's text (``▁`` as a space, ``<0xNN>`` as byte NN, a ``##`` prefix dropped), and
`memlm.data.prepare` warns when a split's byte count differs from its documents'.

Documents are bytes; a non-byte tokenizer reads them as UTF-8 (invalid bytes become U+FFFD) and
encodes special-token text inside a document (a literal ``<|eod|>``) as plain text.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from .errors import DataError
from .tokenizer import EOD_TEXT, REPLACEMENT, ByteTokenizer

TOKENIZER_FILE = "tokenizer.json"
"""Name of a non-byte tokenizer's file beside a corpus cache, in a run and in its checkpoints."""
EOD_NAMES = (EOD_TEXT, "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "[SEP]")
"""Special tokens an hf:PATH tokenizer may already use to end a document, in order of preference."""
MIN_BPE = 257
"""Smallest bpe:N: the 256 byte tokens and ``<|eod|>``."""
UINT16_MAX_VOCAB = 65535
"""Token files are uint16 up to this vocabulary size, uint32 above it."""


@runtime_checkable
class Tokenizer(Protocol):
    """What memlm needs of a tokenizer (ByteTokenizer and HFTokenizer speak it)."""

    kind: str  # "byte", "bpe" or "hf"
    vocab_size: int
    eod: int  # id that ends a document
    eod_text: str  # what decode writes for eod

    def encode(self, text: str | bytes | memoryview, *, eod: bool = False, dtype=np.int64) -> np.ndarray: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def token_bytes(self, token: int) -> bytes:
        """The bytes id `token` stands for in text (b"" for special tokens, the EOD included)."""

    def byte_lengths(self) -> np.ndarray:
        """(vocab_size,) int64: the bytes each id counts for in bits per byte (EOD: 1)."""

    def describe(self) -> dict:
        """JSON description for manifests and run configs (kind, vocab_size, eod, dtype, ...)."""


def token_dtype(vocab_size: int) -> np.dtype:
    """Little-endian dtype of token files: uint16 up to 65,535 ids, uint32 above."""
    if vocab_size < 1 or vocab_size > 2 ** 32:
        raise DataError(f"a vocabulary of {vocab_size} tokens does not fit a token file")
    return np.dtype("<u2") if vocab_size <= UINT16_MAX_VOCAB else np.dtype("<u4")


def parse_spec(spec: str) -> tuple[str, str | int | None]:
    """("byte", None), ("bpe", N) or ("hf", PATH) of a --tokenizer spec; DataError when malformed."""
    kind, _, arg = spec.partition(":")
    if spec in ("bytes", "byte"):
        return "byte", None
    if kind == "bpe":
        if not arg.isdigit() or int(arg) < MIN_BPE:
            raise DataError(f"--tokenizer {spec!r}: bpe:N needs a vocabulary size N >= {MIN_BPE} "
                            f"(256 bytes and <|eod|>), e.g. bpe:8192")
        return "bpe", int(arg)
    if kind == "hf" and arg:
        return "hf", arg
    raise DataError(f"unknown --tokenizer {spec!r}: use bytes, bpe:N (a byte-level BPE of N tokens trained "
                    f"on the corpus) or hf:PATH (a local tokenizer.json)")


def _byte_decoder() -> dict[str, int]:
    """GPT-2's map from the printable character of each byte (ByteLevel pre-tokenizer) back to it."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


BYTE_DECODER = _byte_decoder()


def _uses_byte_level(node) -> bool:
    """Whether a tokenizer.json component (or a Sequence of them) is ByteLevel."""
    if isinstance(node, dict):
        return node.get("type") == "ByteLevel" or any(_uses_byte_level(v) for v in node.values())
    if isinstance(node, list):
        return any(_uses_byte_level(v) for v in node)
    return False


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise DataError("tokenizers other than bytes need the `tokenizers` library: pip install 'memlm[tok]'") \
            from None
    return tokenizers


class HFTokenizer:
    """A `tokenizers.Tokenizer` (bpe:N or hf:PATH) behind memlm's `Tokenizer` protocol."""

    def __init__(self, json_text: str, kind: str, spec: str):
        tokenizers = _import_tokenizers()
        try:
            self.backend = tokenizers.Tokenizer.from_str(json_text)
        except Exception as e:  # the Rust side raises plain Exceptions for bad files
            raise DataError(f"--tokenizer {spec}: not a tokenizer.json of the tokenizers library ({e})") from None
        self.kind, self.spec, self.eod_text = kind, spec, EOD_TEXT
        vocab = self.backend.get_vocab(with_added_tokens=True)
        name = next((n for n in EOD_NAMES if n in vocab), None)
        if name is None:  # no end-of-document token of its own: add ours
            self.backend.add_special_tokens([tokenizers.AddedToken(EOD_TEXT, special=True, normalized=False)])
            name = EOD_TEXT
        self.eod, self.eod_name = self.backend.token_to_id(name), name
        self.backend.encode_special_tokens = True  # "<|eod|>" inside a document is text, not the EOD id
        self.json = self.backend.to_str()
        self.sha256 = hashlib.sha256(self.json.encode()).hexdigest()
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)
        parsed = json.loads(self.json)
        self.byte_level = _uses_byte_level(parsed.get("pre_tokenizer")) or _uses_byte_level(parsed.get("decoder"))
        self._special = {t["id"] for t in parsed.get("added_tokens", []) if t.get("special")}
        self._lengths: np.ndarray | None = None

    def encode(self, text: str | bytes | memoryview, *, eod: bool = False, dtype=np.int64) -> np.ndarray:
        """Ids of `text` (bytes are read as UTF-8, invalid bytes as U+FFFD), shape (n,) (+1 with `eod`)."""
        if not isinstance(text, str):
            text = bytes(text).decode("utf-8", errors="replace")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return np.array(ids + [self.eod] if eod else ids, dtype)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a 1-D id sequence; EOD becomes `eod_text`, ids outside the vocabulary U+FFFD."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        parts, run = [], []
        for i in [*ids, None]:
            if i is not None and 0 <= i < self.vocab_size and i != self.eod:
                run.append(i)
                continue
            if run:
                parts.append(self.backend.decode(run, skip_special_tokens=False))
                run = []
            if i is not None:
                parts.append(self.eod_text if i == self.eod else REPLACEMENT)
        return "".join(parts)

    def token_bytes(self, token: int) -> bytes:
        if token in self._special or not 0 <= token < self.vocab_size:
            return b""
        piece = self.backend.id_to_token(token)
        if self.byte_level and all(c in BYTE_DECODER for c in piece):
            return bytes(BYTE_DECODER[c] for c in piece)
        match = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)  # byte fallback of SentencePiece-style models
        if match:
            return bytes([int(match.group(1), 16)])
        return piece.replace("\u2581", " ").removeprefix("##").encode("utf-8")

    def byte_lengths(self) -> np.ndarray:
        if self._lengths is None:
            lengths = np.array([len(self.token_bytes(i)) for i in range(self.vocab_size)], np.int64)
            lengths[self.eod] = 1
            self._lengths = lengths
        return self._lengths

    def describe(self) -> dict:
        return {"kind": self.kind, "spec": self.spec, "vocab_size": self.vocab_size, "eod": self.eod,
                "eod_token": self.eod_name, "dtype": token_dtype(self.vocab_size).name, "file": TOKENIZER_FILE,
                "sha256": self.sha256}

    def save(self, directory: str | Path) -> Path:
        """Write the tokenizer.json into `directory`; its path."""
        path = Path(directory) / TOKENIZER_FILE
        path.write_text(self.json)
        return path


def train_bpe(vocab_size: int, texts: Iterator[str]) -> HFTokenizer:
    """A byte-level BPE of at most `vocab_size` tokens (``<|eod|>`` is id 0, then the 256 bytes,
    then the merges) learnt from `texts`, streamed."""
    tokenizers = _import_tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, trainers
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    return HFTokenizer(backend.to_str(), "bpe", f"bpe:{vocab_size}")


def read_tokenizer_file(path: str | Path, spec: str | None = None, kind: str = "hf") -> HFTokenizer:
    """The hf:PATH tokenizer of a tokenizer.json file (or a directory holding one); `kind` "bpe"
    for a trained bpe:N read back."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / TOKENIZER_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read the tokenizer {path}: {e.strerror or e}") from None
    return HFTokenizer(text, kind, spec or f"hf:{path}")


def make_tokenizer(spec: str, train_texts: Iterator[str] | None = None) -> Tokenizer:
    """The tokenizer of a --tokenizer spec; bpe:N is trained on `train_texts` (required then)."""
    kind, arg = parse_spec(spec)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "hf":
        return read_tokenizer_file(arg, spec)
    if train_texts is None:
        raise DataError(f"--tokenizer {spec} is trained on a corpus: give its texts")
    return train_bpe(arg, train_texts)


def load_tokenizer(directory: str | Path, description: dict | None) -> Tokenizer:
    """The tokenizer a manifest or run config describes (`describe()`), its file read from
    `directory` and checked against the recorded SHA-256. None or kind "byte": bytes."""
    if not description or description.get("kind", "byte") == "byte":
        return ByteTokenizer()
    path = Path(directory) / description.get("file", TOKENIZER_FILE)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read the tokenizer {path}: {e.strerror or e}") from None
    tokenizer = HFTokenizer(text, description["kind"], description.get("spec", description["kind"]))
    if description.get("sha256") not in (None, tokenizer.sha256):
        raise DataError(f"the tokenizer {path} differs from the one recorded with it (SHA-256 mismatch)")
    return tokenizer


def check_vocab(tokenizer: Tokenizer, vocab_size: int, where: str) -> None:
    """Raise DataError unless `tokenizer` has exactly the `vocab_size` ids of the model in `where`."""
    if tokenizer.vocab_size != vocab_size:
        raise DataError(f"the tokenizer ({describe_short(tokenizer)}) has {tokenizer.vocab_size} tokens but the "
                        f"model of {where} has vocab_size {vocab_size}: they must be the tokenizer it was trained "
                        f"with")


def describe_short(tokenizer: Tokenizer) -> str:
    return "bytes" if tokenizer.kind == "byte" else getattr(tokenizer, "spec", tokenizer.kind)
