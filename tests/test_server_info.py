"""Coordinator.GetServerInfo and Coordinator.Tokenize through the shared pipeline, and `specpipe info`."""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import pytest
from transformers import AutoConfig, AutoTokenizer

from coordinator.tokenization import MAX_CHARS_PER_TOKEN
from specpipe import __version__
from specpipe.client import CoordinatorClient, build_request
from specpipe.v1 import coordinator_pb2
from tests.conftest import Pipeline, service_env
from tests.prompts import PROMPTS


def test_server_info_names_the_models_and_the_limits(pipeline: Pipeline) -> None:
    with CoordinatorClient(pipeline.coordinator_addr) as client:
        info = client.server_info()
    assert info.version == __version__
    assert (
        str(pipeline.pair.target_dir) in info.target_model
        and str(pipeline.pair.draft_dir) in info.draft_model
    )
    assert info.vocab_size == AutoConfig.from_pretrained(pipeline.pair.target_dir).vocab_size
    assert info.max_new_tokens == 256  # the fixture's --max-new-tokens-limit
    assert info.max_speculative_tokens == 16 and info.adaptive_k and info.default_speculative_tokens == 0
    assert info.max_concurrent_requests == 256 and 0 <= info.requests_running < 256
    assert info.max_completions == 16
    assert info.max_context > 0 and list(info.eos_token_ids) == sorted(info.eos_token_ids)


@pytest.mark.parametrize("add_special_tokens", [True, False, None])
def test_tokenize_is_the_served_tokenizer_and_what_generate_counts(
    pipeline: Pipeline, add_special_tokens: bool | None
) -> None:
    """None: the field unset, which encodes as Generate does (with special tokens)."""
    tokenizer = AutoTokenizer.from_pretrained(pipeline.pair.target_dir)
    text = PROMPTS[2]
    expected = tokenizer(text, add_special_tokens=add_special_tokens is not False)["input_ids"]
    request = coordinator_pb2.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)
    with CoordinatorClient(pipeline.coordinator_addr) as client:
        tokenized = client.stub.Tokenize(request, timeout=10)
        generated = client.generate(build_request(text, 2), 60)
        with pytest.raises(grpc.RpcError) as caught:
            client.tokenize("x" * (MAX_CHARS_PER_TOKEN * client.server_info().max_context + 1))
    assert list(tokenized.token_ids) == expected
    assert list(tokenized.tokens) == tokenizer.convert_ids_to_tokens(expected)
    if add_special_tokens is not False:  # Generate encodes a text prompt this way
        assert generated.usage is not None and generated.usage.prompt_tokens == len(expected)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "too long" in caught.value.details()


def test_specpipe_info_prints_json(pipeline: Pipeline) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "specpipe", "info", "--addr", pipeline.coordinator_addr],
        capture_output=True, text=True, env=service_env(), timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["maxNewTokens"] == 256 and info["adaptiveK"] is True
    down = subprocess.run(
        [sys.executable, "-m", "specpipe", "info", "--addr", "127.0.0.1:1", "--timeout", "2"],
        capture_output=True, text=True, env=service_env(), timeout=60,
    )  # fmt: skip
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr
