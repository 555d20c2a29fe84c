"""A batched pass of the target (specpipe/rpc/session_batcher.py): the blocks of several sessions' streams.

Each block is judged as it would be alone: its chain (target_service/chain.py) skips it or records its
verdict, and the acceptance rule runs on the block's own rows of logits. Only the forward pass is shared:
the runner's packed forward (`forward_packed` of specpipe/runtime/lean_gpt2.py or lean_llama.py) computes
every layer's matrix products over all the sessions' rows at once, which is where the throughput comes
from. Packing changes a block's logits only as any change in the number of rows of a matrix product can
(float rounding, the same kind of difference as verifying a block against decoding it token by token), so
greedy outputs stay the target's own (docs/architecture.md, "Cross-session batching").
"""

from __future__ import annotations

from collections.abc import Sequence

from target_service.chain import VerifyChain
from target_service.verifier import Verdict, Verifier, VerifyBlock


def verify_batch(
    verifier: Verifier, calls: Sequence[tuple[VerifyChain, VerifyBlock]]
) -> list[Verdict | Exception]:
    """On the model thread: the skips of chained blocks whose assumption failed, one pass for the rest."""
    outcomes: list[Verdict | Exception | None] = [chain.admit(block) for chain, block in calls]
    to_verify = [index for index, outcome in enumerate(outcomes) if outcome is None]
    if to_verify:
        verdicts = verifier.verify_many([calls[i][1] for i in to_verify])
        for index, verdict in zip(to_verify, verdicts, strict=True):
            chain, block = calls[index]
            outcomes[index] = verdict if isinstance(verdict, Exception) else chain.record(block, verdict)
    return [outcome for outcome in outcomes if outcome is not None]
