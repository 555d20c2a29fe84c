"""Chained verification (target_service/chain.py) against a real target worker over its stream (gRPC's and
the direct one): a chained block is verified only when the history it extends is the one the previous verdict
produced, and then gets the verdict an ordinary request would; otherwise it is skipped and the stream goes on
as if it had not come."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc
import pytest

from specpipe.rpc.direct_call import DirectStreamCall
from specpipe.rpc.worker_clients import TargetClient, TargetStream, Verification
from specpipe.sampling.params import SamplingParams
from specpipe.v1 import common_pb2, target_pb2
from tests.conftest import Pipeline, with_target_client

HISTORY = [5, 17, 42, 8, 99, 3, 61, 20]
GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=0.9, seed=7)
TIMEOUT_S = 30.0


async def unary_verify(
    client: TargetClient,
    session_id: str,
    history: Sequence[int],
    block: Sequence[int],
    sampling: SamplingParams,
) -> Verification:
    request = target_pb2.VerifyRequest(
        session_id=session_id, token_ids=history, draft_token_ids=block, sampling=sampling.to_pb()
    )
    reply = await client.stub.Verify(request, timeout=TIMEOUT_S)
    assert not reply.skipped
    return Verification(reply.num_accepted, reply.next_token_id, reply.forward_ns)


async def greedy_continuation(client: TargetClient, history: Sequence[int], length: int) -> list[int]:
    tokens: list[int] = []
    for _ in range(length):
        verdict = await unary_verify(client, "continuation", [*history, *tokens], [], GREEDY)
        tokens.append(verdict.next_token_id)
    await client.release_session("continuation", TIMEOUT_S)
    return tokens


@pytest.fixture(params=["grpc", "direct"])
def transport(request: pytest.FixtureRequest) -> str:
    """Session streams over gRPC (VerifyStream) and over the target's direct-stream listener."""
    return str(request.param)


async def open_stream(client: TargetClient, transport: str) -> TargetStream:
    if transport == "grpc":
        return client.open_stream(TIMEOUT_S)
    stream = await client.connect_stream(TIMEOUT_S)
    assert isinstance(stream.call, DirectStreamCall)  # the shared pipeline's target serves direct streams
    return stream


def same(a: Verification, b: Verification) -> bool:
    return (a.num_accepted, a.next_token_id) == (b.num_accepted, b.next_token_id)


async def chained_counts(client: TargetClient) -> tuple[int, int]:
    stats = await client.stats()
    return stats.chained_verifies, stats.chained_skips


def test_a_chained_block_whose_assumption_holds_gets_the_ordinary_verdict(
    pipeline: Pipeline, transport: str
) -> None:
    async def test(client: TargetClient) -> None:
        g = await greedy_continuation(client, HISTORY, 6)
        before = await chained_counts(client)
        stream = await open_stream(client, transport)
        # Block i = g1 g2 (accepted whole, bonus g3); chained block i+1 = g4 and a wrong token.
        await stream.send("chain-holds", HISTORY, g[:2], [], GREEDY)
        chained_history = [*HISTORY, *g[:3]]
        await stream.send("chain-holds", chained_history, [g[3], (g[4] + 1) % 50], [], GREEDY, chained=True)
        first = await stream.receive(TIMEOUT_S)
        second = await stream.receive(TIMEOUT_S)
        assert first is not None and (first.num_accepted, first.next_token_id) == (2, g[2])
        assert second is not None
        ordinary = await unary_verify(client, "chain-ref", chained_history, [g[3], (g[4] + 1) % 50], GREEDY)
        assert same(second, ordinary) and second.num_accepted == 1 and second.next_token_id == g[4]
        # The stream goes on from the chained verdict's history.
        after = await stream.verify(
            "chain-holds", [*chained_history, g[3], g[4]], [g[5]], [], GREEDY, TIMEOUT_S
        )
        assert after.num_accepted == 1
        await stream.finish()
        verified, skipped = await chained_counts(client)
        assert (verified - before[0], skipped - before[1]) == (1, 0)
        for sid in ("chain-holds", "chain-ref"):
            await client.release_session(sid, TIMEOUT_S)

    with_target_client(pipeline, test)


def test_releasing_the_session_breaks_its_open_chains(pipeline: Pipeline, transport: str) -> None:
    """A chained block arriving after ReleaseSession is skipped: verifying it would rebuild the cache just
    freed (a stopped delegated request closes its target stream normally, a chained block possibly still
    queued)."""

    async def test(client: TargetClient) -> None:
        g = await greedy_continuation(client, HISTORY, 4)
        stream = await open_stream(client, transport)
        verdict = await stream.verify("chain-released", HISTORY, g[:2], [], GREEDY, TIMEOUT_S)
        assert (verdict.num_accepted, verdict.next_token_id) == (2, g[2])
        assert await client.release_session("chain-released", TIMEOUT_S)
        # It extends exactly the history the verdict produced, so it would have been verified.
        await stream.send("chain-released", [*HISTORY, *g[:3]], [g[3]], [], GREEDY, chained=True)
        assert await stream.receive(TIMEOUT_S) is None
        assert not (await client.stats("chain-released")).session_cached
        # The stream itself goes on: an ordinary request rebuilds the session from its history...
        after = await stream.verify("chain-released", [*HISTORY, *g[:3]], [g[3]], [], GREEDY, TIMEOUT_S)
        assert after.num_accepted == 1
        assert (await client.stats("chain-released")).session_cached
        # ...and the end of the stream frees it again, though it ends normally: the release stands.
        await stream.finish()
        for _ in range(200):
            if not (await client.stats("chain-released")).session_cached:
                break
            await asyncio.sleep(0.01)
        assert not (await client.stats("chain-released")).session_cached

    with_target_client(pipeline, test)


def test_a_chained_block_after_a_rejection_or_a_wrong_guess_is_skipped(
    pipeline: Pipeline, transport: str
) -> None:
    async def test(client: TargetClient) -> None:
        g = await greedy_continuation(client, HISTORY, 5)
        before = await chained_counts(client)
        wrong = (g[1] + 1) % 50
        stream = await open_stream(client, transport)
        # Block i = g1, wrong: rejected at its second token, so nothing chained to it may run.
        await stream.send("chain-fails", HISTORY, [g[0], wrong], [], GREEDY)
        await stream.send("chain-fails", [*HISTORY, g[0], wrong, 0], [1, 2], [], GREEDY, chained=True)
        # A chained block after a skipped one is skipped too.
        await stream.send("chain-fails", [*HISTORY, g[0], wrong, 0, 1, 2, 3], [4], [], GREEDY, chained=True)
        verdict = await stream.receive(TIMEOUT_S)
        assert verdict is not None and (verdict.num_accepted, verdict.next_token_id) == (1, g[1])
        assert await stream.receive(TIMEOUT_S) is None
        assert await stream.receive(TIMEOUT_S) is None
        # A wrong bonus guess: block g3 accepted, bonus g4, but the chained block assumed another token.
        await stream.send("chain-fails", [*HISTORY, g[0], g[1]], [g[2]], [], GREEDY)
        await stream.send(
            "chain-fails", [*HISTORY, *g[:3], (g[3] + 1) % 50], [g[4]], [], GREEDY, chained=True
        )
        verdict = await stream.receive(TIMEOUT_S)
        assert verdict is not None and (verdict.num_accepted, verdict.next_token_id) == (1, g[3])
        stream.unwanted_replies += 1  # what the coordinator does once it knows the guess failed
        # The skipped requests' tokens are cut by the next one: it verifies as if they had never come.
        after = await stream.verify("chain-fails", [*HISTORY, *g[:4]], [g[4]], [], GREEDY, TIMEOUT_S)
        assert (after.num_accepted, after.next_token_id) == (
            1,
            (await greedy_continuation(client, HISTORY, 6))[5],
        )
        await stream.finish()
        verified, skipped = await chained_counts(client)
        assert (verified - before[0], skipped - before[1]) == (0, 3)
        await client.release_session("chain-fails", TIMEOUT_S)

    with_target_client(pipeline, test)


def test_a_stream_never_starts_with_a_verified_chained_block(pipeline: Pipeline, transport: str) -> None:
    async def test(client: TargetClient) -> None:
        stream = await open_stream(client, transport)
        await stream.send("chain-first", HISTORY, [1, 2], [], GREEDY, chained=True)
        assert await stream.receive(TIMEOUT_S) is None
        await stream.finish()
        await client.release_session("chain-first", TIMEOUT_S)

    with_target_client(pipeline, test)


def test_a_sampled_chained_block_gets_the_seeded_ordinary_verdict(pipeline: Pipeline, transport: str) -> None:
    async def test(client: TargetClient) -> None:
        # Block i is empty (k = 0), so it is accepted whole; its next token is the seeded sample.
        sampled = await unary_verify(client, "sample-ref", HISTORY, [], SAMPLED)
        chained_history = [*HISTORY, sampled.next_token_id]
        block = [3, 9, 27]
        reference = await unary_verify(client, "sample-ref2", chained_history, block, SAMPLED)
        stream = await open_stream(client, transport)
        await stream.send("chain-sampled", HISTORY, [], [], SAMPLED)
        await stream.send("chain-sampled", chained_history, block, [], SAMPLED, chained=True)
        first, second = await stream.receive(TIMEOUT_S), await stream.receive(TIMEOUT_S)
        assert first is not None and first.next_token_id == sampled.next_token_id
        assert second is not None and same(second, reference)
        await stream.finish()
        for sid in ("sample-ref", "sample-ref2", "chain-sampled"):
            await client.release_session(sid, TIMEOUT_S)

    with_target_client(pipeline, test)


def test_a_unary_chained_request_is_an_invalid_argument(pipeline: Pipeline) -> None:
    async def test(client: TargetClient) -> None:
        request = target_pb2.VerifyRequest(
            session_id="unary-chained", token_ids=HISTORY, draft_token_ids=[1], chained=True
        )
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.stub.Verify(request, timeout=TIMEOUT_S)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "VerifyStream" in (raised.value.details() or "")

    with_target_client(pipeline, test)


def test_the_coordinator_chains_pipelined_blocks(pipeline: Pipeline) -> None:
    """Through the shared coordinator (pipelining and chaining on by default), greedy requests get chained
    blocks verified; their outputs are checked against the target alone by test_pipeline_greedy."""
    from specpipe.client import CoordinatorClient, build_request
    from tests.prompts import PROMPTS

    async def counts() -> tuple[int, int]:
        client = TargetClient(pipeline.target.address)
        try:
            return await chained_counts(client)
        finally:
            await client.close()

    before = asyncio.run(counts())
    with CoordinatorClient(pipeline.coordinator_addr) as coordinator:
        for prompt in PROMPTS[:3]:
            coordinator.generate(build_request(prompt, 48, num_speculative_tokens=3), 60)
    verified, _ = asyncio.run(counts())
    assert verified > before[0]


def test_stream_replies_are_read_in_order_after_unwanted_ones() -> None:
    """unwanted_replies are dropped before the next reply is returned (no server: a scripted call)."""

    class ScriptedCall:
        def __init__(self, replies: list[target_pb2.VerifyResponse]) -> None:
            self.replies = replies
            self.written: list[target_pb2.VerifyRequest] = []

        async def write(self, request: target_pb2.VerifyRequest) -> None:
            self.written.append(request)

        async def read(self) -> target_pb2.VerifyResponse:
            return self.replies.pop(0)

    replies = [
        target_pb2.VerifyResponse(skipped=True),
        target_pb2.VerifyResponse(num_accepted=2, next_token_id=9),
    ]
    call = ScriptedCall(replies)

    async def main() -> tuple[Verification, TargetStream]:
        client = TargetClient("127.0.0.1:1")  # never connected: the call is scripted
        stream = TargetStream(client, call)
        await stream.send("s", [1, 2, 3], [4], [], GREEDY, chained=True)
        stream.unwanted_replies = 1
        verdict = await stream.verify("s", [1, 2], [4, 5], [common_pb2.TokenDistribution()] * 2, GREEDY, 1.0)
        await client.close()
        return verdict, stream

    verdict, stream = asyncio.run(main())
    assert (verdict.num_accepted, verdict.next_token_id) == (2, 9)
    assert stream.awaited == 0 and stream.unwanted_replies == 0
    # The second request continues the first's history from where they differ.
    assert [r.start_position for r in call.written] == [0, 2]
    assert [list(r.token_ids) for r in call.written] == [[1, 2, 3], []]


def test_no_block_is_chained_behind_a_guess_that_would_end_the_request() -> None:
    """A bonus guess of EOS ends the request if it holds, so the block after it is not queued on the target
    (its verify would be wasted); any other guess is chained."""
    from coordinator.speculation import SpeculativeGenerator
    from specpipe.speculation.adaptive_k import DraftLengthPolicy
    from specpipe.speculation.limits import ModelLimits
    from specpipe.speculation.rounds import Proposal

    eos = 2
    limits = ModelLimits(
        target_context=512, draft_context=512, vocab_size=100, eos_token_ids=frozenset({eos})
    )
    generator = SpeculativeGenerator(
        None,
        None,
        None,
        None,
        limits,
        30.0,
        "test",
        8,
        None,
        pipelining=True,  # type: ignore[arg-type]
    )

    class Draft:
        def __init__(self, tokens: list[int]) -> None:
            self.tokens = tokens

        async def propose(self, history: list[int], k: int, sampling: SamplingParams, **_: bool) -> Proposal:
            return Proposal(self.tokens, (), 0)

    class Target:
        def __init__(self) -> None:
            self.chained: list[list[int]] = []

        async def send_chained(
            self, history: list[int], ids: list[int], probs: list, sampling: object
        ) -> object:
            self.chained.append(list(ids))
            return object()

    planner = generator.planner(DraftLengthPolicy(4, None, 8, pipelined=True))

    async def chain(tokens: list[int]) -> Target:
        target = Target()
        verify = asyncio.get_running_loop().create_future()  # the verdict has not come
        guess, queued = await generator.draft_ahead(
            planner,
            Draft(tokens),
            target,
            verify,
            [5, 6, 7],
            2,
            GREEDY,  # type: ignore[arg-type]
        )
        assert guess is not None and guess.token_ids == tokens
        assert (queued is None) == (not target.chained)
        return target

    assert asyncio.run(chain([9, 10, 11])).chained == [[10, 11]]
    assert asyncio.run(chain([eos, 10, 11])).chained == []
    assert limits.has_eos([4, eos]) and not limits.has_eos([4, 5])
    # Nor is anything drafted ahead of a block holding EOS: accepted whole, it ends the request.
    assert planner.ahead(10, [4, 5], 100) > 0 and planner.ahead(10, [4, eos], 100) == 0
