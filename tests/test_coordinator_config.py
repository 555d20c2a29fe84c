"""The coordinator's config refuses bad values at construction, naming the field."""

from __future__ import annotations

import pytest

from coordinator.cluster_config import ClusterConfig
from coordinator.config import ADAPTIVE_K_RULES, CoordinatorConfig


def config(**overrides: object) -> CoordinatorConfig:
    values: dict[str, object] = {
        "cluster": ClusterConfig.single("127.0.0.1:1", "127.0.0.1:2"),
        "redis_url": "redis://127.0.0.1:6379/0",
        **overrides,
    }
    return CoordinatorConfig(**values)  # type: ignore[arg-type]


def test_defaults_are_valid_and_adaptive_by_the_cost_model() -> None:
    default = config()
    assert default.adaptive_k and default.adaptive_k_rule == "cost"
    assert {rule: config(adaptive_k_rule=rule).adaptive_k_rule for rule in ADAPTIVE_K_RULES} == {
        "cost": "cost",
        "hf-heuristic": "hf-heuristic",
    }


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("adaptive_k_rule", "fastest"),
        ("num_speculative_tokens", 17),
        ("max_speculative_tokens", -1),
        ("port", 70000),
        ("worker_timeout_s", 0.0),
        ("redis_url", ""),
        ("max_concurrent_requests", 0),
    ],
)
def test_bad_values_are_refused_by_name(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        config(**{field: value})
