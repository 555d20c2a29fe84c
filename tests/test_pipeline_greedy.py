"""Greedy output through the running services equals the target decoding alone, token for token."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from specpipe.client import CoordinatorClient, build_request
from specpipe.rpc.worker_clients import TargetClient
from tests.conftest import Pipeline, with_target_client
from tests.prompts import PROMPTS
from tests.reference import target_alone

MAX_NEW_TOKENS = 24


@pytest.fixture(scope="module")
def target_greedy(pipeline: Pipeline) -> dict[str, list[int]]:
    """Reference: the target model alone, `generate(do_sample=False)`, float32 on the CPU."""
    return target_alone(pipeline.pair.target_dir, PROMPTS, MAX_NEW_TOKENS)


@pytest.mark.parametrize("k", [0, 1, 3, 8])
def test_greedy_equals_target_alone(pipeline: Pipeline, target_greedy: dict[str, list[int]], k: int) -> None:
    drafted = accepted = 0
    with CoordinatorClient(pipeline.coordinator_addr) as client:
        for prompt in PROMPTS:
            result = client.generate(
                build_request(prompt, MAX_NEW_TOKENS, num_speculative_tokens=k), timeout_s=60
            )
            assert result.token_ids == target_greedy[prompt], f"k={k} prompt={prompt!r}"
            assert result.usage is not None
            assert result.usage.generated_tokens == len(result.token_ids)
            drafted += result.usage.draft_tokens
            accepted += result.usage.accepted_tokens
    if k == 0:
        assert drafted == 0
    else:
        # Both paths of the acceptance rule ran: some drafts accepted, some rejected.
        assert 0 < accepted < drafted, (accepted, drafted)


def test_prompt_token_ids_equal_text_prompt(pipeline: Pipeline, target_greedy: dict[str, list[int]]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(pipeline.pair.target_dir)
    prompt = PROMPTS[0]
    with CoordinatorClient(pipeline.coordinator_addr) as client:
        result = client.generate(build_request(tokenizer(prompt)["input_ids"], MAX_NEW_TOKENS), timeout_s=60)
    assert result.token_ids == target_greedy[prompt]


def test_greedy_requests_sharing_a_long_prefix_equal_target_alone(pipeline: Pipeline) -> None:
    """The workers start each new session from the prefix another session cached (prefix sharing, on by
    default): concurrent completions and later requests with the same system prompt stay token-identical."""
    system = "".join(PROMPTS)  # long enough to share (tens of tokens)
    prompts = [system + suffix for suffix in ("\n# one\n", "\n# two\n", "\n# three\n")]
    expected = target_alone(pipeline.pair.target_dir, prompts, MAX_NEW_TOKENS)
    with CoordinatorClient(pipeline.coordinator_addr) as client:
        for prompt in prompts:
            result = client.generate(build_request(prompt, MAX_NEW_TOKENS), timeout_s=60)
            assert result.token_ids == expected[prompt], prompt
        completions = client.generate_completions(
            build_request(prompts[0], MAX_NEW_TOKENS, n=3), timeout_s=60
        )
    assert all(completion.token_ids == expected[prompts[0]] for completion in completions)
    with_target_client(pipeline, check_target_shared_prefixes)


async def check_target_shared_prefixes(client: TargetClient) -> None:
    stats = await client.stats()
    assert stats.shared_prefixes > 0 and stats.shared_prefix_tokens > stats.shared_prefixes
