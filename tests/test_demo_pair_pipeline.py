"""The shipped demo pair through the running services: exact greedy output and a real acceptance rate."""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from specpipe.client import CoordinatorClient, build_request
from specpipe.default_models import DEMO_PAIR_DIR, shipped_demo_pair
from specpipe.store.redis_server import RedisServerProcess
from tests.conftest import ModelPair, Pipeline, start_pipeline, stop_pipeline

MAX_NEW_TOKENS = 48


def heldout_prompts(count: int) -> list[str]:
    """Snippets of held-out stdlib files (never trained on), each ending mid-code."""
    record = json.loads((DEMO_PAIR_DIR / "training_record.json").read_text())
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    prompts = []
    for relative in record["data"]["heldout_files"]:
        path = stdlib / relative
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace")
            if len(text) > 1200:
                prompts.append(text[600:1000])
        if len(prompts) == count:
            break
    return prompts


@pytest.fixture(scope="module")
def demo_pipeline(
    redis_server: RedisServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    shipped = shipped_demo_pair()
    assert shipped is not None, "the demo pair must be shipped under specpipe/assets/demo-pair"
    pipeline = start_pipeline(ModelPair(*shipped), redis_server, tmp_path_factory.mktemp("demo"))
    yield pipeline
    stop_pipeline(pipeline)


def test_default_models_are_the_shipped_pair() -> None:
    from specpipe.default_models import default_model_dirs

    assert default_model_dirs() == shipped_demo_pair()


def test_demo_pair_greedy_through_services_equals_target(demo_pipeline: Pipeline) -> None:
    target_dir = demo_pipeline.pair.target_dir
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    drafted = accepted = 0
    with CoordinatorClient(demo_pipeline.coordinator_addr) as client:
        for prompt in heldout_prompts(4):
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            with torch.inference_mode():
                expected = model.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)[
                    0, ids.shape[1] :
                ]
            result = client.generate(build_request(prompt, MAX_NEW_TOKENS, num_speculative_tokens=4), 120)
            assert result.token_ids == expected.tolist()
            assert result.usage is not None
            drafted += result.usage.draft_tokens
            accepted += result.usage.accepted_tokens
    # A trained pair: most draft tokens are accepted (held-out agreement is about 0.73).
    assert accepted / drafted > 0.4, (accepted, drafted)
