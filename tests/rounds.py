"""One round settled by the coordinator without services, for the checks it makes on a verdict before it
commits the round (nothing past them is reached: no store, no workers, no tokenizer)."""

from __future__ import annotations

import pytest

from coordinator.request import GenerationRequest, Usage
from coordinator.speculation import OpenSession, RequestProgress, SpeculativeGenerator
from specpipe.errors import SpecpipeError
from specpipe.sampling.params import SamplingParams
from specpipe.speculation.limits import ModelLimits
from specpipe.speculation.rounds import Verification
from specpipe.text.detokenizer import IncrementalDetokenizer


def refused_round(sampling: SamplingParams, draft_ids: list[int], verdict: Verification) -> SpecpipeError:
    """The error the coordinator refuses a new session's first round with; the session is left as it was
    (nothing committed, the history still the prompt)."""
    generator = SpeculativeGenerator(
        None, None, None, None, ModelLimits(256, 256, 100, frozenset()), 10.0, "test",  # type: ignore[arg-type]
        max_speculative_tokens=4, costs=None, pipelining=False,
    )  # fmt: skip
    prompt = [1, 2, 3]
    request = GenerationRequest("", tuple(prompt), 8, sampling, (), "", len(draft_ids))
    session = OpenSession("s", list(prompt), list(prompt), None, is_new=True)
    progress = RequestProgress(Usage(), IncrementalDetokenizer(None), generator.limits)  # type: ignore[arg-type]
    with pytest.raises(SpecpipeError) as refused:
        generator.settle(request, session, progress, draft_ids, verdict)
    assert session.history == prompt and not session.persisted and progress.generated == []
    return refused.value
