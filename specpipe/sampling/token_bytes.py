"""A tokenizer's vocabulary as the bytes each token stands for: what outlines-core builds structured output's
token automata over (specpipe/sampling/structured_output.py).

Byte-level BPE tokens (GPT-2's) spell bytes in a printable alphabet; SentencePiece's spell text with "\u2581"
for a space and fall back to "<0xNN>" for single bytes; an added token is its text. Special tokens are left
out but end-of-sequence, the automaton's end.
"""

from __future__ import annotations

import json
from functools import cache

from outlines_core import Vocabulary
from transformers import PreTrainedTokenizerBase

from specpipe.errors import InvalidArgumentError

__all__ = ["TokenSpeller", "token_bytes_vocabulary"]

SENTENCEPIECE_SPACE = "\u2581"


@cache
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (the printable character standing for each byte) -> the byte."""
    printable = [
        *range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)
    ]  # fmt: skip
    stands_for = dict(zip(printable, printable, strict=True))
    extra = 0
    for byte in range(256):
        if byte not in stands_for:
            stands_for[byte] = 256 + extra
            extra += 1
    return {chr(char): byte for byte, char in stands_for.items()}


def _token_bytes(token: str, byte_level: bool) -> bytes:
    if byte_level:
        decoder = _byte_level_decoder()
        return bytes(decoder[char] for char in token)
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        return bytes([int(token[3:5], 16)])  # SentencePiece's byte fallback
    return token.replace(SENTENCEPIECE_SPACE, " ").encode()


def _is_byte_level(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer's tokens spell bytes in GPT-2's alphabet: its decoder says so (a fast
    tokenizer's), else every token of its model's vocabulary is in the alphabet."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        decoder = json.loads(backend.to_str()).get("decoder") or {}
        kinds = [decoder.get("type"), *(part.get("type") for part in decoder.get("decoders") or [])]
        return "ByteLevel" in kinds
    added = tokenizer.get_added_vocab()
    modelled = "".join(token for token in tokenizer.get_vocab() if token not in added)
    return set(modelled) <= _byte_level_decoder().keys()


def token_bytes_vocabulary(tokenizer: PreTrainedTokenizerBase) -> Vocabulary:
    """The tokenizer's vocabulary as the bytes each token stands for (byte-level BPE as GPT-2's, or
    SentencePiece's with its byte fallback; an added token is its text), special tokens left out but
    end-of-sequence (the automaton's end)."""
    if tokenizer.eos_token_id is None:
        raise InvalidArgumentError("structured output needs a tokenizer with an end-of-sequence token")
    byte_level = _is_byte_level(tokenizer)
    added = tokenizer.get_added_vocab()
    special = set(tokenizer.all_special_ids)
    by_bytes: dict[bytes, list[int]] = {}
    for token, token_id in tokenizer.get_vocab().items():
        if token_id in special:
            continue
        encoded = token.encode() if token in added else _token_bytes(token, byte_level)
        if encoded:
            by_bytes.setdefault(encoded, []).append(token_id)
    return Vocabulary(tokenizer.eos_token_id, by_bytes)


class TokenSpeller:
    """Each token id's own bytes and text, as log-probs report them (OpenAI's `token` and `bytes`): the
    bytes it stands for in the vocabulary, so a SentencePiece token keeps its leading space and a token
    holding part of a character its exact bytes (`tokenizer.decode([id])` drops the first and garbles the
    second). Added and special tokens are their text."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.byte_level = _is_byte_level(tokenizer)
        self.as_text = set(tokenizer.get_added_vocab().values()) | set(tokenizer.all_special_ids)

    def bytes_of(self, token_id: int) -> bytes:
        token = self.tokenizer.convert_ids_to_tokens(token_id)
        if token_id in self.as_text or not isinstance(token, str):
            return str(self.tokenizer.decode([token_id])).encode()
        try:
            return _token_bytes(token, self.byte_level)
        except KeyError:  # a character outside GPT-2's alphabet in a byte-level vocabulary
            return str(self.tokenizer.decode([token_id])).encode()

    def text_of(self, token_id: int) -> str:
        return self.bytes_of(token_id).decode("utf-8", errors="replace")
