"""Cross-session batching: packed forward passes, the batcher, the target's and the draft's batched calls,
and the pipeline through batching workers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from draft_service.drafter import DraftProposal, DraftRequest, ModelDrafter
from specpipe.client import CoordinatorClient, build_request
from specpipe.errors import InvalidArgumentError
from specpipe.rpc.session_batcher import SessionBatcher
from specpipe.runtime.model_runner import CausalLMRunner
from specpipe.sampling.params import SamplingParams
from target_service.batching import verify_batch
from target_service.chain import ChainCounters, VerifyChain
from target_service.verifier import Verdict, Verifier, VerifyBlock
from tests.conftest import (
    ModelPair,
    Pipeline,
    RedisServerProcess,
    start_coordinator,
    start_pipeline,
    stop_pipeline,
)
from tests.prompts import PROMPTS
from tests.reference import target_alone
from tests.test_metrics import scrape, value

MAX_NEW_TOKENS = 24
GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=0.9, seed=11)


def load_runner(model_dir: Path, lean: bool = True) -> CausalLMRunner:
    return CausalLMRunner.load(model_dir, "cpu", "float32", max_cached_sessions=16, lean_forward=lean)


def histories(count: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = [5, 40, 17, 1, 63, 9, 28, 2][:count]
    return [torch.randint(0, vocab_size, (n,), generator=generator).tolist() for n in lengths]


def test_packed_pass_gives_each_session_its_own_logits(
    model_pair: ModelPair, single_torch_thread: None
) -> None:
    packed, alone = load_runner(model_pair.target_dir), load_runner(model_pair.target_dir)
    prompts = histories(4, packed.vocab_size)
    blocks = histories(4, packed.vocab_size, seed=1)
    for i, prompt in enumerate(prompts):  # warm caches of different lengths
        for runner in (packed, alone):
            runner.forward(f"s{i}", prompt, 1)
    calls = [(f"s{i}", [*prompt, *block[:3]], min(3, len(block)) + 0) for i, (prompt, block) in enumerate(
        zip(prompts, blocks, strict=True))]  # fmt: skip
    calls = [(sid, ids, min(num_rows, len(ids))) for sid, ids, num_rows in calls]
    together = packed.forward_many(calls)
    for (sid, ids, num_rows), result in zip(calls, together, strict=True):
        own = alone.forward(sid, ids, num_rows)
        assert result.logits.shape == own.logits.shape
        torch.testing.assert_close(result.logits, own.logits, rtol=1e-5, atol=1e-5)
        assert result.logits.argmax(-1).tolist() == own.logits.argmax(-1).tolist()
        assert result.cached_tokens == own.cached_tokens
    # The caches the packed pass wrote carry on like the sessions' own: one more token each.
    for i, (sid, ids, _) in enumerate(calls):
        after = [*ids, i + 7]
        torch.testing.assert_close(
            packed.forward(sid, after, 1).logits, alone.forward(sid, after, 1).logits, rtol=1e-5, atol=1e-5
        )


def test_a_packed_pass_rebuilds_an_evicted_session_and_crops_a_rejected_one(model_pair: ModelPair) -> None:
    """forward_many prepares each cache as forward does: a session evicted since its last call is rebuilt from
    the history it sends, one whose last block was rejected is cropped to the prefix it keeps."""
    packed, alone = load_runner(model_pair.target_dir), load_runner(model_pair.target_dir)
    evicted, rejected = histories(2, packed.vocab_size, seed=4)
    for runner in (packed, alone):
        runner.forward("evicted", evicted, 1)
        runner.forward("rejected", [*rejected, 5, 6, 7], 4)
    packed.caches.release("evicted")
    calls = [("evicted", [*evicted, 9], 2), ("rejected", [*rejected, 5, 8, 1], 2)]
    together = packed.forward_many(calls)
    assert [result.cached_tokens for result in together] == [0, len(rejected) + 1]
    for call, result in zip(calls, together, strict=True):
        torch.testing.assert_close(result.logits, alone.forward(*call).logits, rtol=1e-5, atol=1e-5)


def test_forward_many_takes_each_session_once(model_pair: ModelPair) -> None:
    runner = load_runner(model_pair.target_dir)
    with pytest.raises(ValueError, match="at most once"):
        runner.forward_many([("a", [1, 2], 1), ("a", [1, 2, 3], 1)])
    assert runner.packs_sessions
    assert not load_runner(model_pair.target_dir, lean=False).packs_sessions


def test_verify_many_fails_only_the_invalid_block(model_pair: ModelPair) -> None:
    verifier = Verifier(load_runner(model_pair.target_dir))
    good = VerifyBlock("good", (1, 2, 3), (4, 5), None, GREEDY)
    bad = VerifyBlock("bad", (1, 2, 3), (verifier.runner.vocab_size,), None, GREEDY)
    outcomes = verifier.verify_many([good, bad])
    assert isinstance(outcomes[1], InvalidArgumentError)
    assert isinstance(outcomes[0], Verdict)
    assert strip(outcomes[0]) == strip(Verifier(load_runner(model_pair.target_dir)).verify(good))


VerifyBatcher = SessionBatcher[tuple[VerifyChain, VerifyBlock], Verdict]


def run_batcher(verifier: Verifier, test: object, max_tokens: int = 512) -> None:
    async def main() -> None:
        with ThreadPoolExecutor(1) as model_thread:
            loop = asyncio.get_running_loop()
            batcher: VerifyBatcher = SessionBatcher(
                lambda fn, *args: loop.run_in_executor(model_thread, fn, *args),
                lambda calls: verify_batch(verifier, calls),
                max_sessions=4,
                max_tokens=max_tokens,
            )
            await test(batcher)  # type: ignore[operator]

    asyncio.run(main())


def verify(batcher: VerifyBatcher, chain: VerifyChain, block: VerifyBlock, new_tokens: int) -> object:
    return batcher.run(block.session_id, new_tokens, (chain, block))


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_batched_verdicts_equal_unbatched(model_pair: ModelPair, sampling: SamplingParams) -> None:
    batched = Verifier(load_runner(model_pair.target_dir))
    alone = Verifier(load_runner(model_pair.target_dir))
    vocab = batched.runner.vocab_size
    prompts, drafts = histories(6, vocab), histories(6, vocab, seed=2)
    blocks = [VerifyBlock(f"s{i}", tuple(p), tuple(d[:4]), None, sampling) for i, (p, d) in enumerate(
        zip(prompts, drafts, strict=True))]  # fmt: skip

    async def test(batcher: VerifyBatcher) -> None:
        counters = ChainCounters()
        chains = [VerifyChain(batched, counters) for _ in blocks]
        verdicts = await asyncio.gather(
            *(
                verify(batcher, chain, block, len(block.token_ids))
                for chain, block in zip(chains, blocks, strict=True)
            )
        )
        expected = [alone.verify(block) for block in blocks]
        assert [strip(v) for v in verdicts] == [strip(v) for v in expected]
        # The first block ran alone (the batcher was idle); the five that waited for it shared one pass
        # (4 at most), the last the pass after.
        assert batcher.counters.passes == 3
        assert batcher.counters.calls == 6
        assert batcher.counters.largest == 4

    run_batcher(batched, test)


def strip(verdict: Verdict) -> tuple[int, int, bool]:
    return verdict.num_accepted, verdict.next_token_id, verdict.recovered


def test_batcher_skips_chained_blocks_and_answers_errors_per_block(model_pair: ModelPair) -> None:
    verifier = Verifier(load_runner(model_pair.target_dir))
    vocab = verifier.runner.vocab_size

    async def test(batcher: VerifyBatcher) -> None:
        counters = ChainCounters()
        first, second, third = (VerifyChain(verifier, counters) for _ in range(3))
        opener = VerifyBlock("opener", (1, 2, 3), (4,), None, GREEDY)
        stale = VerifyBlock("stale", (9, 9, 9), (1,), None, GREEDY, chained=True)  # extends no verdict
        invalid = VerifyBlock("invalid", (1, 2), (vocab + 5,), None, GREEDY)
        results = await asyncio.gather(
            verify(batcher, first, opener, 3),
            verify(batcher, second, stale, 3),
            verify(batcher, third, invalid, 2),
            return_exceptions=True,
        )
        assert isinstance(results[0], Verdict) and not results[0].skipped
        assert isinstance(results[1], Verdict) and results[1].skipped
        assert isinstance(results[2], InvalidArgumentError)
        assert counters.skipped == 1

    run_batcher(verifier, test)


def test_a_cancelled_wait_leaves_the_batch(model_pair: ModelPair) -> None:
    verifier = Verifier(load_runner(model_pair.target_dir))

    async def test(batcher: VerifyBatcher) -> None:
        chain = VerifyChain(verifier, ChainCounters())
        running = asyncio.ensure_future(
            verify(batcher, chain, VerifyBlock("a", (1, 2), (3,), None, GREEDY), 2)
        )
        await asyncio.sleep(0)
        waiting = asyncio.ensure_future(
            verify(
                batcher, VerifyChain(verifier, ChainCounters()), VerifyBlock("b", (1,), (2,), None, GREEDY), 1
            )
        )
        await asyncio.sleep(0)
        waiting.cancel()
        assert not (await running).skipped
        for _ in range(10):
            await asyncio.sleep(0.01)
        assert batcher.counters.calls == 1  # b never ran
        assert "b" not in verifier.caches
        assert batcher.idle

    run_batcher(verifier, test)


def test_propose_many_equals_propose(model_pair: ModelPair) -> None:
    """Each request of a batched draft gets the proposal it would get alone: tokens, q and cache use, for
    greedy, Leviathan and coupled sampling, a bonus guess, and requests of different lengths."""
    batched = ModelDrafter(load_runner(model_pair.draft_dir), max_draft_tokens=8)
    alone = ModelDrafter(load_runner(model_pair.draft_dir), max_draft_tokens=8)
    vocab = batched.runner.vocab_size
    coupled = SamplingParams(temperature=0.7, seed=5, acceptance="coupled")
    samplings = [GREEDY, SAMPLED, coupled, SAMPLED, GREEDY]
    requests = [
        DraftRequest(f"s{i}", tuple(history), num_tokens, sampling, first_is_bonus_guess=i == 3)
        for i, (history, num_tokens, sampling) in enumerate(
            zip(histories(5, vocab), (4, 1, 6, 3, 2), samplings, strict=True)
        )
    ]
    for round_ in range(2):  # the second round reuses the caches the first one wrote
        if round_:
            requests = [
                DraftRequest(r.session_id, (*r.token_ids, 3, 4), r.num_tokens, r.sampling) for r in requests
            ]
        together = batched.propose_many([*requests, DraftRequest("bad", (vocab,), 2, GREEDY)])
        assert isinstance(together[-1], InvalidArgumentError)
        for request, proposal in zip(requests, together, strict=False):
            assert isinstance(proposal, DraftProposal)
            own = alone.propose(request)
            assert proposal.token_ids == own.token_ids
            assert proposal.cached_tokens == own.cached_tokens
            assert (proposal.draft_probs is None) == (own.draft_probs is None)
            for (ids, values), (own_ids, own_values) in zip(
                proposal.draft_probs or [], own.draft_probs or [], strict=True
            ):
                assert ids == own_ids
                torch.testing.assert_close(values, own_values, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def batching_pipeline(
    model_pair: ModelPair, redis_server: RedisServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    pipeline = start_pipeline(
        model_pair,
        redis_server,
        tmp_path_factory.mktemp("batching"),
        draft_extra=["--max-batch-sessions", "4"],
        target_extra=["--max-batch-sessions", "4"],
    )
    yield pipeline
    stop_pipeline(pipeline)


def test_concurrent_greedy_requests_through_batching_workers_equal_the_target_alone(
    batching_pipeline: Pipeline,
) -> None:
    prompts = PROMPTS[:8]
    expected = target_alone(batching_pipeline.pair.target_dir, prompts, MAX_NEW_TOKENS)

    def generate(prompt: str) -> list[int]:
        # Every other request asks for log-probs: passes mix blocks with and without them.
        logprobs = 2 if prompts.index(prompt) % 2 else None
        with CoordinatorClient(batching_pipeline.coordinator_addr) as client:
            result = client.generate(build_request(prompt, MAX_NEW_TOKENS, logprobs=logprobs), timeout_s=120)
        if logprobs is None:
            assert result.logprobs == []
        else:  # each from its own row of the packed pass: greedy, so its token is that row's most likely
            assert [lp.token_id for lp in result.logprobs] == result.token_ids
            assert all(lp.top_token_ids[0] == lp.token_id for lp in result.logprobs)
        return result.token_ids

    with ThreadPoolExecutor(len(prompts)) as clients:
        outputs = list(clients.map(generate, prompts))
    assert dict(zip(prompts, outputs, strict=True)) == expected

    async def batched() -> int:
        from specpipe.rpc.worker_clients import TargetClient

        client = TargetClient(batching_pipeline.target.address)
        try:
            stats = await client.stats()
        finally:
            await client.close()
        assert stats.batched_blocks >= stats.batched_passes > 0
        return stats.largest_batch

    assert asyncio.run(batched()) > 1  # some pass verified more than one session's block
    for role in ("draft", "target"):  # each served some sessions' calls together
        scraped = scrape(batching_pipeline, role)
        calls = value(scraped, "specpipe_worker_batched_blocks_total", role=role)
        assert calls > value(scraped, "specpipe_worker_batched_passes_total", role=role) > 0, role


def test_the_coordinators_own_loop_through_batching_workers_equals_the_target_alone(
    batching_pipeline: Pipeline, tmp_path: Path
) -> None:
    """Without delegation the coordinator's ProposeStream and VerifyStream calls go through the batchers."""
    pipeline = batching_pipeline
    coordinator = start_coordinator(
        pipeline.draft.address, pipeline.target.address, pipeline.redis.url, tmp_path, ["--no-delegation"]
    )
    try:
        coordinator.wait_serving(60)
        prompts = PROMPTS[8:12]
        expected = target_alone(pipeline.pair.target_dir, prompts, MAX_NEW_TOKENS)

        def generate(prompt: str) -> list[int]:
            with CoordinatorClient(coordinator.address) as client:
                return client.generate(build_request(prompt, MAX_NEW_TOKENS), timeout_s=120).token_ids

        with ThreadPoolExecutor(len(prompts)) as clients:
            assert dict(zip(prompts, clients.map(generate, prompts), strict=True)) == expected
    finally:
        coordinator.stop()
