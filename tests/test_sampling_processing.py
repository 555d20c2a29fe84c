"""Logits processing (must match Hugging Face's warpers) and the wire form of draft distributions."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from specpipe.errors import InvalidArgumentError
from specpipe.sampling.draft_sampling import (
    compact_distribution,
    compact_support,
    compact_supports,
    expand_distribution,
    expand_distributions,
)
from specpipe.sampling.params import SamplingParams
from specpipe.sampling.processing import greedy_token_ids, sampling_probs

VOCAB_SIZE = 97


def _random_logits(n: int, seed: int, vocab_size: int = VOCAB_SIZE) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, vocab_size, generator=generator) * 3.0


def _hf_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """What `transformers` generate samples from, with its default warper order."""
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    input_ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    return torch.softmax(warpers(input_ids, logits.to(torch.float32)), dim=-1)


# ---------------------------------------------------------------------------------------------- greedy


def test_greedy_is_one_hot_at_argmax() -> None:
    logits = _random_logits(5, seed=0)
    probs = sampling_probs(logits, SamplingParams(temperature=0.0, top_k=3, top_p=0.5))
    assert probs.dtype == torch.float32
    assert probs.shape == logits.shape
    expected = torch.zeros_like(probs)
    expected[torch.arange(5), logits.argmax(dim=-1)] = 1.0
    assert torch.equal(probs, expected)


def test_greedy_tie_takes_first_maximum() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0], [3.0, 3.0, 3.0, 3.0]])
    probs = sampling_probs(logits, SamplingParams())
    assert probs.argmax(dim=-1).tolist() == [1, 0]
    assert probs.sum(dim=-1).tolist() == [1.0, 1.0]


def test_greedy_accepts_half_precision_logits() -> None:
    logits = _random_logits(3, seed=1).to(torch.bfloat16)
    probs = sampling_probs(logits, SamplingParams())
    assert probs.dtype == torch.float32
    assert probs.argmax(dim=-1).tolist() == logits.argmax(dim=-1).tolist()


# ------------------------------------------------------------------------------ Hugging Face parity


@pytest.mark.parametrize("temperature", [0.3, 1.0, 1.7])
def test_temperature_matches_transformers(temperature: float) -> None:
    logits = _random_logits(8, seed=2)
    probs = sampling_probs(logits, SamplingParams(temperature=temperature))
    assert probs.dtype == torch.float32
    assert torch.equal(probs, _hf_probs(logits, temperature, 0, 1.0))


@pytest.mark.parametrize("top_k", [1, 2, 10, 96])
def test_top_k_matches_transformers(top_k: int) -> None:
    logits = _random_logits(8, seed=3)
    probs = sampling_probs(logits, SamplingParams(temperature=1.0, top_k=top_k))
    assert torch.equal(probs, _hf_probs(logits, 1.0, top_k, 1.0))
    assert ((probs > 0).sum(dim=-1) == top_k).all()


@pytest.mark.parametrize("top_p", [0.01, 0.3, 0.9, 0.999])
def test_top_p_matches_transformers(top_p: float) -> None:
    logits = _random_logits(8, seed=4)
    probs = sampling_probs(logits, SamplingParams(temperature=1.0, top_p=top_p))
    assert torch.equal(probs, _hf_probs(logits, 1.0, 0, top_p))


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(0.7, 20, 0.8), (1.3, 5, 0.5), (0.9, 50, 0.95)])
def test_combined_warpers_match_transformers(temperature: float, top_k: int, top_p: float) -> None:
    logits = _random_logits(16, seed=5)
    probs = sampling_probs(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
    assert torch.equal(probs, _hf_probs(logits, temperature, top_k, top_p))


def test_half_precision_logits_match_transformers_on_float32_cast() -> None:
    logits = _random_logits(4, seed=6).to(torch.float16)
    probs = sampling_probs(logits, SamplingParams(temperature=0.8, top_k=30, top_p=0.9))
    assert torch.equal(probs, _hf_probs(logits.float(), 0.8, 30, 0.9))


# ------------------------------------------------------------------------------------ hand-checked edges


def test_temperature_scaling_by_hand() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    probs = sampling_probs(logits, SamplingParams(temperature=0.5))
    assert torch.allclose(probs, torch.softmax(torch.tensor([[0.0, 2.0, 4.0]]), dim=-1))


def test_top_k_keeps_ties_at_kth_value() -> None:
    logits = torch.tensor([[5.0, 3.0, 3.0, 1.0, 3.0]])
    probs = sampling_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (probs > 0).tolist() == [[True, True, True, False, True]]


def test_top_k_off_or_at_least_vocab_is_plain_softmax() -> None:
    logits = _random_logits(2, seed=7)
    plain = torch.softmax(logits, dim=-1)
    for top_k in (0, VOCAB_SIZE, VOCAB_SIZE + 5):
        assert torch.equal(sampling_probs(logits, SamplingParams(temperature=1.0, top_k=top_k)), plain)


def test_top_p_keeps_smallest_nucleus_and_at_least_one() -> None:
    logits = torch.log(torch.tensor([[0.1, 0.5, 0.15, 0.25]]))
    nucleus = sampling_probs(logits, SamplingParams(temperature=1.0, top_p=0.7))
    assert (nucleus > 0).tolist() == [[False, True, False, True]]
    assert torch.allclose(nucleus, torch.tensor([[0.0, 0.5 / 0.75, 0.0, 0.25 / 0.75]]))
    tiny = sampling_probs(logits, SamplingParams(temperature=1.0, top_p=1e-9))
    assert tiny.tolist() == [[0.0, 1.0, 0.0, 0.0]]


def test_processing_is_deterministic_and_row_independent() -> None:
    logits = _random_logits(12, seed=8)
    params = SamplingParams(temperature=0.9, top_k=40, top_p=0.85)
    batch = sampling_probs(logits, params)
    assert torch.equal(batch, sampling_probs(logits.clone(), params))
    for row in range(logits.shape[0]):
        assert torch.equal(sampling_probs(logits[row : row + 1], params)[0], batch[row])


# -------------------------------------------------------------------------------- compact / expand


def test_compact_sparse_round_trip() -> None:
    logits = _random_logits(1, seed=9)
    probs = sampling_probs(logits, SamplingParams(temperature=1.0, top_k=5))[0]
    token_ids, values = compact_distribution(probs)
    assert len(token_ids) == len(values) == 5
    assert token_ids == sorted(token_ids)
    assert all(v > 0 for v in values)
    assert torch.equal(expand_distribution(token_ids, values, VOCAB_SIZE), probs)


def test_compact_dense_round_trip() -> None:
    probs = sampling_probs(_random_logits(1, seed=10), SamplingParams(temperature=1.0))[0]
    token_ids, values = compact_distribution(probs)
    assert token_ids == []
    assert len(values) == VOCAB_SIZE
    restored = expand_distribution(token_ids, values, VOCAB_SIZE)
    assert restored.dtype == torch.float32
    assert torch.equal(restored, probs)


def test_compact_threshold_is_half_the_vocabulary() -> None:
    half = torch.tensor([0.25, 0.0, 0.75, 0.0])
    assert compact_distribution(half) == ([0, 2], [0.25, 0.75])
    more = torch.tensor([0.25, 0.25, 0.5, 0.0])
    assert compact_distribution(more) == ([], [0.25, 0.25, 0.5, 0.0])
    one_hot = torch.tensor([0.0, 0.0, 1.0])
    assert compact_distribution(one_hot) == ([2], [1.0])
    zeros = torch.zeros(4)
    assert compact_distribution(zeros) == ([], [0.0, 0.0, 0.0, 0.0])
    assert torch.equal(expand_distribution(*compact_distribution(zeros), 4), zeros)


@pytest.mark.parametrize(
    ("token_ids", "probs", "vocab_size", "message"),
    [
        ([1, 2], [0.5], 8, "2 token ids but 1 probabilities"),
        ([1, 8], [0.5, 0.5], 8, "token id 8 is out of range"),
        ([-1], [1.0], 8, "token id -1 is out of range"),
        ([3, 3], [0.5, 0.5], 8, "duplicate"),
        ([], [0.5, 0.5], 8, "2 probabilities, expected vocab_size=8"),
        ([], [], 8, "0 probabilities, expected vocab_size=8"),
        ([1], [-0.1], 8, "non-negative"),
        ([1], [float("nan")], 8, "finite"),
        ([0], [1.0], 0, "vocab_size must be positive"),
    ],
)
def test_expand_rejects_bad_input(
    token_ids: list[int], probs: list[float], vocab_size: int, message: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        expand_distribution(token_ids, probs, vocab_size)


def test_expand_distributions_checks_a_dense_block_at_once_like_row_by_row() -> None:
    dense = [
        sampling_probs(_random_logits(1, seed=20 + i), SamplingParams(temperature=1.0))[0] for i in range(3)
    ]
    sparse = compact_support(
        sampling_probs(_random_logits(1, seed=30), SamplingParams(temperature=1.0, top_k=4))[0]
    )
    rows = [([], q) for q in dense]
    assert torch.equal(expand_distributions(rows, VOCAB_SIZE), torch.stack(dense))
    mixed = [*rows, sparse]  # not all dense: row by row
    expected = torch.stack([*dense, expand_distribution(*sparse, VOCAB_SIZE)])
    assert torch.equal(expand_distributions(mixed, VOCAB_SIZE), expected)
    negative = dense[1].clone()
    negative[3] = -0.5
    for bad_rows, message in (
        (
            [rows[0], ([], dense[1][:-1])],
            "dense draft distribution has 96 probabilities, expected vocab_size=97",
        ),
        ([rows[0], ([], negative)], "finite and non-negative"),
        ([rows[0], ([], torch.full((VOCAB_SIZE,), float("nan")))], "finite and non-negative"),
    ):
        with pytest.raises(InvalidArgumentError, match=message):
            expand_distributions(bad_rows, VOCAB_SIZE)
        with pytest.raises(InvalidArgumentError, match=message):
            torch.stack([expand_distribution(ids, values, VOCAB_SIZE) for ids, values in bad_rows])


def test_compact_supports_equals_row_by_row() -> None:
    logits = _random_logits(6, seed=40)
    rows = [
        sampling_probs(logits[0:1], SamplingParams(temperature=1.0, top_k=5))[0],
        sampling_probs(logits[1:2], SamplingParams(temperature=0.7, top_p=0.8))[0],
        sampling_probs(logits[2:3], SamplingParams(temperature=1.0))[0],  # dense: more than half
        torch.zeros(VOCAB_SIZE),  # all zero: dense too
        torch.nn.functional.one_hot(torch.tensor(3), VOCAB_SIZE).float(),
        sampling_probs(logits[5:6], SamplingParams(temperature=1.0, top_k=48))[0],  # exactly half
    ]
    block = compact_supports(torch.stack(rows))
    for (ids, values), q in zip(block, rows, strict=True):
        ref_ids, ref_values = compact_support(q)
        assert ids == ref_ids and torch.equal(values, ref_values)
    assert [len(ids) for ids, _ in block] == [5, len(compact_support(rows[1])[0]), 0, 0, 1, 48]


def test_expand_distributions_of_sparse_rows_equals_row_by_row() -> None:
    rows = [
        compact_support(
            sampling_probs(_random_logits(1, seed=50 + i), SamplingParams(temperature=1.0, top_k=7))[0]
        )
        for i in range(4)
    ]
    rows.append(([], sampling_probs(_random_logits(1, seed=60), SamplingParams(temperature=1.0))[0]))
    rows.append(([5, 9], (0.25, 0.75)))  # listed floats (the wire's unpacked form)
    rows.append(([9, 5], torch.tensor([0.5, 0.5])))  # ids another row also has: not duplicates
    expected = torch.stack([expand_distribution(ids, values, VOCAB_SIZE) for ids, values in rows])
    assert torch.equal(expand_distributions(rows, VOCAB_SIZE), expected)
    assert expand_distributions([], VOCAB_SIZE).shape == (0, VOCAB_SIZE)


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        (([1, 2], [0.5]), "2 token ids but 1 probabilities"),
        (([1, VOCAB_SIZE], [0.5, 0.5]), f"token id {VOCAB_SIZE} is out of range"),
        (([-1], [1.0]), "token id -1 is out of range"),
        (([3, 3], [0.5, 0.5]), "duplicate"),
        (([1], [-0.1]), "non-negative"),
        (([1], [float("inf")]), "finite"),
    ],
)
def test_expand_distributions_rejects_a_bad_sparse_row_like_row_by_row(
    bad_row: tuple[list[int], list[float]], message: str
) -> None:
    good = ([2, 4], [0.5, 0.5])
    with pytest.raises(InvalidArgumentError, match=message):
        expand_distributions([good, bad_row], VOCAB_SIZE)
    with pytest.raises(InvalidArgumentError, match=message):
        expand_distribution(*bad_row, VOCAB_SIZE)
    with pytest.raises(InvalidArgumentError, match="vocab_size must be positive"):
        expand_distributions([good], 0)


def _top_p_reference(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Hugging Face's TopPLogitsWarper as written there: a stable ascending argsort."""
    sorted_scores, sorted_indices = torch.sort(scores, dim=-1, descending=False, stable=True)
    cumulative_probs = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    sorted_to_remove = cumulative_probs <= (1.0 - top_p)
    sorted_to_remove[..., -1:] = False
    to_remove = sorted_to_remove.scatter(-1, sorted_indices, sorted_to_remove)
    return scores.masked_fill(to_remove, float("-inf"))


@pytest.mark.parametrize("vocab_size", [7, VOCAB_SIZE, 4096])
def test_top_p_without_an_index_sort_equals_the_reference_bit_for_bit(vocab_size: int) -> None:
    from specpipe.sampling.processing import _apply_top_k, _apply_top_p

    generator = torch.Generator().manual_seed(vocab_size)
    for trial in range(40):
        scores = torch.randn(5, vocab_size, generator=generator) * (0.5 + trial % 4)
        if trial % 3 == 1:
            scores = torch.round(scores * 2) / 2  # many ties, at the boundary too
        if trial % 3 == 2:
            scores = _apply_top_k(scores, max(1, vocab_size // 3))  # -inf entries, tied
        scores[trial % 5, :] = 0.0 if trial % 2 else -0.0  # a uniform row: all tied
        scores[(trial + 1) % 5, ::2] = -0.0  # signed zeros in one row
        scores[(trial + 1) % 5, 1::2] = 0.0
        for top_p in (1e-7, 0.05, 0.3, 0.5, 0.8, 0.9, 0.95, 0.999999):
            assert torch.equal(_apply_top_p(scores, top_p), _top_p_reference(scores, top_p)), (trial, top_p)


def test_top_p_at_a_cumulative_sum_exactly_equals_the_reference() -> None:
    """1 - top_p landing on a cumulative sum (compared in float32, as torch compares a float32 tensor)."""
    from specpipe.sampling.processing import _apply_top_p

    scores = torch.randn(1, 512, generator=torch.Generator().manual_seed(5)) * 2
    cumulative = torch.sort(scores, dim=-1).values.softmax(dim=-1).cumsum(dim=-1)[0]
    for j in (0, 3, 100, 400, 510):
        for nudge in (-1e-12, 0.0, 1e-12):
            top_p = 1.0 - (float(cumulative[j]) + nudge)
            assert torch.equal(_apply_top_p(scores, top_p), _top_p_reference(scores, top_p)), (j, nudge)


def test_greedy_token_ids_equal_torch_argmax_ties_and_nan_included() -> None:
    generator = torch.Generator().manual_seed(3)
    rows = [
        torch.randn(17, 4096, generator=generator),
        torch.randint(-2, 2, (9, 40), generator=generator).float(),  # many ties: the first maximum wins
        torch.tensor([[0.0, -0.0, 0.0], [-0.0, 0.0, -1.0], [1.0, float("nan"), float("nan")]]),
        torch.tensor([[float("-inf")] * 4, [float("inf"), 1.0, float("inf"), 2.0]]),
    ]
    for logits in rows:
        assert greedy_token_ids(logits) == logits.argmax(dim=-1).tolist()
        assert greedy_token_ids(logits[:1]) == [int(logits[0].argmax())]
    half = torch.randn(3, 64, generator=generator).to(torch.bfloat16)  # not numpy's: torch's argmax
    assert greedy_token_ids(half) == half.argmax(dim=-1).tolist()
