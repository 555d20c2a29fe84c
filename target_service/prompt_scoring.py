"""Prompt log-probabilities (GenerateRequest.prompt_logprobs): the target scores a turn's prompt tokens.

The scoring pass is the session's prefill: it runs through the session's KV cache, which then holds the
prompt, so the first verify after it feeds only its block and the request pays for the prompt once. The
rows are computed a chunk of positions at a time: a long prompt never holds a [prompt, vocab] matrix of
logits at once (4k positions of a 128k vocabulary would be 2 GB of float32), and the worker runs each chunk
as its own model-thread job, so other sessions' verifies are not held up behind a whole long prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

from specpipe.errors import InvalidArgumentError
from specpipe.runtime.model_runner import CausalLMRunner
from specpipe.sampling.logprobs import token_logprobs
from specpipe.sampling.params import MAX_TOP_LOGPROBS
from specpipe.speculation.prompt_scores import PromptScores, PromptScoring

ROWS_PER_FORWARD = 256  # [256, vocab] float32 logits per pass: 128 MB at a 128k vocabulary


def validate_scoring(runner: CausalLMRunner, scoring: PromptScoring) -> None:
    if not scoring.session_id:
        raise InvalidArgumentError("session_id must not be empty")
    length = len(scoring.token_ids)
    if not 1 <= scoring.first_position < length:
        raise InvalidArgumentError(f"first_position must be in [1, {length}) for {length} tokens")
    if length > runner.max_context:
        raise InvalidArgumentError(f"token_ids ({length}) exceed the target context of {runner.max_context}")
    if not runner.in_vocab(scoring.token_ids):
        raise InvalidArgumentError(f"token_ids must be in [0, {runner.vocab_size})")
    if scoring.top_logprobs > MAX_TOP_LOGPROBS:
        raise InvalidArgumentError(
            f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {scoring.top_logprobs}"
        )


def scoring_chunks(scoring: PromptScoring, rows_per_forward: int = ROWS_PER_FORWARD) -> list[tuple[int, int]]:
    """The [start, end) ranges of token positions scored one forward each."""
    return [
        (start, min(start + rows_per_forward, len(scoring.token_ids)))
        for start in range(scoring.first_position, len(scoring.token_ids), rows_per_forward)
    ]


def score_chunk(runner: CausalLMRunner, scoring: PromptScoring, start: int, end: int) -> PromptScores:
    """The log-probs of the tokens at positions start..end - 1, from the rows of positions start - 1..end - 2;
    afterwards the session's cache holds the tokens before end - 1."""
    ids = scoring.token_ids
    result = runner.forward(scoring.session_id, ids[: end - 1], end - start)  # [end - start, vocab_size]
    logprobs = token_logprobs(result.logits, ids[start:end], scoring.top_logprobs)
    return PromptScores(tuple(logprobs), result.forward_ns, result.cached_tokens)


def merge_scores(parts: Sequence[PromptScores]) -> PromptScores:
    """The chunks' scores as one answer; its cached tokens are what the session's cache held at the start."""
    return PromptScores(
        tuple(logprob for part in parts for logprob in part.logprobs),
        sum(part.forward_ns for part in parts),
        parts[0].cached_tokens if parts else 0,
    )


def score_prompt(
    runner: CausalLMRunner, scoring: PromptScoring, rows_per_forward: int = ROWS_PER_FORWARD
) -> PromptScores:
    """Each token's log_softmax from first_position on, given the tokens before it, in one call (the worker
    runs the chunks as separate model-thread jobs instead). Afterwards the session's cache holds every token
    but the last, whose row the first verify computes with its block."""
    validate_scoring(runner, scoring)
    return merge_scores(
        [score_chunk(runner, scoring, start, end) for start, end in scoring_chunks(scoring, rows_per_forward)]
    )
