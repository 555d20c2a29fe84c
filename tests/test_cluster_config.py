"""The coordinator's cluster file: parsing, defaults, and errors that name the offending key."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.cluster_config import ClusterConfig, ClusterConfigError

EXAMPLE = """
pools:
  h100: {weight: 4}
  cpu: {weight: 1}
discovery:
  backend: static
  static:
    - {role: target, address: "10.0.0.5:50062", pool: h100}
    - {role: draft, address: "10.0.0.9:50061", pool: cpu}
routing: {imbalance_factor: 3}
health: {interval_s: 5, timeout_s: 2}
"""


def test_loads_the_documented_example(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(EXAMPLE)
    config = ClusterConfig.load(path)
    assert config.pool_weight("h100") == 4 and config.pool_weight("unnamed") == 1
    assert [(r.role, r.address, r.pool) for r in config.discovery.static] == [
        ("target", "10.0.0.5:50062", "h100"),
        ("draft", "10.0.0.9:50061", "cpu"),
    ]
    assert config.routing.imbalance_factor == 3 and config.health.interval_s == 5


def test_single_pair_is_a_static_cluster() -> None:
    config = ClusterConfig.single("a:1", "b:2")
    assert {(r.role, r.address, r.pool) for r in config.discovery.static} == {
        ("draft", "a:1", "default"),
        ("target", "b:2", "default"),
    }


ONE = {"static": [{"role": "draft", "address": "a:1"}]}


def test_address_flags_take_comma_separated_replicas() -> None:
    config = ClusterConfig.single("d1:1, d2:2", "t1:3,t2:4,")
    assert [(r.role, r.address) for r in config.discovery.static] == [
        ("draft", "d1:1"), ("draft", "d2:2"), ("target", "t1:3"), ("target", "t2:4"),
    ]  # fmt: skip
    with pytest.raises(ClusterConfigError, match="address must be host:port"):
        ClusterConfig.single("d1", "t1:3")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"discovery": {"backend": "consul"}}, "discovery.backend must be one of"),
        ({"discovery": {"backend": "static"}}, "discovery.static must list at least one replica"),
        ({"discovery": {"static": [{"role": "verifier", "address": "a:1"}]}}, "role must be one of"),
        ({"discovery": {"static": [{"role": "draft", "address": "nohost"}]}}, "address must be host:port"),
        ({"discovery": {"backend": "dns", "dns": [{"role": "draft", "host": "x", "port": 0}]}},
         "port must be"),
        ({"pools": {"h100": {"weight": 0}}, "discovery": ONE},
         "pools.h100.weight must be > 0"),
        ({"discovery": ONE, "routing": {"imbalance_factor": 0.5}},
         "routing.imbalance_factor must be >= 1"),
        ({"discovery": ONE, "colour": "blue"}, "unknown key"),
    ],
)  # fmt: skip
def test_errors_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(ClusterConfigError, match=message):
        ClusterConfig.from_dict(data)
