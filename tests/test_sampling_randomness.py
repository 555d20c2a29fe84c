"""Keyed uniforms, inverse-CDF sampling and the draft token sampler."""

from __future__ import annotations

import hashlib
import math
from collections import Counter

import pytest
import torch

from specpipe.errors import InvalidArgumentError
from specpipe.sampling.draft_sampling import sample_draft_token
from specpipe.sampling.randomness import RandomStream, keyed_uniform, sample_from_probs

pytestmark = pytest.mark.usefixtures("single_torch_thread")


# ---------------------------------------------------------------------------------------- keyed_uniform


def test_stream_values_are_part_of_the_contract() -> None:
    assert [int(s) for s in RandomStream] == [0, 1, 2, 3]
    assert [s.name for s in RandomStream] == ["DRAFT", "ACCEPT", "TARGET_SAMPLE", "COUPLED_NOISE"]


@pytest.mark.parametrize(
    ("seed", "position", "stream", "expected"),
    [
        (0, 0, RandomStream.DRAFT, 0.2162761419056657),
        (0, 0, RandomStream.ACCEPT, 0.04564190673008073),
        (0, 0, RandomStream.TARGET_SAMPLE, 0.6706393719495302),
        (12345, 678, RandomStream.ACCEPT, 0.6644750834444927),
        (2**64 - 1, 2**40, RandomStream.TARGET_SAMPLE, 0.543792748156409),
    ],
)
def test_keyed_uniform_golden_values(seed: int, position: int, stream: RandomStream, expected: float) -> None:
    """Pinned: a change here changes every sampled token of every seeded request."""
    assert keyed_uniform(seed, position, stream) == expected


def test_keyed_uniform_follows_documented_key_layout() -> None:
    seed, position, stream = 987654321, 4242, RandomStream.DRAFT
    key = seed.to_bytes(8, "little") + position.to_bytes(8, "little") + (0).to_bytes(4, "little")
    digest = hashlib.blake2b(key, digest_size=8, person=b"specpipe.u.v1").digest()
    x = int.from_bytes(digest, "little") >> 12
    assert keyed_uniform(seed, position, stream) == (2 * x + 1) / 2**53


def test_keyed_uniform_is_pure_and_in_open_interval() -> None:
    values = [
        keyed_uniform(seed, pos, stream) for seed in range(20) for pos in range(50) for stream in RandomStream
    ]
    again = [
        keyed_uniform(seed, pos, stream) for seed in range(20) for pos in range(50) for stream in RandomStream
    ]
    assert values == again
    assert all(0.0 < v < 1.0 for v in values)
    assert len(set(values)) == len(values)  # seeds, positions and streams all change the draw
    assert keyed_uniform(1, 2, RandomStream.ACCEPT) == keyed_uniform(1, 2, 1)  # type: ignore[arg-type]


def test_keyed_uniform_is_uniform() -> None:
    n, buckets = 20_000, 20
    counts = Counter(int(keyed_uniform(7, pos, RandomStream.ACCEPT) * buckets) for pos in range(n))
    expected = n / buckets
    chi2 = sum((counts[b] - expected) ** 2 / expected for b in range(buckets))
    assert chi2 < 50.0  # df = 19: p-value far below 1e-4 beyond this
    mean = sum(keyed_uniform(8, pos, RandomStream.DRAFT) for pos in range(n)) / n
    assert abs(mean - 0.5) < 4 * math.sqrt(1 / 12 / n)


@pytest.mark.parametrize(
    ("seed", "position", "stream"),
    [(-1, 0, RandomStream.DRAFT), (2**64, 0, RandomStream.DRAFT), (0, -1, RandomStream.DRAFT), (0, 0, 4)],
)
def test_keyed_uniform_rejects_bad_keys(seed: int, position: int, stream: int) -> None:
    with pytest.raises(InvalidArgumentError):
        keyed_uniform(seed, position, stream)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ sample_from_probs


def test_sample_from_probs_inverse_cdf_by_hand() -> None:
    probs = torch.tensor([0.0, 0.2, 0.0, 0.3, 0.5, 0.0])
    # CDF: 0, .2, .2, .5, 1, 1 -> first index with cdf > u.
    assert sample_from_probs(probs, 0.1) == 1
    assert sample_from_probs(probs, 0.25) == 3
    assert sample_from_probs(probs, 0.6) == 4
    assert sample_from_probs(probs, 1e-300) == 1
    assert sample_from_probs(probs, 1.0 - 2**-53) == 4


def test_sample_from_probs_unnormalized_and_boundaries() -> None:
    weights = torch.tensor([2.0, 0.0, 6.0])  # total 8: cdf 2, 2, 8
    assert sample_from_probs(weights, 0.2499) == 0
    assert sample_from_probs(weights, 0.25) == 2  # cdf must strictly exceed u * total
    assert sample_from_probs(weights, 0.9999) == 2


def test_sample_from_probs_never_picks_zero_mass_despite_round_off() -> None:
    # A total that is not exactly representable, trailing zeros: u close to 1 must still land on a token > 0.
    probs = torch.tensor([0.1, 0.2, 0.3, 0.0, 0.0], dtype=torch.float32)
    for u in (1.0 - 2**-53, 1.0 - 2**-52, 0.999999999):
        assert sample_from_probs(probs, u) == 2
    tiny = torch.tensor([0.0, 1e-45, 0.0])  # the smallest float32 subnormal
    assert sample_from_probs(tiny, 0.5) == 1


def test_sample_from_probs_empirical_distribution() -> None:
    probs = torch.tensor([0.1, 0.0, 0.4, 0.2, 0.3])
    n = 10_000
    counts = Counter(
        sample_from_probs(probs, keyed_uniform(3, pos, RandomStream.TARGET_SAMPLE)) for pos in range(n)
    )
    assert counts[1] == 0
    for token, p in enumerate(probs.tolist()):
        assert abs(counts[token] / n - p) < 0.02  # > 4 standard deviations


@pytest.mark.parametrize(
    ("probs", "u"),
    [
        (torch.tensor([0.5, -0.1, 0.6]), 0.5),
        (torch.zeros(3), 0.5),
        (torch.tensor([0.5, float("nan")]), 0.5),
        (torch.tensor([0.5, float("inf")]), 0.5),
        (torch.ones(2, 2), 0.5),
        (torch.tensor([]), 0.5),
        (torch.tensor([1.0]), 0.0),
        (torch.tensor([1.0]), 1.0),
    ],
)
def test_sample_from_probs_rejects_bad_input(probs: torch.Tensor, u: float) -> None:
    with pytest.raises(InvalidArgumentError):
        sample_from_probs(probs, u)


# ----------------------------------------------------------------------------------- sample_draft_token


def test_sample_draft_token_greedy_is_argmax() -> None:
    probs = torch.tensor([0.1, 0.3, 0.3, 0.3])
    assert sample_draft_token(probs, position=5, seed=1, is_greedy=True) == 1


def test_sample_draft_token_uses_draft_stream_at_position() -> None:
    probs = torch.softmax(torch.randn(32, generator=torch.Generator().manual_seed(0)), dim=-1)
    for seed in range(5):
        for position in range(10):
            u = keyed_uniform(seed, position, RandomStream.DRAFT)
            token = sample_draft_token(probs, position, seed, is_greedy=False)
            assert token == sample_from_probs(probs, u)
            assert token == sample_draft_token(probs, position, seed, is_greedy=False)
