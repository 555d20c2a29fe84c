"""Allowed token ids and bad words (`SamplingParams.allowed_token_ids`, `bad_words`, and
`GenerateRequest.bad_words` as text): the masks by hand, the request fields, then through the real services,
where greedy output must equal Hugging Face's `generate` with the same masks as logits processors, the
coupled rule's seeded tokens must not depend on k, and sampled first tokens follow the masked target."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

from coordinator.tokenization import encode_bad_words
from specpipe.client import CoordinatorClient, build_request
from specpipe.errors import FailedPreconditionError, InvalidArgumentError
from specpipe.sampling.adjustments import adjust_logits
from specpipe.sampling.allowed_tokens import allow_only
from specpipe.sampling.bad_words import ban_bad_words
from specpipe.sampling.params import MAX_ALLOWED_TOKEN_IDS, MAX_BAD_WORD_TOKENS, SamplingParams
from specpipe.speculation.rounds import Verification
from tests.conftest import Pipeline
from tests.prompts import PROMPTS
from tests.reference import target_alone
from tests.rounds import refused_round
from tests.sampling_checks import assert_distributed_as, coupled_outputs_for_each_k, first_tokens
from tests.test_metrics import scrape, value

MAX_NEW_TOKENS = 24
INF = float("-inf")


def test_only_the_allowed_ids_keep_their_logits_in_every_row() -> None:
    logits = torch.arange(12, dtype=torch.float32).reshape(2, 6)  # [2, 6]
    allowed = allow_only(logits, (4, 1, 99))  # 99 is past the vocabulary: left out
    assert allowed.tolist() == [[INF, 1.0, INF, INF, 4.0, INF], [INF, 7.0, INF, INF, 10.0, INF]]


def test_a_bad_word_is_banned_where_the_output_before_it_would_complete_it() -> None:
    logits = torch.zeros(4, 8)  # [4, 8]: rows score the positions after history + block[:i]
    history = [5, 1, 2, 7]  # the prompt is [5, 1]: the output starts at 2
    block = [1, 2, 3]
    sampling = SamplingParams(output_start=2, bad_words=((6,), (1, 2, 3), (7, 1), (5, 1, 4)))
    banned = ban_bad_words(logits, history, block, sampling)
    # Row 0 follows [2, 7] (output): 6 everywhere, and 7 -> 1 bans 1. Row 1 follows [.., 7, 1]. Row 2 follows
    # [.., 1, 2]: 1 2 -> 3. Row 3 follows [.., 2, 3]. (5 1 -> 4 matches the prompt only: never banned.)
    assert [torch.isinf(row).nonzero().flatten().tolist() for row in banned] == [[1, 6], [6], [3, 6], [6]]
    # The draft's step after the whole sequence: the same as the verify's last row.
    step = ban_bad_words(logits[:1], [*history, *block[:2]], (), sampling)
    assert torch.equal(step[0], banned[2])
    # A prefix reaching back before output_start does not match.
    assert torch.isfinite(ban_bad_words(logits[:1], [5, 1], (), sampling)[0, :6]).all()


def test_a_row_the_masks_leave_no_token_is_refused_only_where_the_verdict_reaches_it() -> None:
    logits = torch.zeros(3, 6)  # [3, 6]: rows follow [9] * 5, then + [2], then + [2, 4]
    sampling = SamplingParams(allowed_token_ids=(3,), bad_words=((2, 3),))
    adjusted = adjust_logits(logits, [9] * 5, [2, 4], sampling, lambda rows: rows)
    # Row 1 follows a 2, which bans the only allowed token: it and the rows after it hold zeros.
    assert adjusted.dead_from == 1 and torch.equal(adjusted.logits[1:], torch.zeros(2, 6))
    assert torch.isfinite(adjusted.logits[0]).tolist() == [False, False, False, True, False, False]
    adjusted.check_reached(1)  # the verdict rejected the draft's 2: row 1 is never reached
    with pytest.raises(InvalidArgumentError, match="no token to choose at position 6"):
        adjusted.check_reached(2)
    assert adjust_logits(logits, [9] * 5, [4, 4], sampling, lambda rows: rows).dead_from is None
    assert adjust_logits(logits, [1], [2], SamplingParams(), lambda rows: rows).logits is logits


def test_the_request_fields_are_checked_and_round_trip() -> None:
    sampling = SamplingParams(allowed_token_ids=(4, 2), bad_words=((7,), (1, 2)))
    assert SamplingParams.from_pb(sampling.to_pb()) == sampling
    assert sampling.to_dict()["bad_words"] == [[7], [1, 2]]
    assert sampling.needs_applied_echo and SamplingParams(bad_words=((3,),)).needs_applied_echo
    for bad in (
        {"allowed_token_ids": (-1,)},
        {"allowed_token_ids": tuple(range(MAX_ALLOWED_TOKEN_IDS + 1))},
        {"bad_words": ((),)},
        {"bad_words": ((1, -2),)},
        {"bad_words": (tuple(range(MAX_BAD_WORD_TOKENS + 1)),)},
    ):
        with pytest.raises(InvalidArgumentError, match="allowed_token_ids|bad_words"):
            SamplingParams(**bad)  # type: ignore[arg-type]
    request = build_request("x", 4, allowed_token_ids=[3, 4], bad_words=["a"], bad_word_token_ids=[[1, 2]])
    assert list(request.bad_words) == ["a"] and list(request.sampling.allowed_token_ids) == [3, 4]
    assert [list(word.token_ids) for word in request.sampling.bad_words] == [[1, 2]]


def test_workers_that_drop_the_masks_fail_the_round_with_failed_precondition() -> None:
    sampling = SamplingParams(bad_words=((5,),))
    refused = refused_round(sampling, [5, 6], Verification(2, 7, 0, applied_sampling=None))
    assert isinstance(refused, FailedPreconditionError)


def test_words_are_encoded_at_the_start_and_after_a_space(pipeline: Pipeline) -> None:
    tokenizer = AutoTokenizer.from_pretrained(pipeline.pair.target_dir)
    bare = tuple(tokenizer.encode("return", add_special_tokens=False))
    spaced = tuple(tokenizer.encode(" return", add_special_tokens=False))
    expected = (bare, spaced) if spaced[0] != bare[0] and len(spaced) == len(bare) else (bare,)
    assert encode_bad_words(tokenizer, [" return"]) == expected


class AllowedOnly(LogitsProcessor):
    """The reference: every logit but the allowed ids' -inf."""

    def __init__(self, allowed: Sequence[int]) -> None:
        self.allowed = list(allowed)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        masked = torch.full_like(scores, INF)
        masked[:, self.allowed] = scores[:, self.allowed]
        return masked  # type: ignore[return-value]


class BadWordsInOutput(LogitsProcessor):
    """The reference, written out plainly: a word's last token is banned where the output so far (what
    follows the prompt, the first call's input) ends with the rest of it."""

    def __init__(self, words: Sequence[Sequence[int]]) -> None:
        self.words = [list(word) for word in words]
        self.prompt_len: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1]
        output = input_ids[0, self.prompt_len :].tolist()
        scores = scores.clone()  # type: ignore[assignment]
        for word in self.words:
            prefix = word[:-1]
            if len(prefix) <= len(output) and output[len(output) - len(prefix) :] == prefix:
                scores[0, word[-1]] = INF
        return scores


def greedy_outputs(address: str, prompts: Sequence[str]) -> dict[str, list[int]]:
    with CoordinatorClient(address) as client:
        return {p: client.generate(build_request(p, MAX_NEW_TOKENS), 60).token_ids for p in prompts}


def test_greedy_with_bad_words_equals_generate_with_them(
    pipeline: Pipeline, coordinator_address: str
) -> None:
    prompts = PROMPTS[:3]
    plain = greedy_outputs(coordinator_address, prompts)
    tokens = [t for output in plain.values() for t in output]
    most = max(set(tokens), key=tokens.count)
    first = plain[prompts[0]]
    pair = [first[4], first[5]]  # a two-token word the plain output completes
    tokenizer = AutoTokenizer.from_pretrained(pipeline.pair.target_dir)
    word = tokenizer.decode([most]).strip()  # as text: the coordinator encodes it
    assert word, "the most used token is whitespace: pick another prompt set"
    words = [*encode_bad_words(tokenizer, [word]), tuple(pair)]
    expected = {
        p: target_alone(
            pipeline.pair.target_dir, [p], MAX_NEW_TOKENS,
            logits_processor=LogitsProcessorList([BadWordsInOutput(words)]),
        )[p]
        for p in prompts
    }  # fmt: skip
    assert expected != plain  # the words changed some outputs: the test tests something
    with CoordinatorClient(coordinator_address) as client:
        for k in (None, 0, 3):
            for prompt in prompts:
                request = build_request(
                    prompt,
                    MAX_NEW_TOKENS,
                    num_speculative_tokens=k,
                    bad_words=[word],
                    bad_word_token_ids=[pair],
                )
                assert client.generate(request, 60).token_ids == expected[prompt], (k, prompt)


def test_greedy_with_allowed_ids_equals_generate_with_them(
    pipeline: Pipeline, coordinator_address: str
) -> None:
    prompts = PROMPTS[:3]
    plain = greedy_outputs(coordinator_address, prompts)
    # Most of what the plain outputs use, less their first tokens: outputs change, and stay likely.
    allowed = sorted({t for output in plain.values() for t in output[3:]})
    expected = target_alone(
        pipeline.pair.target_dir, prompts, MAX_NEW_TOKENS,
        logits_processor=LogitsProcessorList([AllowedOnly(allowed)]),
    )  # fmt: skip
    assert expected != plain and all(set(output) <= set(allowed) for output in expected.values())
    with CoordinatorClient(coordinator_address) as client:
        for k in (None, 0, 3):
            for prompt in prompts:
                request = build_request(
                    prompt, MAX_NEW_TOKENS, num_speculative_tokens=k, allowed_token_ids=allowed
                )
                assert client.generate(request, 60).token_ids == expected[prompt], (k, prompt)


def test_coupled_seeded_tokens_with_masks_do_not_depend_on_k(pipeline: Pipeline) -> None:
    plain = greedy_outputs(pipeline.coordinator_addr, PROMPTS[:1])[PROMPTS[0]]
    outputs = coupled_outputs_for_each_k(
        pipeline.coordinator_addr, PROMPTS[0], 1, (0, 2, 5, None), temperature=0.9,
        bad_word_token_ids=[[plain[0]], plain[2:4]], allowed_token_ids=list(range(0, 512, 2)) + plain,
    )  # fmt: skip
    assert all(output == outputs[0] for output in outputs)


def test_first_token_follows_the_masked_target_distribution(pipeline: Pipeline) -> None:
    """Through the draft and the Leviathan rule (q and p both masked): only allowed tokens that are not bad
    words, at the masked p's frequencies."""
    from specpipe.sampling.processing import sampling_probs
    from tests.test_pipeline_sampling import PROMPT

    tokenizer = AutoTokenizer.from_pretrained(pipeline.pair.target_dir)
    model = AutoModelForCausalLM.from_pretrained(pipeline.pair.target_dir, dtype=torch.float32).eval()
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    with torch.inference_mode():
        logits = model(torch.tensor([prompt_ids])).logits[0, -1:]  # [1, vocab]
    ranked = logits[0].argsort(descending=True).tolist()
    allowed, bad = ranked[:3] + ranked[8:11], ranked[1]
    sampling = SamplingParams(temperature=1.0, allowed_token_ids=tuple(allowed), bad_words=((bad,),))
    p = sampling_probs(adjust_logits(logits, prompt_ids, (), sampling, lambda rows: rows).logits, sampling)[0]
    assert torch.count_nonzero(p) == 5 and p[bad] == 0
    counts = first_tokens(
        pipeline.coordinator_addr, prompt_ids, 300, temperature=1.0, allowed_token_ids=allowed,
        bad_word_token_ids=[[bad]],
    )  # fmt: skip
    assert_distributed_as(counts, p)


def test_bad_masks_are_invalid_argument_and_lose_nothing(pipeline: Pipeline) -> None:
    with CoordinatorClient(pipeline.coordinator_addr) as client:
        first = client.generate(build_request(PROMPTS[0], 4), 60)
        cases: list[tuple[dict[str, object], str]] = [
            ({"allowed_token_ids": [10**6]}, "allowed_token_ids"),
            ({"bad_word_token_ids": [[10**6]]}, "bad_words ids"),
            ({"bad_words": ["   "]}, "bad_words must not be empty"),
            ({"bad_words": ["x" * 5000]}, "bad_words[0] too long"),
            ({"allowed_token_ids": [7], "bad_word_token_ids": [[7]]}, "no token to choose"),
            (
                {"bad_words": [f"w{i}" for i in range(128)], "bad_word_token_ids": [[i] for i in range(200)]},
                "come to",
            ),
        ]
        for fields, message in cases:
            with pytest.raises(grpc.RpcError) as caught:
                request = build_request("", 4, session_id=first.session_id, **fields)  # type: ignore[arg-type]
                client.generate(request, 30)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, fields
            assert message in caught.value.details(), caught.value.details()
        session = client.get_session(first.session_id)
        assert list(session.token_ids)[-4:] == first.token_ids  # nothing committed by the refused requests
        # The request's own INVALID_ARGUMENT does not turn delegation off for the draft-target pair.
        rounds = "specpipe_worker_delegated_rounds_total"
        before = value(scrape(pipeline, "draft"), rounds, role="draft")
        client.generate(build_request(PROMPTS[1], 8, num_speculative_tokens=2), 60)
        assert value(scrape(pipeline, "draft"), rounds, role="draft") > before
