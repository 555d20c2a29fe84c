"""Coordinator.Tokenize: a text's token ids as Generate encodes a text prompt.

The tokenizer runs on the event loop, as a Generate prompt's does, so a text longer than any prompt could be
is refused before it is encoded: MAX_CHARS_PER_TOKEN characters per context position is far beyond any
tokenizer's average (~4 for English BPE), and encoding a 0.7 MB text took 0.55 s that every stream waited.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from specpipe.errors import InvalidArgumentError
from specpipe.sampling.params import MAX_BAD_WORD_TOKENS
from specpipe.v1 import coordinator_pb2

MAX_CHARS_PER_TOKEN = 32


@dataclass(frozen=True, slots=True)
class Tokenized:
    token_ids: list[int]
    tokens: list[str]

    @classmethod
    def of(
        cls, tokenizer: PreTrainedTokenizerBase, text: str, add_special_tokens: bool, max_context: int
    ) -> Tokenized:
        check_length(text, max_context)
        ids = list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
        return cls(ids, list(tokenizer.convert_ids_to_tokens(ids)))

    def to_pb(self) -> coordinator_pb2.TokenizeResponse:
        return coordinator_pb2.TokenizeResponse(token_ids=self.token_ids, tokens=self.tokens)


def check_length(text: str, max_context: int, field: str = "text") -> None:
    """INVALID_ARGUMENT, before encoding it, for a text too long to be a prompt of a max_context model."""
    if len(text) > MAX_CHARS_PER_TOKEN * max_context:
        raise InvalidArgumentError(
            f"{field} too long: {len(text)} characters cannot fit the target context of {max_context} tokens"
        )


def encode_bad_words(tokenizer: PreTrainedTokenizerBase, words: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """GenerateRequest.bad_words as token sequences (SamplingParams.bad_words), as vLLM encodes them: each
    word as it reads at the start of the text, and after a space where that is another token sequence of
    the same length (so "dog" bans both "dog" and " dog", and a word that a space splits differently is
    banned as it reads at the start only, as there)."""
    encoded: list[tuple[int, ...]] = []
    for index, word in enumerate(words):
        check_length(word, MAX_BAD_WORD_TOKENS, f"bad_words[{index}]")
        bare = tuple(tokenizer.encode(word.lstrip(), add_special_tokens=False))
        spaced = tuple(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        if not bare or len(bare) > MAX_BAD_WORD_TOKENS:
            raise InvalidArgumentError(
                f"bad_words[{index}] must encode to 1..{MAX_BAD_WORD_TOKENS} tokens, got {len(bare)}"
            )
        encoded.append(bare)
        if spaced[0] != bare[0] and len(spaced) == len(bare):
            encoded.append(spaced)
    return tuple(encoded)
