"""Streaming: text deltas concatenate to the decode of all generated ids; sessions and stop strings."""

from __future__ import annotations

import array

import pytest
import redis
from transformers import AutoTokenizer

from specpipe.client import CoordinatorClient, build_request
from tests.conftest import Pipeline
from tests.prompts import PROMPTS


@pytest.fixture(scope="module")
def tokenizer(pipeline: Pipeline):  # noqa: ANN201 - a transformers tokenizer
    return AutoTokenizer.from_pretrained(pipeline.pair.target_dir)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_text_deltas_equal_decode(pipeline: Pipeline, tokenizer, temperature: float) -> None:
    with CoordinatorClient(pipeline.coordinator_addr) as client:
        for seed, prompt in enumerate(PROMPTS):
            request = build_request(prompt, 32, temperature=temperature, seed=seed, num_speculative_tokens=4)
            chunks = list(client.stream(request, timeout_s=60))
            ids = [t for c in chunks for t in c.token_ids]
            text = "".join(c.text for c in chunks)
            assert text == tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            assert all(c.token_ids for c in chunks)
            assert chunks[-1].finish_reason != 0 and all(c.finish_reason == 0 for c in chunks[:-1])


def test_non_ascii_characters_are_never_split(pipeline: Pipeline, tokenizer) -> None:
    """A multi-byte character whose bytes arrive in different chunks is sent whole, in one delta."""
    text = "日本語のテキスト 🙂 naïve café"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) > len(text.split()), "the tokenizer must split these characters into several tokens"
    # Feed the text as a prompt to a session, then ask the target to continue; whatever it generates, no
    # delta may contain a replacement character that the final decode does not.
    with CoordinatorClient(pipeline.coordinator_addr) as client:
        for seed in range(5):
            chunks = list(client.stream(build_request(text, 40, temperature=1.0, seed=seed), timeout_s=60))
            all_ids = [t for c in chunks for t in c.token_ids]
            full = tokenizer.decode(all_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            assert "".join(c.text for c in chunks) == full
            assert sum(c.text.count("\ufffd") for c in chunks) == full.count("\ufffd")


def test_session_is_stored_and_continued(pipeline: Pipeline, tokenizer) -> None:
    with CoordinatorClient(pipeline.coordinator_addr) as client:
        first = client.generate(build_request("def f(x):", 10), timeout_s=60)
        assert first.session_id
        store = redis.Redis.from_url(pipeline.redis.url)
        key = f"specpipe:session:{first.session_id}"
        assert int(store.hget(key, "version")) >= 1
        assert 0 < store.ttl(key) <= 24 * 3600
        assert int(store.hget(key, "generated_tokens")) == 10
        second = client.generate(build_request("\n", 10, session_id=first.session_id), timeout_s=60)
        assert second.session_id == first.session_id
        assert second.usage is not None
        prompt_len = len(tokenizer("def f(x):")["input_ids"])
        # The second turn's prompt is the whole history plus the new text.
        assert second.usage.prompt_tokens == prompt_len + 10 + len(tokenizer("\n")["input_ids"])
        assert int(store.hget(key, "generated_tokens")) == 20
        # The stored history is exactly prompt, reply, prompt, reply: no token lost or written twice.
        stored = list(array.array("i", store.get(f"{key}:tokens")))
        expected = [
            *tokenizer("def f(x):")["input_ids"],
            *first.token_ids,
            *tokenizer("\n")["input_ids"],
            *second.token_ids,
        ]
        assert stored == expected


def test_stop_string_ends_generation(pipeline: Pipeline, tokenizer) -> None:
    with CoordinatorClient(pipeline.coordinator_addr) as client:
        baseline = client.generate(build_request(PROMPTS[0], 40), timeout_s=60)
        stop = baseline.text[5:8]
        assert stop
        stopped = client.generate(build_request(PROMPTS[0], 40, stop=[stop]), timeout_s=60)
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop  # vLLM's stop_reason
    assert stopped.text == baseline.text[: baseline.text.index(stop)]
    assert baseline.token_ids[: len(stopped.token_ids)] == stopped.token_ids
    assert stop in tokenizer.decode(stopped.token_ids)
    # The HTTP API's choices carry it too; null where the length limit ended the output.
    from tests.test_openai_api import post

    body = {"prompt": PROMPTS[0], "max_tokens": 40, "temperature": 0, "stop": [stop, "never seen"]}
    status, response = post(pipeline, "/v1/completions", body)
    assert status == 200 and response["choices"][0]["stop_reason"] == stop, response
    length_limited = {**body, "stop": [], "max_tokens": 4, "ignore_eos": True}
    status, response = post(pipeline, "/v1/completions", length_limited)
    choice = response["choices"][0]
    assert (choice["finish_reason"], choice["stop_reason"]) == ("length", None)
