"""Prompt-lookup drafting: hand-computed n-gram matches, the drafter's proposals and errors, and a pipeline
whose draft worker runs no model (real processes, gRPC and store) giving the target's exact outputs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from draft_service.drafter import DraftRequest
from draft_service.prompt_lookup import PromptLookupDrafter, VocabularyInfo, find_continuation
from specpipe.client import CoordinatorClient, build_request
from specpipe.errors import InvalidArgumentError
from specpipe.sampling.params import SamplingParams
from tests.conftest import ModelPair, Pipeline, start_pipeline, stop_pipeline
from tests.prompts import PROMPTS

MAX_NEW_TOKENS = 32


def test_longest_ngram_wins() -> None:
    history = [6, 7, 3, 8, 7, 4, 6, 7]
    assert find_continuation(history, max_ngram=2, min_ngram=1, num_tokens=3) == [3, 8, 7]  # after [6, 7]
    assert find_continuation(history, max_ngram=1, min_ngram=1, num_tokens=3) == [4, 6, 7]  # after [7]


def test_most_recent_occurrence_and_clipping() -> None:
    history = [1, 2, 5, 1, 2, 6, 1, 2]
    assert find_continuation(history, 2, 1, num_tokens=2) == [6, 1]
    assert find_continuation(history, 2, 1, num_tokens=10) == [6, 1, 2]  # up to the end of the history
    assert find_continuation([1, 2, 3, 1, 2, 3], 3, 1, num_tokens=4) == [1, 2, 3]


def test_no_match_proposes_nothing() -> None:
    assert find_continuation([1, 2, 3, 4], 3, 1, num_tokens=4) == []
    assert find_continuation([5], 3, 1, num_tokens=4) == []
    assert find_continuation([1, 2, 3, 4, 2], 3, 2, num_tokens=4) == []  # only a 1-gram would match


@pytest.fixture(scope="module")
def lookup(model_pair: ModelPair) -> PromptLookupDrafter:
    return PromptLookupDrafter(VocabularyInfo.load(model_pair.target_dir), 8, max_ngram=3, min_ngram=1)


def test_proposals_are_point_masses(lookup: PromptLookupDrafter) -> None:
    history = (11, 12, 13, 14, 11, 12)
    greedy = lookup.propose(DraftRequest("s", history, 4, SamplingParams()))
    assert greedy.token_ids == [13, 14, 11, 12] and greedy.draft_probs is None
    sampled = lookup.propose(DraftRequest("s", history, 2, SamplingParams(temperature=0.8, seed=1)))
    assert sampled.token_ids == [13, 14]
    assert sampled.draft_probs is not None
    for (ids, probs), token in zip(sampled.draft_probs, sampled.token_ids, strict=True):
        assert ids == [token] and torch.equal(probs, torch.ones(1))
    coupled = SamplingParams(temperature=0.8, seed=1, acceptance="coupled")
    assert lookup.propose(DraftRequest("s", history, 2, coupled)).draft_probs is None
    assert lookup.propose(DraftRequest("s", (1, 2, 3), 2, SamplingParams())).token_ids == []
    assert len(lookup.caches) == 0  # no per-session state


def test_bad_requests(lookup: PromptLookupDrafter) -> None:
    vocab = lookup.vocabulary.vocab_size
    for request in (
        DraftRequest("s", (1, 2), 0, SamplingParams()),
        DraftRequest("s", (1, 2), 9, SamplingParams()),
        DraftRequest("s", (1, vocab), 2, SamplingParams()),
        DraftRequest("s", (), 2, SamplingParams()),
        DraftRequest("", (1,), 2, SamplingParams()),
    ):
        with pytest.raises(InvalidArgumentError):
            lookup.propose(request)


@pytest.fixture(scope="module")
def lookup_pipeline(
    model_pair: ModelPair, redis_server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    """A draft worker running prompt lookup (no draft model), a target worker and a coordinator."""
    log_dir = tmp_path_factory.mktemp("lookup-logs")
    lookup = ["--drafter", "prompt-lookup"]  # --model names the tokenizer: the target's directory
    pipeline = start_pipeline(model_pair, redis_server, log_dir, model_pair.target_dir, lookup)
    yield pipeline
    stop_pipeline(pipeline)


def test_greedy_through_prompt_lookup_equals_target_alone(lookup_pipeline: Pipeline) -> None:
    tokenizer = AutoTokenizer.from_pretrained(lookup_pipeline.pair.target_dir)
    model = AutoModelForCausalLM.from_pretrained(lookup_pipeline.pair.target_dir, dtype=torch.float32).eval()
    drafted = accepted = 0
    with CoordinatorClient(lookup_pipeline.coordinator_addr) as client:
        assert client.server_info().draft_model == "prompt-lookup"  # not the tokenizer's directory
        for prompt in PROMPTS[:8]:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            with torch.inference_mode():
                out = model.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
            expected = out[0, ids.shape[1] :].tolist()
            for k in (4, None):  # fixed k, and the coordinator's adaptive k
                result = client.generate(build_request(prompt, MAX_NEW_TOKENS, num_speculative_tokens=k), 60)
                assert result.token_ids == expected, (prompt, k)
                assert result.usage is not None
                drafted += result.usage.draft_tokens
                accepted += result.usage.accepted_tokens
    # The tiny target repeats itself, so lookups find continuations and some are right.
    assert 0 < accepted <= drafted, (accepted, drafted)


def test_sampling_through_prompt_lookup(lookup_pipeline: Pipeline) -> None:
    with CoordinatorClient(lookup_pipeline.coordinator_addr) as client:
        for seed in range(3):
            coupled = {
                k: client.generate(
                    build_request(PROMPTS[0], MAX_NEW_TOKENS, temperature=0.9, seed=seed,
                                  num_speculative_tokens=k, acceptance="coupled"),
                    60,
                ).token_ids
                for k in (0, 4)
            }  # fmt: skip
            assert coupled[0] == coupled[4], seed  # the coupled rule: plain seeded sampling's tokens
            leviathan = client.generate(
                build_request(
                    PROMPTS[0], MAX_NEW_TOKENS, temperature=0.9, seed=seed, num_speculative_tokens=4
                ),
                60,
            )
            assert leviathan.usage is not None and len(leviathan.token_ids) > 0


def test_worker_reports_its_drafter(lookup_pipeline: Pipeline) -> None:
    import asyncio

    from specpipe.rpc.worker_clients import DraftClient

    async def info() -> str:
        client = DraftClient(lookup_pipeline.draft.address)
        try:
            return (await client.model_info(False, timeout_s=10)).drafter
        finally:
            await client.close()

    assert asyncio.run(info()) == "prompt-lookup"


def test_config_rejects_a_drafter_on_a_target() -> None:
    from specpipe.config import WorkerConfig

    with pytest.raises(ValueError, match="only a draft worker"):
        WorkerConfig(role="target", model_path=str(Path(".")), drafter="prompt-lookup")
    with pytest.raises(ValueError, match="min_ngram"):
        WorkerConfig(role="draft", model_path=".", drafter="prompt-lookup", max_ngram=1, min_ngram=2)
