"""The OpenAI-compatible HTTP API, driven by OpenAI's own client and by raw HTTP, against the shared pipeline.

Every output is compared with the gRPC Generate of the same request: the HTTP API is a translation, so it
must return exactly the tokens the gRPC API does (greedy and seeded sampling alike).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest

from coordinator.openai_api.server import error_of
from specpipe import errors
from specpipe.client import CoordinatorClient, build_request
from tests.conftest import Pipeline
from tests.prompts import PROMPTS

CONVERSATION = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "def parse(text):"},
]


@pytest.fixture
def client(pipeline: Pipeline) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{pipeline.http_url}/v1", api_key="unused", max_retries=0, timeout=60
    ) as client:
        yield client


@pytest.fixture
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def post(pipeline: Pipeline, path: str, body: Any, raw: bytes | None = None) -> tuple[int, Any]:
    """A POST's status and JSON body (an error's too)."""
    request = urllib.request.Request(
        pipeline.http_url + path,
        data=raw if raw is not None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def events(pipeline: Pipeline, path: str, body: dict[str, Any]) -> list[Any]:
    """A streamed POST's server-sent events, parsed; "[DONE]" as itself."""
    request = urllib.request.Request(
        pipeline.http_url + path, data=json.dumps({**body, "stream": True}).encode(),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        lines = response.read().decode().split("\n\n")
    assert lines[-1] == ""
    payloads = [line.removeprefix("data: ") for line in lines[:-1]]
    return [payload if payload == "[DONE]" else json.loads(payload) for payload in payloads]


def test_models_lists_the_served_model(pipeline: Pipeline, client: openai.OpenAI) -> None:
    models = client.models.list().data
    with CoordinatorClient(pipeline.coordinator_addr) as grpc_client:
        info = grpc_client.server_info()
    assert [m.id for m in models] == [info.target_model] and models[0].owned_by == "specpipe"
    with urllib.request.urlopen(f"{pipeline.http_url}/health", timeout=10) as response:
        assert response.status == 200


def test_greedy_completions_are_the_grpc_tokens(
    pipeline: Pipeline, client: openai.OpenAI, model: str
) -> None:
    with CoordinatorClient(pipeline.coordinator_addr) as grpc_client:
        for prompt in PROMPTS[:3]:
            expected = grpc_client.generate(build_request(prompt, 32, ignore_eos=True))
            completion = client.completions.create(
                model=model, prompt=prompt, max_tokens=32, temperature=0, extra_body={"ignore_eos": True}
            )
            assert completion.choices[0].text == expected.text
            assert completion.choices[0].finish_reason == "length"
            assert completion.usage.completion_tokens == 32
            assert completion.usage.prompt_tokens == expected.usage.prompt_tokens
            assert completion.usage.total_tokens == 32 + expected.usage.prompt_tokens


def test_streamed_completions_add_up_to_the_whole(pipeline: Pipeline, model: str) -> None:
    body = {"model": model, "prompt": PROMPTS[0], "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    status, whole = post(pipeline, "/v1/completions", body)
    assert status == 200
    streamed = events(pipeline, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert streamed[-1] == "[DONE]"
    usage_event, chunks = streamed[-2], streamed[:-2]
    assert usage_event["choices"] == [] and usage_event["usage"] == whole["usage"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["object"] == "text_completion"


def test_chat_completions_are_the_grpc_chat(pipeline: Pipeline, client: openai.OpenAI, model: str) -> None:
    with CoordinatorClient(pipeline.coordinator_addr) as grpc_client:
        expected = grpc_client.generate(build_request("", 24, messages=CONVERSATION, ignore_eos=True))
    chat = client.chat.completions.create(
        model=model, messages=CONVERSATION, max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == expected.text
    assert chat.usage.prompt_tokens == expected.usage.prompt_tokens
    stream = client.chat.completions.create(
        model=model, messages=CONVERSATION, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = list(stream)
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    assert deltas[0].role == "assistant" and "".join(d.content or "" for d in deltas) == expected.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    assert chunks[-1].usage.prompt_tokens == expected.usage.prompt_tokens


def test_seeded_n_and_several_prompts_are_the_grpc_completions(
    pipeline: Pipeline, client: openai.OpenAI, model: str
) -> None:
    prompts = PROMPTS[:2]
    completion = client.completions.create(
        model=model, prompt=prompts, max_tokens=20, temperature=0.8, seed=7, n=2,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert [c.index for c in completion.choices] == [0, 1, 2, 3]
    with CoordinatorClient(pipeline.coordinator_addr) as grpc_client:
        for p, prompt in enumerate(prompts):
            request = build_request(prompt, 20, temperature=0.8, seed=7, n=2, ignore_eos=True)
            expected = grpc_client.generate_completions(request)
            assert [completion.choices[p * 2 + i].text for i in range(2)] == [e.text for e in expected]
    assert completion.usage.completion_tokens == 80


def test_logprobs_spell_the_tokens_of_the_text(pipeline: Pipeline, client: openai.OpenAI, model: str) -> None:
    completion = client.completions.create(
        model=model,
        prompt=PROMPTS[1],
        max_tokens=12,
        temperature=0,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    choice = completion.choices[0]
    with CoordinatorClient(pipeline.coordinator_addr) as grpc_client:
        expected = grpc_client.generate(build_request(PROMPTS[1], 12, logprobs=2, ignore_eos=True))
    assert "".join(choice.logprobs.tokens) == choice.text
    assert choice.logprobs.token_logprobs == pytest.approx([lp.logprob for lp in expected.logprobs])
    assert all(len(top) >= 2 for top in choice.logprobs.top_logprobs)
    assert choice.logprobs.text_offset[0] == 0 and choice.logprobs.text_offset == sorted(
        choice.logprobs.text_offset
    )
    chat = client.chat.completions.create(
        model=model, messages=CONVERSATION, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = chat.choices[0].logprobs.content
    assert "".join(entry.token for entry in content) == chat.choices[0].message.content
    assert all(
        len(entry.top_logprobs) == 3 and entry.bytes == list(entry.token.encode()) for entry in content
    )


def test_echo_with_logprobs_scores_the_prompt_as_lm_evaluation_harness_asks(
    pipeline: Pipeline, client: openai.OpenAI, model: str
) -> None:
    """lm-evaluation-harness's loglikelihood request (echo, logprobs 1, max_tokens 1, token-id prompts in a
    batch): each choice's log-probs start with its prompt's, the first null, the others the target's own."""
    from transformers import AutoTokenizer

    from tests.reference import one_pass_logprobs

    tokenizer = AutoTokenizer.from_pretrained(pipeline.pair.target_dir)
    prompts = [tokenizer(text)["input_ids"][:20] for text in PROMPTS[:2]]
    completion = client.completions.create(
        model=model, prompt=prompts, max_tokens=1, temperature=0, logprobs=1, echo=True, seed=1234
    )
    for prompt, choice in zip(prompts, completion.choices, strict=True):
        logprobs = choice.logprobs
        assert len(logprobs.tokens) == len(prompt) + 1 and logprobs.token_logprobs[0] is None
        assert logprobs.top_logprobs[0] is None and logprobs.text_offset[0] == 0
        expected = one_pass_logprobs(pipeline.pair.target_dir, prompt)
        assert logprobs.token_logprobs[1 : len(prompt)] == pytest.approx(expected, abs=1e-4)
        assert "".join(logprobs.tokens) == choice.text and choice.text.startswith(tokenizer.decode(prompt))
    assert completion.usage.prompt_tokens == sum(len(p) for p in prompts)
    # With n: every choice carries its prompt's log-probs, and completion i is seed + i's (streamed too).
    body = {"model": model, "prompt": PROMPTS[0], "max_tokens": 4, "logprobs": 0, "echo": True, "n": 2,
            "temperature": 1.0, "seed": 5, "ignore_eos": True}  # fmt: skip
    status, whole = post(pipeline, "/v1/completions", body)
    assert status == 200 and [c["index"] for c in whole["choices"]] == [0, 1]
    with CoordinatorClient(pipeline.coordinator_addr) as grpc_client:
        request = build_request(PROMPTS[0], 4, temperature=1.0, seed=5, n=2, ignore_eos=True)
        expected_texts = [e.text for e in grpc_client.generate_completions(request)]
    prompt_tokens = len(tokenizer(PROMPTS[0])["input_ids"])
    for choice, text in zip(whole["choices"], expected_texts, strict=True):
        assert choice["text"] == PROMPTS[0] + text
        assert len(choice["logprobs"]["tokens"]) == prompt_tokens + 4
    assert whole["usage"]["prompt_tokens"] == prompt_tokens
    streamed = events(pipeline, "/v1/completions", body)
    firsts = {}
    for event in streamed[:-1]:
        part = event["choices"][0]
        firsts.setdefault(part["index"], part)
    assert all(len(firsts[i]["logprobs"]["tokens"]) >= prompt_tokens for i in (0, 1))


def test_echo_and_structured_output(pipeline: Pipeline, client: openai.OpenAI, model: str) -> None:
    echoed = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith(PROMPTS[0])
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    chat = client.chat.completions.create(
        model=model, messages=CONVERSATION, max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
    )  # fmt: skip
    assert isinstance(json.loads(chat.choices[0].message.content)["n"], int)
    choice = client.completions.create(
        model=model, prompt=PROMPTS[0], max_tokens=10, extra_body={"guided_choice": ["yes", "no"]}
    )
    assert choice.choices[0].text in ("yes", "no")


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/v1/completions", {"prompt": "x", "max_tokens": 100000}, 400, "max_tokens must be in [1, 256]"),
        (
            "/v1/chat/completions",
            {"messages": CONVERSATION, "max_completion_tokens": 0},
            400,
            "max_completion",
        ),
        ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature must be a number"),
        ("/v1/completions", {"prompt": "x", "suffix": "y"}, 400, "suffix is not supported"),
        (
            "/v1/completions",
            {"prompt": "x", "echo": True, "logprobs": 1, "n": 17},
            400,
            "n must be in [1, 16]",
        ),
        (
            "/v1/completions",
            {"prompt": "x", "echo": True, "logprobs": 1, "n": 0},
            400,
            "n must be in [1, 16]",
        ),
        ("/v1/completions", {"prompt": "x", "best_of": 3}, 400, "best_of is not supported"),
        ("/v1/completions", {"prompt": {"x": 1}}, 400, "prompt must be a string"),
        ("/v1/completions", {"prompt": "x", "top_k": 2**40}, 400, "out of range"),
        ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "the model 'gpt-4' does not exist"),
        ("/v1/completions", [1, 2], 400, "must be a JSON object"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages must be a non-empty list"),
        ("/v1/chat/completions", {"messages": CONVERSATION, "tools": [{"type": "function"}]}, 400, "tools"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "unknown role"),
        ("/v1/chat/completions", {"messages": CONVERSATION, "stream": True, "n": 99}, 400, "n must be in"),
        ("/v1/chat/completions", {"messages": CONVERSATION, "top_logprobs": 2}, 400, "needs logprobs: true"),
        (
            "/v1/chat/completions",
            {"messages": CONVERSATION, "logprobs": True, "top_logprobs": 21},
            400,
            "top_logprobs must be in [0, 20]",
        ),
        ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream: true"),
        ("/v1/completions", {"prompt": [-5], "echo": True}, 400, "prompt"),
    ],
)
def test_bad_requests_get_openai_errors(
    pipeline: Pipeline, path: str, body: Any, status: int, message: str
) -> None:
    answered, error = post(pipeline, path, body)
    assert answered == status
    assert message in error["error"]["message"] and error["error"]["type"] == "invalid_request_error"


def test_http_requests_are_counted_by_route_and_status(pipeline: Pipeline, model: str) -> None:
    def counts() -> dict[tuple[str, str], float]:
        with urllib.request.urlopen(f"{pipeline.http_url}/metrics", timeout=10) as response:
            text = response.read().decode()
        from prometheus_client.parser import text_string_to_metric_families

        return {
            (sample.labels["route"], sample.labels["status"]): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "specpipe_http_requests_total"
        }

    before = counts()
    assert post(pipeline, "/v1/completions", {"prompt": "x", "max_tokens": 1, "model": model})[0] == 200
    assert post(pipeline, "/v1/completions", None, raw=b"{not json")[0] == 400
    assert post(pipeline, "/v1/nothing-here", {})[0] == 404
    after = counts()
    for key in (("/v1/completions", "200"), ("/v1/completions", "400"), ("unmatched", "404")):
        assert after.get(key, 0) - before.get(key, 0) == 1, (key, before, after)


def test_a_body_that_is_not_json_is_400_and_an_unknown_route_404_both_as_json(
    pipeline: Pipeline, client: openai.OpenAI, model: str
) -> None:
    status, error = post(pipeline, "/v1/completions", None, raw=b"{not json")
    assert status == 400 and "not JSON" in error["error"]["message"]
    status, error = post(pipeline, "/v1/embeddings", {"input": "x"})
    assert status == 404 and error["error"]["type"] == "invalid_request_error"
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_lenient_types_as_vllm_takes_them(pipeline: Pipeline, model: str) -> None:
    body = {"model": model, "prompt": PROMPTS[0], "max_tokens": 4.0, "temperature": 0, "echo": 0}
    status, completion = post(pipeline, "/v1/completions", body)
    assert status == 200 and completion["usage"]["completion_tokens"] <= 4


def test_the_sessions_of_http_requests_are_deleted_after_them(pipeline: Pipeline, model: str) -> None:
    """No HTTP client can name a session again, so none is kept (in the store or the workers' caches)."""
    import redis

    store = redis.Redis.from_url(pipeline.redis.url)
    with CoordinatorClient(pipeline.coordinator_addr) as grpc_client:  # a gRPC session is kept, and seen
        kept = grpc_client.generate(build_request(PROMPTS[0], 2)).session_id
    before = set(store.scan_iter("specpipe:session:*"))
    assert any(kept.encode() in key for key in before)
    body = {"model": model, "prompt": [PROMPTS[0], PROMPTS[1]], "max_tokens": 8, "n": 2, "temperature": 1}
    assert post(pipeline, "/v1/completions", body)[0] == 200
    # Streams left after their first event, some completions' chunks still queued unread: deleted too.
    for _ in range(4):
        request = urllib.request.Request(
            pipeline.http_url + "/v1/completions", headers={"Content-Type": "application/json"},
            data=json.dumps({**body, "max_tokens": 64, "ignore_eos": True, "stream": True}).encode(),
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.readline().startswith(b"data: ")
    deadline = time.monotonic() + 10
    while set(store.scan_iter("specpipe:session:*")) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not set(store.scan_iter("specpipe:session:*")) - before


def test_domain_errors_map_to_http_statuses() -> None:
    assert error_of(errors.ResourceExhaustedError("busy"))[0] == 429
    assert error_of(errors.UnavailableError("down"))[0] == 503
    assert error_of(errors.DeadlineExceededError("late"))[0] == 504
    status, body = error_of(errors.FailedPreconditionError("no template"))
    assert status == 400 and body["error"]["code"] == grpc.StatusCode.FAILED_PRECONDITION.name
    assert error_of(RuntimeError("boom"))[1]["error"]["type"] == "server_error"


def test_a_client_that_disconnects_ends_its_generation(pipeline: Pipeline, model: str) -> None:
    body = {"model": model, "prompt": PROMPTS[2], "max_tokens": 256, "ignore_eos": True, "stream": True}
    request = urllib.request.Request(
        pipeline.http_url + "/v1/completions", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.readline().startswith(b"data: ")
    with CoordinatorClient(pipeline.coordinator_addr) as grpc_client:
        deadline = time.monotonic() + 20
        while grpc_client.server_info().requests_running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert grpc_client.server_info().requests_running == 0


def test_a_taken_http_port_ends_the_coordinator_with_its_reason(pipeline: Pipeline, tmp_path) -> None:
    import socket

    from tests.conftest import start_coordinator

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        coordinator = start_coordinator(
            pipeline.draft.address, pipeline.target.address, pipeline.redis.url, tmp_path,
            extra=["--http-port", str(port)],
        )  # fmt: skip
        try:
            assert coordinator.popen is not None and coordinator.popen.wait(timeout=60) == 1
        finally:
            coordinator.stop()
    assert "address already in use" in coordinator.log_tail().lower(), coordinator.log_tail()


def test_tokenize_and_detokenize_as_vllm_serves_them(pipeline: Pipeline, model: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pipeline.pair.target_dir)
    status, tokenized = post(pipeline, "/tokenize", {"model": model, "prompt": PROMPTS[0]})
    assert status == 200 and tokenized["tokens"] == tokenizer(PROMPTS[0])["input_ids"]
    assert tokenized["count"] == len(tokenized["tokens"]) and tokenized["max_model_len"] > 0
    status, chat = post(pipeline, "/tokenize", {"messages": CONVERSATION})
    with CoordinatorClient(pipeline.coordinator_addr) as grpc_client:
        session = grpc_client.get_session(
            grpc_client.generate(build_request("", 1, messages=CONVERSATION)).session_id
        )
    assert status == 200 and chat["tokens"] == list(session.token_ids)[: session.prompt_tokens]
    status, text = post(pipeline, "/detokenize", {"model": model, "tokens": tokenized["tokens"]})
    assert status == 200 and text == {"prompt": PROMPTS[0]}
    assert post(pipeline, "/detokenize", {"tokens": [-1]})[0] == 400
    assert post(pipeline, "/detokenize", {})[0] == 400
    assert post(pipeline, "/tokenize", {"prompt": 5})[0] == 400
    assert post(pipeline, "/tokenize", {"messages": [{"role": "", "content": "x"}]})[0] == 400
    both = {"messages": CONVERSATION, "continue_final_message": True, "add_generation_prompt": True}
    assert post(pipeline, "/tokenize", both)[0] == 400


def test_an_api_key_guards_both_apis_but_the_probes_and_metrics(pipeline: Pipeline, tmp_path) -> None:
    """--api-key-file (or env SPECPIPE_API_KEY): `Authorization: Bearer <key>`, 401 (HTTP) or
    UNAUTHENTICATED (gRPC) otherwise, as vLLM's --api-key; never on the command line or in the log."""
    from specpipe.launcher import free_port
    from tests.conftest import start_coordinator

    secret = "sk-specpipe-test-key"
    key_file = tmp_path / "api-key"
    key_file.write_text(secret + "\n")
    http_port = free_port()
    coordinator = start_coordinator(
        pipeline.draft.address, pipeline.target.address, pipeline.redis.url, tmp_path,
        extra=["--http-port", str(http_port), "--api-key-file", str(key_file)],
    )  # fmt: skip
    url = f"http://127.0.0.1:{http_port}"
    try:
        coordinator.wait_serving(120)
        with openai.OpenAI(base_url=f"{url}/v1", api_key=secret, max_retries=0) as client:
            model = client.models.list().data[0].id
            completion = client.completions.create(
                model=model, prompt=PROMPTS[0], max_tokens=4, temperature=0
            )
            assert completion.usage.completion_tokens <= 4
        with openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0) as client:
            with pytest.raises(openai.AuthenticationError):
                client.models.list()
        for path in ("/health", "/metrics", "/version"):  # probes and scrapers need no key
            with urllib.request.urlopen(url + path, timeout=10) as response:
                assert response.status == 200
        with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
            assert b"specpipe_requests_total" in response.read()
        # A header of undecodable bytes is refused as any wrong key, not a server error.
        odd = urllib.request.Request(url + "/v1/models", headers={"Authorization": "Bearer \xff"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(odd, timeout=10)
        assert refused.value.code == 401
        request = urllib.request.Request(url + "/tokenize", data=b'{"prompt": "x"}', method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 401 and "API key" in json.loads(refused.value.read())["error"]["message"]
        # The gRPC API asks for the same key (`authorization` metadata); grpc.health.v1 stays open.
        with CoordinatorClient(coordinator.address, api_key=secret) as grpc_client:
            assert len(grpc_client.generate(build_request(PROMPTS[0], 3)).token_ids) == 3
        for key in ("", "wrong"):
            with CoordinatorClient(coordinator.address, api_key=key) as grpc_client:
                with pytest.raises(grpc.RpcError) as refused:
                    grpc_client.generate(build_request(PROMPTS[0], 3))
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.RpcError) as refused:
                    grpc_client.server_info()
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert coordinator.popen is not None
        assert secret not in Path(f"/proc/{coordinator.popen.pid}/cmdline").read_bytes().decode()
    finally:
        coordinator.stop()
    assert secret not in coordinator.log_path.read_text()
