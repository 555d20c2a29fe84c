"""Coordinator.Tokenize: a text's token ids as Generate encodes a text prompt."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from specpipe.v1 import coordinator_pb2


@dataclass(frozen=True, slots=True)
class Tokenized:
    token_ids: list[int]
    tokens: list[str]

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase, text: str, add_special_tokens: bool) -> Tokenized:
        ids = list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
        return cls(ids, list(tokenizer.convert_ids_to_tokens(ids)))

    def to_pb(self) -> coordinator_pb2.TokenizeResponse:
        return coordinator_pb2.TokenizeResponse(token_ids=self.token_ids, tokens=self.tokens)
