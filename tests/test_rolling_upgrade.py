"""A rolling upgrade: a draft worker older than a sampling field the request uses (it drops min_p, as a build
from before the field would) must not change a token. Its delegated rounds are refused at the first verdict,
whose echo lacks the field, and the coordinator serves the request with its own rounds, whose requests to
the (new) target carry every field."""

from __future__ import annotations

import os
from pathlib import Path

from specpipe.client import CoordinatorClient, build_request
from tests.conftest import Pipeline, service_env, start_coordinator, worker_process
from tests.prompts import PROMPTS

# Loaded by the old draft worker's interpreter at start-up (sitecustomize): its SamplingParams lose min_p.
OLD_DRAFT_HOOK = """
import dataclasses

import specpipe.sampling.params as params

_build = params.SamplingParams._build.__func__


def _build_without_min_p(cls, pb):
    return dataclasses.replace(_build(cls, pb), min_p=0.0)


params.SamplingParams._build = classmethod(_build_without_min_p)
"""


def test_a_draft_older_than_a_field_hands_the_rounds_back_to_the_coordinator(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    hook = tmp_path / "old-draft-hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(OLD_DRAFT_HOOK)
    draft = worker_process("draft", pipeline.pair.draft_dir, tmp_path, "old-draft")
    env = service_env()
    draft.start(
        {**env, "PYTHONPATH": os.pathsep.join(p for p in (str(hook), env.get("PYTHONPATH", "")) if p)}
    )
    coordinator = start_coordinator(draft.address, pipeline.target.address, pipeline.redis.url, tmp_path)
    try:
        draft.wait_serving(120)
        coordinator.wait_serving(120)
        for seed in (1, 2):
            # The coupled rule: the target's own seeded samples, whoever drafts, so both must agree.
            request = build_request(
                PROMPTS[1], 24, temperature=1.2, min_p=0.15, seed=seed, acceptance="coupled"
            )
            with CoordinatorClient(coordinator.address) as client:
                served = client.generate(request, 60)
            with CoordinatorClient(pipeline.coordinator_addr) as client:
                expected = client.generate(request, 60)
            assert served.token_ids == expected.token_ids, seed
        log = coordinator.log_path.read_text(errors="replace")
        assert "delegated rounds on draft" in log and "refused, continuing here" in log, (
            coordinator.log_tail()
        )
        assert "min_p" in log
    finally:
        coordinator.stop()
        draft.stop()
