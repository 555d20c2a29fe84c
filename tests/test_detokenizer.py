"""Tests for specpipe.text.detokenizer.IncrementalDetokenizer."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from specpipe.models.tiny_pair import TinyPairSpec, train_tokenizer
from specpipe.text.detokenizer import IncrementalDetokenizer

FFFD = "\ufffd"
TEXTS = (
    "def foo(x):\n    return x + 1\n\nclass Bar:\n    pass\n",
    "naïve café — 日本語のテキスト, emoji 🙂, Ünïcödé",
    "東京 🚀🚀 Größe\n\tsmörgåsbord déjà vu русский Ελληνικά",
    "ascii then 日本 then ascii 🙂",
)


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return train_tokenizer(TinyPairSpec())


@pytest.fixture(scope="module")
def metaspace_tok() -> PreTrainedTokenizerFast:
    """A SentencePiece-style tokenizer whose decoder strips the first token's leading space."""
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    raw.decoder = decoders.Metaspace(prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"], show_progress=False)
    raw.train_from_iterator(list(TEXTS) * 2, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="<unk>", eos_token="</s>", clean_up_tokenization_spaces=False
    )


def random_chunks(ids: Sequence[int], rng: random.Random, max_size: int = 5) -> list[list[int]]:
    chunks, i = [], 0
    while i < len(ids):
        n = rng.randint(0, max_size)  # 0: an empty push must be harmless
        chunks.append(list(ids[i : i + n]))
        i += n
    return chunks


def stream(det: IncrementalDetokenizer, chunks: Sequence[Sequence[int]]) -> list[str]:
    return [det.push(c) for c in chunks] + [det.finish()]


def decode(tok: PreTrainedTokenizerFast, ids: Sequence[int], skip: bool = True) -> str:
    return tok.decode(list(ids), skip_special_tokens=skip, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("text", TEXTS)
def test_random_splits_match_decode(tok: PreTrainedTokenizerFast, text: str) -> None:
    ids = tok(text)["input_ids"]
    expected = decode(tok, ids)
    assert expected == text
    for seed in range(30):
        det = IncrementalDetokenizer(tok)
        deltas = stream(det, random_chunks(ids, random.Random(seed)))
        assert "".join(deltas) == expected
        assert det.text == expected
        assert not det.stopped and det.stop_token_index is None


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tok: PreTrainedTokenizerFast, skip: bool) -> None:
    eos = tok.eos_token_id
    ids = tok("a 日本")["input_ids"] + [eos] + tok("語 b")["input_ids"] + [eos]
    expected = decode(tok, ids, skip)
    assert ("<|endoftext|>" in expected) is not skip
    for seed in range(20):
        det = IncrementalDetokenizer(tok, skip_special_tokens=skip)
        assert "".join(stream(det, random_chunks(ids, random.Random(seed)))) == expected


def test_context_dependent_decoder(metaspace_tok: PreTrainedTokenizerFast) -> None:
    # Decoding each chunk alone would drop the spaces between words; the window keeps them.
    for text in TEXTS:
        ids = metaspace_tok(text)["input_ids"]
        expected = decode(metaspace_tok, ids)
        for seed in range(20):
            det = IncrementalDetokenizer(metaspace_tok)
            assert "".join(stream(det, random_chunks(ids, random.Random(seed), 3))) == expected


def test_random_ids_with_invalid_utf8(tok: PreTrainedTokenizerFast) -> None:
    # Random ids, many of them single bytes of multi-byte characters: lone, truncated or invalid
    # sequences must come out exactly as a one-shot decode renders them.
    byte_ids = [i for i in range(len(tok)) if FFFD in decode(tok, [i])]
    assert byte_ids
    for seed in range(200):
        rng = random.Random(seed)
        ids = [rng.choice(byte_ids) if rng.random() < 0.6 else rng.randrange(len(tok)) for _ in range(30)]
        skip = seed % 2 == 0
        det = IncrementalDetokenizer(tok, skip_special_tokens=skip)
        assert "".join(stream(det, random_chunks(ids, rng))) == decode(tok, ids, skip)


def test_split_multibyte_chars_never_stream_replacement(tok: PreTrainedTokenizerFast) -> None:
    text = "日本語のテキスト 🙂 Ünïcödé"
    ids = tok(text)["input_ids"]
    # Precondition: some characters really are split across tokens.
    assert any(FFFD in decode(tok, [i]) for i in ids)
    det = IncrementalDetokenizer(tok)
    for i in ids:
        assert FFFD not in det.push([i])
    assert det.finish() == ""
    assert det.text == text


def test_a_stop_string_completed_by_the_final_flush_stops(tok: PreTrainedTokenizerFast) -> None:
    ids = tok("ok 🙂")["input_ids"][:-1]  # cut inside the emoji's bytes: only the flush releases its text
    det = IncrementalDetokenizer(tok, stop=["k " + FFFD])
    assert det.push(ids) == "" and not det.stopped  # all held: the text ends in an incomplete character
    assert det.finish() == "o" and det.stopped and det.text == "o"
    k = det.stop_token_index
    assert k is not None and k < len(ids) and "k " + FFFD in decode(tok, ids[:k])


def test_finish_flushes_incomplete_char(tok: PreTrainedTokenizerFast) -> None:
    ids = tok("ok 🙂")["input_ids"][:-1]  # cut inside the emoji's bytes
    expected = decode(tok, ids)
    assert expected.endswith(FFFD)
    det = IncrementalDetokenizer(tok)
    pushed = "".join(det.push([i]) for i in ids)
    assert FFFD not in pushed
    tail = det.finish()
    assert tail.endswith(FFFD)
    assert pushed + tail == expected
    assert det.finish() == ""
    with pytest.raises(RuntimeError):
        det.push([1])


def check_stop(tok: PreTrainedTokenizerFast, text: str, stop: str, max_chunk: int = 4) -> None:
    """Streams ``text`` in random chunks and checks cut point, stop_token_index and held-back prefixes."""
    ids = tok(text)["input_ids"]
    cut = text.index(stop)
    for seed in range(20):
        det = IncrementalDetokenizer(tok, stop=[stop])
        pushed: list[int] = []
        for chunk in random_chunks(ids, random.Random(seed), max_chunk):
            det.push(chunk)
            pushed += chunk
            if det.stopped:
                break
            # Never send a suffix that could still become the stop string.
            so_far = decode(tok, pushed)
            for n in range(1, len(stop)):
                if so_far.endswith(stop[:n]):
                    assert len(det.text) <= len(so_far) - n
        assert det.stopped
        assert det.push(ids) == "" and det.finish() == ""
        assert det.text == text[:cut]
        k = det.stop_token_index
        assert k is not None and k <= len(pushed)
        assert stop in decode(tok, ids[:k]) and stop not in decode(tok, ids[: k - 1])


def test_stop_single_token(tok: PreTrainedTokenizerFast) -> None:
    text = "x = 1\n    return x\ny = 2"
    ids = tok(text)["input_ids"]
    stop = next(s for s in (decode(tok, [i]) for i in ids) if s.strip() == "return")
    assert len(stop) > 1
    check_stop(tok, text, stop)


def test_stop_spanning_tokens(tok: PreTrainedTokenizerFast) -> None:
    text = "def foo(x):\n    foo(x) + foo(y) + bar\n"
    stop = "foo(y)"
    assert len(tok(stop)["input_ids"]) > 1
    check_stop(tok, text, stop)


def test_stop_with_multibyte_chars(tok: PreTrainedTokenizerFast) -> None:
    check_stop(tok, "ascii 日本語のテキスト tail", "語のテ", max_chunk=2)


def test_stop_at_very_beginning(tok: PreTrainedTokenizerFast) -> None:
    ids = tok("STOP and more")["input_ids"]
    det = IncrementalDetokenizer(tok, stop=["STOP"])
    out = [det.push([i]) for i in ids]
    assert out == [""] * len(ids)
    assert det.stopped and det.text == "" and det.finish() == ""
    k = det.stop_token_index
    assert k is not None and decode(tok, ids[:k]).startswith("STOP")
    assert not decode(tok, ids[: k - 1]).startswith("STOP")


def test_earliest_of_several_stops_wins(tok: PreTrainedTokenizerFast) -> None:
    ids = tok("one two three four")["input_ids"]
    det = IncrementalDetokenizer(tok, stop=["four", "two", "thr"])
    assert det.push(ids) == "one "
    assert det.stopped


def test_the_stop_string_can_end_the_text(tok: PreTrainedTokenizerFast) -> None:
    ids = tok("one two three two four")["input_ids"]
    for chunk in (1, len(ids)):
        det = IncrementalDetokenizer(tok, stop=["two", "thr"], include_stop=True)
        sent = "".join(det.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk))
        assert sent == det.text == "one two" and det.stopped, chunk


def test_unfinished_stop_prefix_is_flushed(tok: PreTrainedTokenizerFast) -> None:
    ids = tok("abc foo(")["input_ids"]
    det = IncrementalDetokenizer(tok, stop=["foo(y)"])
    assert det.push(ids) == "abc "
    assert det.finish() == "foo("
    assert not det.stopped and det.stop_token_index is None
    assert det.text == "abc foo("


def test_held_prefix_released_when_stop_diverges(tok: PreTrainedTokenizerFast) -> None:
    det = IncrementalDetokenizer(tok, stop=["foo(y)"])
    assert det.push(tok("a foo(")["input_ids"]) == "a "
    assert det.push(tok("x) b")["input_ids"]) == "foo(x) b"


def test_empty_stop_rejected(tok: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError):
        IncrementalDetokenizer(tok, stop=[""])


def test_stops_before_the_minimum_are_text(tok: PreTrainedTokenizerFast) -> None:
    """min_tokens: a stop string completed by fewer tokens than stops_from_token is sent as text, and the
    stream stops at the next one completed later, wherever the pushes split the ids."""
    text = "a = foo(x)\nb = foo(y)\nc = 3"
    ids = tok(text)["input_ids"]
    first_end = next(k for k in range(1, len(ids) + 1) if "foo(" in decode(tok, ids[:k]))
    for seed in range(10):
        det = IncrementalDetokenizer(tok, stop=["foo("], stops_from_token=first_end + 1)
        for chunk in random_chunks(ids, random.Random(seed)):
            det.push(chunk)
        assert det.stopped and det.text == "a = foo(x)\nb = ", seed
        k = det.stop_token_index
        assert k is not None and k > first_end and decode(tok, ids[:k]).count("foo(") == 2
    # At the minimum itself the first one stops, as without it.
    det = IncrementalDetokenizer(tok, stop=["foo("], stops_from_token=first_end)
    det.push(ids)
    assert det.text == "a = " and det.stop_token_index == first_end


def test_a_stop_overlapping_an_early_one_still_stops(tok: PreTrainedTokenizerFast) -> None:
    """An early "foo(" sent as text must not hide a "(x)" that starts inside it and completes later."""
    text = "a = foo(x) + 1"
    ids = tok(text)["input_ids"]
    completes = {
        stop: next(k for k in range(1, len(ids) + 1) if stop in decode(tok, ids[:k]))
        for stop in ("foo(", "(x)")
    }
    assert completes["(x)"] > completes["foo("]
    for seed in range(10):
        det = IncrementalDetokenizer(tok, stop=["foo(", "(x)"], stops_from_token=completes["(x)"])
        for chunk in random_chunks(ids, random.Random(seed)):
            det.push(chunk)
        assert det.stopped and det.text == "a = foo" and det.stop_token_index == completes["(x)"], seed
