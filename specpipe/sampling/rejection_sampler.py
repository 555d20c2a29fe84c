"""Verification of a block of draft tokens against the target: speculative (rejection) sampling.

Implements the rule of Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding"
(arXiv:2211.17192, Algorithm 1), also Chen et al. 2023 (arXiv:2302.01318), whose output has exactly the
target's distribution. Terms, as in vLLM's `vllm/v1/sample/rejection_sampler.py`:

- accepted tokens: the draft tokens x_0 .. x_{n-1} that passed the accept test, in order. Draft token x_i
  passes if `u_i < min(1, p_i(x_i) / q_i(x_i))`, where p_i is the target's and q_i the draft's distribution at
  its position and u_i is the ACCEPT uniform of that position.
- recovered token: after the first rejection (at i = n < k), the token that replaces x_n, sampled from the
  residual `norm(max(0, p_n - q_n))`. Verification stops there: later draft tokens are discarded.
- bonus token: when all k draft tokens are accepted, one more token sampled from p_k, the target's
  distribution after the last draft token; the target computed it in the same forward pass for free.

Every round therefore emits `num_accepted + 1` tokens. Greedy requests skip the probabilities: a draft token
is accepted while it equals the target's argmax, and the next token is the target's argmax.

All randomness is keyed by (seed, absolute position, stream) (see `randomness`), so the result does not
depend on batching, on the number of draft tokens per round, or on which worker verifies.

Choices that make the rule exact in floating point:

- p_i(x_i) and q_i(x_i) are float32 values widened to float64. If `q_i(x_i) <= p_i(x_i)` the token is
  always accepted (every u is < 1); otherwise it is accepted iff `u < p_i(x_i) / q_i(x_i)` in float64.
- `draft_probs=None` means every draft is a point mass on its token (model-free drafters such as n-gram or
  prompt lookup): q_i = one-hot(x_i), so the token is accepted iff `u < p_i(x_i)` and the residual is p_i with
  x_i removed.
- A draft token outside the support of the q_i it was sent with (`q_i(x_i) == 0`) cannot have been sampled
  from q_i; it is treated as a point-mass proposal exactly like `draft_probs=None`, the rule under which the
  output is still distributed as p_i when the proposal was deterministic. (Taking `min(1, p / 0) = 1` instead
  would accept it whenever `p_i(x_i) > 0` and bias the output towards x_i.)
- The residual is computed in float64 and sampled unnormalized (inverse CDF against `u * total`). If it is
  all zeros, which only happens when p_i equals q_i up to round-off, the recovered token is sampled from p_i.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from specpipe.errors import InvalidArgumentError
from specpipe.sampling.processing import greedy_token_ids
from specpipe.sampling.randomness import RandomStream, keyed_uniform, sample_from_probs

__all__ = ["VerificationResult", "rejection_sample", "verify_draft", "verify_greedy"]


@dataclass(frozen=True, slots=True)
class VerificationResult:
    """Outcome of verifying one block of k draft tokens.

    `output_token_ids` is the accepted draft tokens followed by `next_token_id`, so it has
    `num_accepted + 1` entries. `recovered` is True when `next_token_id` replaced a rejected draft token and
    False when it is the bonus token after all k drafts were accepted (always False for k = 0).
    """

    num_accepted: int
    next_token_id: int
    recovered: bool
    output_token_ids: tuple[int, ...]


def verify_greedy(
    target_probs: torch.Tensor,  # [k + 1, vocab_size], probabilities or logits: only the argmax is used
    draft_token_ids: Sequence[int],  # [k]
) -> VerificationResult:
    """Accept draft tokens while they equal the target's argmax; the next token is the target's argmax."""
    draft = list(draft_token_ids)
    _check_target(target_probs, draft)
    target_argmax = greedy_token_ids(target_probs)  # [k + 1]
    for i, token_id in enumerate(draft):
        if token_id != target_argmax[i]:
            return _result(draft[:i], target_argmax[i], recovered=True)
    return _result(draft, target_argmax[len(draft)], recovered=False)


def rejection_sample(
    target_probs: torch.Tensor,  # [k + 1, vocab_size], p after sampling_probs
    draft_token_ids: Sequence[int],  # [k]
    draft_probs: torch.Tensor | None,  # [k, vocab_size], q after sampling_probs; None: point masses
    first_position: int,
    seed: int,
) -> VerificationResult:
    """Speculative sampling of one block; draft token i sits at absolute position `first_position + i`."""
    draft = list(draft_token_ids)
    k = len(draft)
    _check_target(target_probs, draft)
    vocab_size = target_probs.shape[1]
    if draft_probs is not None and tuple(draft_probs.shape) != (k, vocab_size):
        raise InvalidArgumentError(
            f"draft_probs must have shape [k, vocab_size] = {[k, vocab_size]}, got {list(draft_probs.shape)}"
        )
    if first_position < 0:
        raise InvalidArgumentError(f"first_position must be non-negative, got {first_position}")

    p_draft: list[float] = []  # [k], p_i(x_i)
    q_draft: list[float] = [0.0] * k  # [k], q_i(x_i); 0 marks a point-mass proposal
    if k > 0:
        ids = torch.tensor([[token_id] for token_id in draft], dtype=torch.long)  # [k, 1]
        p_draft = [row[0] for row in target_probs[:k].gather(1, ids).tolist()]
        if draft_probs is not None:
            q_draft = [row[0] for row in draft_probs.gather(1, ids).tolist()]
    for i, token_id in enumerate(draft):
        position = first_position + i
        p_x, q_x = p_draft[i], q_draft[i]
        u = keyed_uniform(seed, position, RandomStream.ACCEPT)
        point_mass = q_x == 0.0  # draft_probs is None, or x_i outside the support of q_i
        if point_mass:
            accepted = u < p_x
        else:
            accepted = q_x <= p_x or u < p_x / q_x
        if accepted:
            continue
        p_row = target_probs[i].to(torch.float64)  # [vocab_size]
        if point_mass or draft_probs is None:
            residual = p_row.clone()
            residual[token_id] = 0.0
        else:
            residual = (p_row - draft_probs[i].to(torch.float64)).clamp_min_(0.0)
        if not bool((residual > 0).any()):
            residual = p_row
        recovered_id = sample_from_probs(residual, keyed_uniform(seed, position, RandomStream.TARGET_SAMPLE))
        return _result(draft[:i], recovered_id, recovered=True)

    bonus_u = keyed_uniform(seed, first_position + k, RandomStream.TARGET_SAMPLE)
    return _result(draft, sample_from_probs(target_probs[k], bonus_u), recovered=False)


def verify_draft(
    target_probs: torch.Tensor,  # [k + 1, vocab_size]
    draft_token_ids: Sequence[int],  # [k]
    draft_probs: torch.Tensor | None,  # [k, vocab_size] or None; ignored when greedy
    first_position: int,
    seed: int,
    is_greedy: bool,
) -> VerificationResult:
    """`verify_greedy` for greedy requests, else `rejection_sample`."""
    if is_greedy:
        return verify_greedy(target_probs, draft_token_ids)
    return rejection_sample(target_probs, draft_token_ids, draft_probs, first_position, seed)


def _check_target(
    target_probs: torch.Tensor,  # [k + 1, vocab_size]
    draft: list[int],  # [k]
) -> None:
    if target_probs.dim() != 2 or target_probs.shape[0] != len(draft) + 1:
        raise InvalidArgumentError(
            f"target_probs must have shape [k + 1, vocab_size] with k={len(draft)} draft tokens, "
            f"got {tuple(target_probs.shape)}"
        )
    vocab_size = target_probs.shape[1]
    for token_id in draft:
        if not 0 <= token_id < vocab_size:
            raise InvalidArgumentError(
                f"draft token id {token_id} is out of range for vocab_size={vocab_size}"
            )


def _result(accepted: list[int], next_token_id: int, recovered: bool) -> VerificationResult:
    return VerificationResult(
        num_accepted=len(accepted),
        next_token_id=next_token_id,
        recovered=recovered,
        output_token_ids=(*accepted, next_token_id),
    )
