"""Where generation ends. `GenerateRequest.ignore_eos`: the rounds run past end-of-sequence tokens to
max_new_tokens, delegated and on the coordinator, and the tokens up to the EOS are the ones a request
without it gives. `stop_token_ids`: generation ends after the first of them, kept, as after EOS (its text
shown only with include_stop_str_in_output, as vLLM)."""

from __future__ import annotations

import grpc
import pytest

from specpipe.client import CoordinatorClient, GenerationResult, build_request
from tests.conftest import Pipeline
from tests.prompts import PROMPTS

MAX_NEW_TOKENS = 48


def sampled(prompt: str, seed: int, ignore_eos: bool, k: int | None) -> object:
    # Hot sampling under the coupled rule: the tiny target then ends some continuations with EOS, and the
    # tokens are the target's own seeded samples whatever k, so runs with and without EOS compare exactly.
    return build_request(
        prompt, MAX_NEW_TOKENS, temperature=1.5, seed=seed, acceptance="coupled",
        num_speculative_tokens=k, ignore_eos=ignore_eos,
    )  # fmt: skip


def first_ending_in_eos(client: CoordinatorClient) -> tuple[str, int, GenerationResult]:
    for seed in range(60):
        for prompt in PROMPTS[:4]:
            result = client.generate(sampled(prompt, seed, False, None), 60)
            if result.finish_reason == "eos":
                return prompt, seed, result
    raise AssertionError("no sampled request ended with EOS: the test needs one")


def test_ignore_eos_runs_to_max_new_tokens_past_eos(coordinator_address: str) -> None:
    with CoordinatorClient(coordinator_address) as client:
        prompt, seed, ended = first_ending_in_eos(client)
        assert len(ended.token_ids) < MAX_NEW_TOKENS
        for k in (None, 0, 3):
            full = client.generate(sampled(prompt, seed, True, k), 60)
            assert full.finish_reason == "length" and len(full.token_ids) == MAX_NEW_TOKENS, k
            assert full.token_ids[: len(ended.token_ids)] == ended.token_ids, k  # the EOS, then on


def test_stop_token_ids_end_generation_after_the_first_of_them(
    pipeline: Pipeline, coordinator_address: str
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pipeline.pair.target_dir)
    with CoordinatorClient(coordinator_address) as client:
        free = client.generate(build_request(PROMPTS[0], 24), 60)
        stop_id = free.token_ids[5]
        end = free.token_ids.index(stop_id) + 1  # its first occurrence, kept
        for k in (None, 0, 3):
            for ignore_eos in (False, True):  # stop ids stop even when EOS does not
                stopped = client.generate(
                    build_request(
                        PROMPTS[0],
                        24,
                        num_speculative_tokens=k,
                        stop_token_ids=[stop_id],
                        ignore_eos=ignore_eos,
                    ),
                    60,
                )
                assert stopped.token_ids == free.token_ids[:end], (k, ignore_eos)
                assert stopped.finish_reason == "stop", (k, ignore_eos)
                assert stopped.stop_reason == stop_id, (k, ignore_eos)  # vLLM's stop_reason
                # The text is flushed as after EOS: the kept tokens' text but the stop token's, as vLLM.
                assert stopped.text == tokenizer.decode(
                    stopped.token_ids[:-1], skip_special_tokens=True, clean_up_tokenization_spaces=False
                ), (k, ignore_eos)
        # include_stop_str_in_output shows it.
        shown = client.generate(
            build_request(PROMPTS[0], 24, stop_token_ids=[stop_id], include_stop_str_in_output=True), 60
        )
        assert shown.token_ids == free.token_ids[:end]
        assert shown.text == tokenizer.decode(
            shown.token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        with pytest.raises(grpc.RpcError) as caught:
            client.generate(build_request(PROMPTS[0], 4, stop_token_ids=[10**6]), 30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stop_token_ids" in caught.value.details()


def test_the_text_can_hold_the_stop_string_and_special_tokens(pipeline: Pipeline) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pipeline.pair.target_dir)
    with CoordinatorClient(pipeline.coordinator_addr) as client:
        free = client.generate(build_request(PROMPTS[0], 24), 60)
        stop = free.text[5:9]
        assert stop.strip(), free.text
        for include in (False, True):
            stopped = client.generate(
                build_request(PROMPTS[0], 24, stop=[stop], include_stop_str_in_output=include), 60
            )
            cut = free.text.index(stop) + (len(stop) if include else 0)
            assert stopped.finish_reason == "stop" and stopped.text == free.text[:cut], include
        # Only end-of-sequence may be chosen: its text is sent only when asked for.
        eos = tokenizer.eos_token_id
        for skip, text in ((None, ""), (True, ""), (False, tokenizer.eos_token * 3)):
            forced = client.generate(
                build_request(
                    PROMPTS[0], 3, allowed_token_ids=[eos], ignore_eos=True, skip_special_tokens=skip
                ),
                60,
            )
            assert forced.token_ids == [eos] * 3 and forced.text == text, skip


def test_the_end_of_sequence_text_is_left_out_also_where_special_tokens_are_shown(
    pipeline: Pipeline,
) -> None:
    """skip_special_tokens false shows special tokens, but not the EOS that ended the output (vLLM's
    detokenizer leaves the stopping token out), unless include_stop_str_in_output asks for it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pipeline.pair.target_dir)
    eos = tokenizer.eos_token_id
    with CoordinatorClient(pipeline.coordinator_addr) as client:
        for include, expected in ((False, ""), (True, tokenizer.eos_token)):
            ended = client.generate(
                build_request(
                    PROMPTS[0], 4, logit_bias={eos: 100.0}, skip_special_tokens=False,
                    include_stop_str_in_output=include,
                ),
                60,
            )  # fmt: skip
            assert (ended.token_ids, ended.finish_reason, ended.text) == ([eos], "eos", expected)
            assert ended.stop_reason is None
