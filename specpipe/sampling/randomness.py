"""Keyed randomness: every random number is a pure function of (seed, absolute token position, stream).

A distributed speculative decoder must produce the same tokens for the same request whatever happens to it:
how the draft and target workers are batched, which replica serves a step, how many tokens were drafted per
round, or whether a session was resumed elsewhere. So no random number here comes from a generator with
hidden state. Each draw is derived by hashing the request seed, the absolute position of the token the draw
decides, and the purpose of the draw (the stream), which makes it reproducible on every machine and Python
version and independent of timing and of batch composition.

Streams (one independent uniform per stream per position):

- `DRAFT`: the draft model's own sample at a position.
- `ACCEPT`: the uniform of the accept test for the draft token at a position.
- `TARGET_SAMPLE`: a sample from a target-derived distribution at a position: the recovered token after a
  rejection, the bonus token after a fully accepted block, or a plain (non-speculative) decoding step.
- `COUPLED_NOISE`: seeds the per-token noise vector of the coupled rule (`specpipe/sampling/coupled.py`).
"""

from __future__ import annotations

import enum
import hashlib
import math

import torch

from specpipe.errors import InvalidArgumentError

__all__ = ["RandomStream", "keyed_uniform", "sample_from_probs"]

# Changing the personalization (or the layout below) changes every sampled token: bump the version if so.
_PERSON = b"specpipe.u.v1"
_UINT64_LIMIT = 2**64
_MANTISSA_BITS = 52


class RandomStream(enum.IntEnum):
    """The purpose of a draw; part of the hash key so the streams are independent."""

    DRAFT = 0
    ACCEPT = 1
    TARGET_SAMPLE = 2
    # Seeds the per-token exponential noise shared by draft and target under the coupled rule.
    COUPLED_NOISE = 3


def keyed_uniform(seed: int, position: int, stream: RandomStream) -> float:
    """A uniform in the open interval (0, 1), a pure function of its three arguments.

    Key layout: blake2b (8-byte digest, personalization `specpipe.u.v1`) over seed (uint64), position
    (uint64) and stream (uint32), each little-endian. The top 52 bits `x` of the digest give
    `(2 * x + 1) / 2**53`: the midpoints of 2**52 equal cells of [0, 1), each exactly representable as a
    float64, so the result is never 0 or 1 (an accept test `u < 1` always passes, `u < 0` never does).
    """
    if not 0 <= seed < _UINT64_LIMIT:
        raise InvalidArgumentError(f"seed must fit in uint64, got {seed}")
    if not 0 <= position < _UINT64_LIMIT:
        raise InvalidArgumentError(f"token position must be a non-negative uint64, got {position}")
    if stream not in RandomStream.__members__.values():
        raise InvalidArgumentError(f"unknown random stream {stream!r}")
    stream_id = int(stream)
    key = seed.to_bytes(8, "little") + position.to_bytes(8, "little") + stream_id.to_bytes(4, "little")
    digest = hashlib.blake2b(key, digest_size=8, person=_PERSON).digest()
    x = int.from_bytes(digest, "little") >> (64 - _MANTISSA_BITS)
    return (2 * x + 1) / 2 ** (_MANTISSA_BITS + 1)


def sample_from_probs(
    probs: torch.Tensor,  # [vocab_size], non-negative, need not be normalized
    u: float,
) -> int:
    """Inverse-CDF sampling: the first index whose float64 cumulative sum exceeds `u * total`.

    The returned index always has `probs > 0`: the cumulative sum strictly increases at the returned index,
    and if round-off leaves `u * total` at or above the total, the last index with positive mass is returned.
    """
    if probs.dim() != 1 or probs.numel() == 0:
        raise InvalidArgumentError(f"probs must be a non-empty 1-D tensor, got shape {tuple(probs.shape)}")
    if not 0.0 < u < 1.0:
        raise InvalidArgumentError(f"u must be in the open interval (0, 1), got {u}")
    weights = probs.to(torch.float64)
    cdf = weights.cumsum(dim=0)  # [vocab_size] float64
    total = cdf[-1].item()
    if not 0.0 < total < math.inf or weights.min().item() < 0.0:
        raise InvalidArgumentError("probs must be finite, non-negative and not all zero")
    index = int(torch.searchsorted(cdf, u * total, right=True))
    if index >= weights.numel():
        index = int(torch.nonzero(weights > 0)[-1, 0])
    return index
