"""memlm.data: corpora tokenised once into cached split files (bytes by default, or a BPE /
tokenizer.json: memlm.data.tokenizers), and batch loaders.

    corpus = prepare("stdlib")                      # or a file, directory, archive, or several
    corpus.manifest                                 # what was built (also manifest.json)
    train = corpus.split("train")                   # TokenSplit: .tokens (N,) uint16, .doc_starts (D,) int64
    x, y = RandomWindows(train, 8, 256).next_batch()                 # models without memory
    x, y, doc_start = Streams(train, 8, 256).next_batch()            # models with memory
    for x, y, doc_start, valid in Streams(val, 8, 256, wrap=False):  # evaluation: every token once

Bad input raises `DataError` with a one-line message.
"""

from .cache import PreparedCorpus, TokenSplit, default_cache_dir, prepare
from .errors import DataError
from .loaders import RandomWindows, Segment, SegmentStreams, Streams
from .splits import DEFAULT_FRACTIONS, SPLITS, assign_split
from .tokenizer import EOD, VOCAB_SIZE, ByteTokenizer
from .tokenizers import HFTokenizer, Tokenizer, make_tokenizer, token_dtype

__all__ = [
    "DEFAULT_FRACTIONS",
    "EOD",
    "SPLITS",
    "VOCAB_SIZE",
    "ByteTokenizer",
    "HFTokenizer",
    "Tokenizer",
    "DataError",
    "PreparedCorpus",
    "RandomWindows",
    "Segment",
    "SegmentStreams",
    "Streams",
    "TokenSplit",
    "assign_split",
    "default_cache_dir",
    "make_tokenizer",
    "prepare",
    "token_dtype",
]
