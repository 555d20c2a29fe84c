"""Measuring the draft and verify costs once, at pairing time, for the adaptive-k policy."""

from __future__ import annotations

import logging
import statistics
import time
import uuid

from specpipe.errors import SpecpipeError
from specpipe.rpc.worker_clients import DraftClient, TargetClient
from specpipe.sampling.params import SamplingParams
from specpipe.speculation.adaptive_k import CostProfile

logger = logging.getLogger(__name__)


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of y over x."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var_x = sum((x - mean_x) ** 2 for x, _ in points)
    if var_x == 0:
        return mean_y, 0.0
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / var_x
    return mean_y - slope * mean_x, slope


def median_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(intercept, slope) of the line through the median y at each x: one slow sample (a scheduler hiccup
    on a busy machine) moves a least-squares fit of a few points by 30%, and with it the k schedule."""
    by_x: dict[float, list[float]] = {}
    for x, y in points:
        by_x.setdefault(x, []).append(y)
    return fit_line([(x, statistics.median(ys)) for x, ys in by_x.items()])


async def measure_cost_profile(
    draft: DraftClient, target: TargetClient, max_k: int, context: int, repetitions: int = 10
) -> CostProfile:
    """Runs greedy rounds for k in {1, max_k / 2, max_k} on a throwaway session and fits the costs (1.3 s
    with the demo pair and max_k 16 on the 2-core CPU, from run 11's coordinator logs); rounds with k = 0
    (verify only) between them give the overhead of a round without a draft call."""
    ks = sorted({1, max(1, max_k // 2), max(1, max_k)})
    prompt = [1 + i % 200 for i in range(32)]
    session_id = f"profile-{uuid.uuid4().hex}"
    draft_stream, target_stream = draft.open_stream(120.0), target.open_stream(120.0)
    greedy = SamplingParams()
    draft_token_s: list[float] = []
    verify_points: list[tuple[float, float]] = []
    overheads: list[float] = []
    plain_overheads: list[float] = []
    history = list(prompt)
    try:
        for _ in range(repetitions):
            for k in ks:
                if len(history) + 2 * k + 3 > context:
                    history = list(prompt)
                started = time.perf_counter()
                verdict = await target_stream.verify(session_id, history, [], (), greedy, 60.0)
                plain_overheads.append(max(time.perf_counter() - started - verdict.forward_ns / 1e9, 0.0))
                history.append(verdict.next_token_id)
                started = time.perf_counter()
                proposal = await draft_stream.propose(session_id, history, k, greedy, 60.0)
                # A drafter may propose fewer than k tokens (prompt lookup without a match): the block is
                # filled up to k with history tokens, since the verify's cost depends on its size only.
                proposed = list(proposal.token_ids[:k])
                block = [*proposed, *history[: k - len(proposed)]]
                verdict = await target_stream.verify(session_id, history, block, (), greedy, 60.0)
                wall = time.perf_counter() - started
                draft_s, verify_s = proposal.forward_ns / 1e9, verdict.forward_ns / 1e9
                draft_token_s.append(draft_s / max(len(proposed), 1))
                verify_points.append((float(k), verify_s))
                overheads.append(max(wall - draft_s - verify_s, 0.0))
                history += [*block[: verdict.num_accepted], verdict.next_token_id]
    finally:
        draft_stream.cancel()  # a cancelled stream also frees the throwaway session's caches
        target_stream.cancel()
        for client in (draft, target):
            try:
                await client.release_session(session_id, timeout_s=5.0)
            except SpecpipeError:
                pass
    # The first repetition pays cold caches; drop it when there are enough samples.
    skip = len(ks) if repetitions > 1 else 0
    base, per_token = median_line(verify_points[skip:])
    round_overhead = statistics.median(plain_overheads[skip:])
    profile = CostProfile(
        draft_token_s=statistics.median(draft_token_s[skip:]),
        verify_base_s=max(base, 1e-6),
        verify_token_s=max(per_token, 0.0),
        round_overhead_s=round_overhead,
        draft_call_s=max(statistics.median(overheads[skip:]) - round_overhead, 0.0),
    )
    logger.info(
        "cost profile: draft %.3f ms/token, verify %.3f ms + %.3f ms/token, "
        "overhead %.3f ms/round (c = %.3f), draft call %.3f ms",
        profile.draft_token_s * 1e3,
        profile.verify_base_s * 1e3,
        profile.verify_token_s * 1e3,
        profile.round_overhead_s * 1e3,
        profile.draft_cost_ratio,
        profile.draft_call_s * 1e3,
    )
    return profile
