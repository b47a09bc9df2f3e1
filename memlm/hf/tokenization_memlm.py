"""Hugging Face tokenizer of an exported memlm model (remote code for `trust_remote_code=True`).

memlm models read bytes: ids 0-255 are the UTF-8 bytes of the text and 256 ends a document
(`<|eod|>`, memlm.data.tokenizer). This tokenizer needs no vocabulary file and no memlm; it
puts `<|eod|>` before each text (add_bos_token, as `memlm generate` feeds a prompt: it starts a
document), and decodes invalid UTF-8 as U+FFFD. The literal text `<|eod|>` in an input encodes
as the end-of-document id, as special tokens do in Hugging Face tokenizers.
"""

from __future__ import annotations

from transformers import AddedToken, PreTrainedTokenizer

EOD, EOD_TEXT = 256, "<|eod|>"


class MemlmByteTokenizer(PreTrainedTokenizer):
    """Bytes of UTF-8 (ids 0-255) and `<|eod|>` = 256, which is the bos, eos and pad token."""

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, bos_token: str = EOD_TEXT, eos_token: str = EOD_TEXT, pad_token: str = EOD_TEXT,
                 add_bos_token: bool = True, **kwargs) -> None:
        self._added_tokens_decoder = {EOD: AddedToken(EOD_TEXT, special=True, normalized=False)}
        self.add_bos_token = add_bos_token
        kwargs.pop("unk_token", None)
        super().__init__(bos_token=bos_token, eos_token=eos_token, pad_token=pad_token,
                         add_bos_token=add_bos_token, **kwargs)

    @property
    def vocab_size(self) -> int:
        return 256  # the bytes; <|eod|> is the one added token

    def get_vocab(self) -> dict[str, int]:
        vocab = {chr(i): i for i in range(256)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [chr(byte) for byte in text.encode("utf-8")]  # one token per byte: chr(byte value)

    def _convert_token_to_id(self, token: str) -> int:
        return ord(token) if len(token) == 1 and ord(token) < 256 else EOD

    def _convert_id_to_token(self, index: int) -> str:
        return chr(index) if 0 <= index < 256 else EOD_TEXT

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        data = bytearray()
        for token in tokens:
            data += token.encode("utf-8") if token == EOD_TEXT or len(token) != 1 else bytes([ord(token) % 256])
        return data.decode("utf-8", errors="replace")

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None
                                         ) -> list[int]:
        bos = [EOD] if self.add_bos_token else []
        return bos + token_ids_0 + ([] if token_ids_1 is None else bos + token_ids_1)

    def get_special_tokens_mask(self, token_ids_0: list[int], token_ids_1: list[int] | None = None,
                                already_has_special_tokens: bool = False) -> list[int]:
        if already_has_special_tokens:
            return [int(i == EOD) for i in token_ids_0 + (token_ids_1 or [])]
        bos = [1] if self.add_bos_token else []
        return bos + [0] * len(token_ids_0) + ([] if token_ids_1 is None else bos + [0] * len(token_ids_1))

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        return ()  # no vocabulary file: the bytes are the vocabulary


__all__ = ["MemlmByteTokenizer"]
