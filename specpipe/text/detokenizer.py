"""Incremental detokenization for streaming, where each step may add several tokens.

Decodes a sliding window of recent ids (the vLLM/TGI ``prefix_offset``/``read_offset`` technique), holds
back text that ends in an incomplete UTF-8 character (U+FFFD) and any suffix that could start a stop
string, and cuts the stream right before the first stop string.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

logger = logging.getLogger(__name__)

REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    """The part of a Hugging Face tokenizer this module uses."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = ..., **kwargs: object) -> str: ...


class IncrementalDetokenizer:
    """Turns pushed token ids into text deltas that are safe to send to a client.

    Without stop strings, ``"".join(push(...) results) + finish()`` equals decoding all pushed ids at once,
    however the ids were split into pushes.
    """

    def __init__(
        self,
        tokenizer: Decoder,
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
        stops_from_token: int = 0,
        include_stop: bool = False,
    ) -> None:
        if isinstance(stop, str):
            stop = (stop,)
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._tokenizer = tokenizer
        self._stop = tuple(stop)
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        # ids[prefix_offset:read_offset] decode to text already released; decoding from prefix_offset
        # rather than read_offset gives decoders that look at neighbours (e.g. a leading-space strip)
        # the context they need.
        self._prefix_offset = 0
        self._read_offset = 0
        self._text = ""  # sent to the caller
        self._pending = ""  # released by the decoder but held back: it may start a stop string
        self._finished = False
        self._stop_token_index: int | None = None
        self._stop_string: str | None = None  # the stop string found: stopped once it is set
        # A stop string completed by fewer pushed tokens than this is text like any other (min_tokens: vLLM
        # does not check stop strings before the output holds that many tokens).
        self._stops_from_token = stops_from_token
        self._early_stops: set[tuple[int, str]] = set()  # (text offset, stop) of those sent as text
        self._include_stop = include_stop  # the text sent ends with the stop string rather than before it

    @property
    def stopped(self) -> bool:
        """True once a stop string has appeared; the text sent ends right before it (or with it)."""
        return self._stop_string is not None

    @property
    def stop_token_index(self) -> int | None:
        """How many of the pushed tokens it took to produce the stop string (None before a stop)."""
        return self._stop_token_index

    @property
    def stop_string(self) -> str | None:
        """The stop string that stopped the text (None before a stop)."""
        return self._stop_string

    @property
    def text(self) -> str:
        """Everything returned by push() and finish() so far."""
        return self._text

    def push(self, token_ids: Sequence[int]) -> str:
        """Adds generated ids; returns the text delta that is now safe to send (maybe "")."""
        if self._finished:
            raise RuntimeError("push() after finish()")
        if self.stopped or len(token_ids) == 0:
            return ""
        read_before = self._read_offset
        self._ids.extend(int(t) for t in token_ids)
        self._pending += self._release(final=False)
        return self._emit(final=False, read_before=read_before)

    def finish(self) -> str:
        """Ends the stream: returns the held-back text, including an incomplete trailing character."""
        if self._finished or self.stopped:
            self._finished = True
            return ""
        read_before = self._read_offset
        self._pending += self._release(final=True)
        out = self._emit(final=True, read_before=read_before)
        self._finished = True
        return out

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(
            ids, skip_special_tokens=self._skip_special, clean_up_tokenization_spaces=False
        )

    def _release(self, final: bool) -> str:
        """New decoder text since read_offset; "" while it ends in an incomplete character."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if not final and (len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR)):
            # Nothing visible yet, or a multi-byte character is still incomplete: wait for more ids.
            return ""
        if new_text.startswith(prefix_text):
            delta = new_text[len(prefix_text) :]
        else:
            # The window decoded differently with more context; fall back to the full text (O(n), rare).
            logger.debug("window decode is not prefix-stable; re-decoding everything")
            delta = self._decode(self._ids)[len(self._text) + len(self._pending) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return delta

    def _emit(self, final: bool, read_before: int) -> str:
        """Sends pending text up to a stop string, or all of it but a possible stop-string start."""
        while (hit := self._find_stop()) is not None:
            start, stop = hit
            # Every hit is early while fewer tokens than that were pushed (no re-decode needed).
            early = len(self._ids) < self._stops_from_token
            tokens = 0 if early else self._tokens_for(len(self._text) + start, stop, read_before)
            if early or tokens < self._stops_from_token:
                # Too early to stop: text like any other, and the search goes on, past this one only (a
                # later stop string may overlap it).
                self._early_stops.add((len(self._text) + start, stop))
                continue
            out = self._pending[: start + len(stop) if self._include_stop else start]
            self._text += out
            self._pending = ""
            self._stop_token_index = tokens
            self._stop_string = stop
            return out
        keep = 0 if final else self._stop_prefix_len(self._pending)
        cut = len(self._pending) - keep
        out, self._pending = self._pending[:cut], self._pending[cut:]
        self._text += out
        return out

    def _find_stop(self) -> tuple[int, str] | None:
        # Only pending text can contain a stop: sent text never ends with the start of one.
        best: tuple[int, str] | None = None
        sent = len(self._text)
        for stop in self._stop:
            i = self._pending.find(stop)
            while i >= 0 and (sent + i, stop) in self._early_stops:
                i = self._pending.find(stop, i + 1)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, stop)
        return best

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _tokens_for(self, start: int, stop: str, read_before: int) -> int:
        """Smallest number of pushed ids whose decoded text contains ``stop`` at char ``start``."""
        end = start + len(stop)
        # The text of ids[:read_before] was released before this call and held no stop (but early ones), so
        # the answer is later; this full re-decode runs once per stream at the stop, and for an early stop
        # string only in the push that reaches min_tokens.
        for k in range(read_before + 1, len(self._ids) + 1):
            text = self._decode(self._ids[:k])
            if len(text) >= end and text[start:end] == stop:
                return k
        return len(self._ids)
