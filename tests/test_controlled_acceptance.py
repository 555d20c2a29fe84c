"""The controlled-acceptance draft (cost profiling on targets no trained draft matches): reference lookup,
the per-position hit rate, and greedy requests through the real services that stay the target's own."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from draft_service.controlled import ControlledAcceptance, ReferenceContinuations
from specpipe.client import CoordinatorClient, build_request
from specpipe.config import WorkerConfig
from tests.conftest import ModelPair, Pipeline, start_pipeline, stop_pipeline

PROMPTS = ([5, 17, 42, 7, 99, 3, 250, 31], [300, 12, 12, 64, 8, 451, 77, 2, 19, 140])
MAX_NEW_TOKENS = 32


def test_references_are_found_by_the_history_they_extend() -> None:
    shared = list(range(20))  # the first 16 tokens (the index key) of two references are the same
    first, second = [*shared, 1, 2, 3], [*shared, 4, 5, 6]
    references = ReferenceContinuations([first, second, []])
    assert references.find([*shared, 4]) == 1 and references.find([*shared, 1, 2]) == 0
    assert references.find(shared) in (0, 1)  # a prefix of both: either continues it
    assert references.find([*shared, 9]) is None  # diverged
    assert references.find(first) is None  # nothing after it
    assert references.find([7, 7]) is None


def test_reference_files_are_checked(tmp_path: Path) -> None:
    good = tmp_path / "refs.json"
    good.write_text(json.dumps([[1, 2, 3], [4, 5]]), encoding="utf-8")
    assert ReferenceContinuations.from_file(good).sequences == [[1, 2, 3], [4, 5]]
    bad = tmp_path / "bad.json"
    for content in ({"a": 1}, [[1, "x"]], [1, 2]):
        bad.write_text(json.dumps(content), encoding="utf-8")
        with pytest.raises(ValueError, match="JSON list of token id lists"):
            ReferenceContinuations.from_file(bad)
    bad.write_text("not json", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.json: not JSON"):
        ReferenceContinuations.from_file(bad)


def test_a_bad_reference_file_is_one_line_from_the_cli(tmp_path: Path) -> None:
    """Refused before the worker loads its model: exit status 2 and the file named, no traceback."""
    bad = tmp_path / "refs.json"
    bad.write_text('{"a": 1}', encoding="utf-8")
    for path, message in ((bad, "expected a JSON list"), (tmp_path / "missing.json", "no such file")):
        proc = subprocess.run(
            [sys.executable, "-m", "specpipe", "serve", "draft", "--model", "unused", "--port", "0",
             "--controlled-acceptance", "0.5", "--reference-file", str(path)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_each_position_is_a_hit_with_the_chosen_probability() -> None:
    reference = list(range(1, 20_002))
    references = ReferenceContinuations([reference])
    for acceptance in (0.0, 0.3, 0.8, 1.0):
        steer = ControlledAcceptance(references, acceptance, vocab_size=50_000)
        hits = 0
        for position in range(1, 20_001):
            token = steer(reference[:position], model_token=-1)
            assert token != -1  # covered by the reference: never the model's own
            if token == reference[position]:
                hits += 1
            else:
                assert token == (reference[position] + 1) % 50_000  # a miss proposes another token
        assert hits / 20_000 == pytest.approx(acceptance, abs=0.01)
    # The same draws every time (a pure function of seed, reference and position); another seed differs.
    steer = ControlledAcceptance(references, 0.5, vocab_size=50_000)
    pattern = [steer.hit(0, p) for p in range(200)]
    assert pattern == [steer.hit(0, p) for p in range(200)]
    assert pattern != [ControlledAcceptance(references, 0.5, 50_000, seed=1).hit(0, p) for p in range(200)]


def test_histories_without_a_reference_keep_the_model_token() -> None:
    steer = ControlledAcceptance(ReferenceContinuations([[1, 2, 3]]), 1.0, vocab_size=10)
    assert steer([1, 2], model_token=9) == 3
    assert steer([1, 5], model_token=9) == 9
    assert steer([1, 2, 3], model_token=9) == 9  # past the reference's end
    with pytest.raises(ValueError):
        ControlledAcceptance(ReferenceContinuations([]), 1.5, vocab_size=10)


def test_worker_config_takes_it_only_for_a_draft_model() -> None:
    WorkerConfig("draft", "m", controlled_acceptance=0.7, reference_file="r.json")
    for kwargs, message in (
        ({"role": "target"}, "draft worker"),
        ({"drafter": "prompt-lookup"}, "draft worker"),
        ({"controlled_acceptance": 1.2}, r"\[0, 1\]"),
        ({"reference_file": ""}, "reference file"),
        ({"controlled_acceptance": None}, "only read with controlled acceptance"),
    ):
        config = {"role": "draft", "controlled_acceptance": 0.7, "reference_file": "r.json", **kwargs}
        with pytest.raises(ValueError, match=message):
            WorkerConfig(model_path="m", **config)  # type: ignore[arg-type]


def greedy_continuation(model_dir: Path, prompt: list[int], tokens: int) -> list[int]:
    """The target alone, greedy, `tokens` steps past the prompt (past EOS too: drafts may look beyond)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(tokens):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids


@pytest.fixture(scope="module")
def references(model_pair: ModelPair, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("controlled") / "references.json"
    sequences = [greedy_continuation(model_pair.target_dir, list(p), MAX_NEW_TOKENS + 20) for p in PROMPTS]
    path.write_text(json.dumps(sequences), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def steered_pipeline(
    model_pair: ModelPair, redis_server, references: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    """A draft worker whose greedy drafts are always the target's tokens (acceptance 1)."""
    steer = ["--controlled-acceptance", "1.0", "--reference-file", str(references)]
    log_dir = tmp_path_factory.mktemp("controlled-logs")
    pipeline = start_pipeline(model_pair, redis_server, log_dir, draft_extra=steer)
    yield pipeline
    stop_pipeline(pipeline)


def test_greedy_through_a_steered_draft_is_the_target_alone_with_every_draft_accepted(
    steered_pipeline: Pipeline, references: Path
) -> None:
    sequences = json.loads(references.read_text(encoding="utf-8"))
    with CoordinatorClient(steered_pipeline.coordinator_addr) as client:
        for prompt, sequence in zip(PROMPTS, sequences, strict=True):
            for k in (4, None):  # fixed k, and the coordinator's adaptive k (pipelined: bonus guesses too)
                request = build_request(list(prompt), MAX_NEW_TOKENS, num_speculative_tokens=k)
                result = client.generate(request)
                expected = sequence[len(prompt) : len(prompt) + len(result.token_ids)]
                assert result.token_ids == expected, (prompt, k)
                assert len(result.token_ids) == MAX_NEW_TOKENS or result.finish_reason == "stop"
                usage = result.usage
                assert usage is not None and usage.draft_tokens > 0
                # Only the last round may lose drafts: those past max_new_tokens are cut, not rejected.
                assert usage.draft_tokens - usage.accepted_tokens <= 16, (prompt, k, usage)
                if k == 4 and len(result.token_ids) == MAX_NEW_TOKENS:
                    assert usage.target_passes == -(-MAX_NEW_TOKENS // (k + 1)), usage  # 5 tokens a pass
