"""The benchmark's derived metrics on hand-computed cases: alpha from the mean accepted length, the analytical
bound per token and per request (prefills included), efficiency and target-forward inflation."""

from __future__ import annotations

import dataclasses
import sys

import pytest

from benchmarks import report
from benchmarks.inprocess import Costs
from benchmarks.report import analytical_speedup, expected_tokens, metrics, request_speedup, solve_alpha
from benchmarks.results import VariantRun

# target step 10 ms; draft 1 ms (c = 0.1); verify of k + 1 tokens: 10 + 2k ms; prefills 80 / 5 / 4 ms.
COSTS = Costs(
    context=100,
    runs=3,
    target_ms=10.0,
    draft_ms=1.0,
    verify_ms=[10.0 + 2.0 * k for k in range(9)],
    lean_draft_ms=0.5,
    prefill_tokens=120,
    target_prefill_ms=80.0,
    draft_prefill_ms=5.0,
    lean_draft_prefill_ms=4.0,
)


def test_solve_alpha_inverts_expected_tokens() -> None:
    for alpha in (0.3, 0.7, 0.95):
        assert solve_alpha(expected_tokens(alpha, 4), 4) == pytest.approx(alpha, abs=1e-9)
    assert solve_alpha(1.0, 4) == 0.0 and solve_alpha(5.0, 4) == 1.0


def test_sequential_bound_is_expected_tokens_over_round_cost() -> None:
    # alpha 0.5, k 2: E = 1.75; the round costs 2 * 0.1 + 1.4 = 1.6 target steps.
    assert analytical_speedup(0.5, 2, 0.1, 1.4, pipelined=False) == pytest.approx(1.75 / 1.6)


def test_request_bound_pays_both_prefills_once() -> None:
    # 129 new tokens, steady 2.0, the first round yields 5: plain 8 + 128 = 136 steps, speculation
    # 0.5 + 8 + (129 - 5) / 2 = 70.5 steps.
    assert request_speedup(2.0, 129, 5, 8.0, 0.5) == pytest.approx(136 / 70.5)
    # Without prefills and with a one-token first round it is the steady-state speedup.
    assert request_speedup(2.0, 129, 1, 0.0, 0.0) == pytest.approx(2.0)
    # Plain decoding through the formula: exactly 1.
    assert request_speedup(1.0, 129, 1, 8.0, 0.0) == pytest.approx(1.0)


def _run(variant: str, family: str, wall_s: float, passes: int, target_s: float, **kw: object) -> VariantRun:
    run = VariantRun(variant, "greedy", family, "", wall_s=wall_s, target_passes=passes, **kw)  # type: ignore[arg-type]
    run.outputs = [[1] * 64, [1] * 64]
    run.target_forward_s = target_s
    return run


def test_metrics_use_the_request_bound_and_take_prefills_out_of_the_inflation() -> None:
    # Plain: 2 prompts x 64 tokens; 2 prefills (160 ms) + 126 steps (1260 ms) = 1.42 s of target forwards.
    plain = _run("plain-1t", "plain", 1.5, 128, 1.42)
    # specpipe, k = 4 on each of its 32 passes (2 of them prefills), 128 tokens: E = 4.
    spec = _run("specpipe-k4", "specpipe", 0.8, 32, 0.08 * 2 + 30 * 0.018 * 1.25, drafted=128, accepted=96)
    runs = [plain, spec]
    plain_row, spec_row = metrics(plain, runs, COSTS), metrics(spec, runs, COSTS)
    assert plain_row["analytical_speedup"] == pytest.approx(1.0)
    assert plain_row["target_forward_inflation"] == pytest.approx(1.0)

    alpha = solve_alpha(4.0, 4.0)
    steady = analytical_speedup(alpha, 4.0, 0.05, 1.8, pipelined=False)
    assert spec_row["steady_state_speedup"] == pytest.approx(steady)
    assert spec_row["analytical_speedup"] == pytest.approx(request_speedup(steady, 64, 4.0, 8.0, 0.4))
    assert spec_row["analytical_speedup"] < steady
    assert spec_row["efficiency"] == pytest.approx(
        spec_row["speedup_vs_plain"] / spec_row["analytical_speedup"]
    )
    # Each of the 30 verify passes took 1.25 x v(4) = 1.25 x 18 ms; the 2 prefills took their measured 80 ms.
    assert spec_row["target_forward_inflation"] == pytest.approx(1.25)


def test_prompt_lookup_runs_are_bounded_as_a_free_draft() -> None:
    plain = _run("plain-1t", "plain", 1.5, 128, 1.42)
    lookup = _run("specpipe-lookup", "specpipe", 1.0, 64, 1.0, drafted=128, accepted=64)
    lookup.drafter = "prompt-lookup"
    row = metrics(lookup, [plain, lookup], COSTS)
    alpha = solve_alpha(2.0, 2.0)
    steady = analytical_speedup(alpha, 2.0, 0.0, COSTS.v(2.0), pipelined=False)  # c = 0
    assert row["steady_state_speedup"] == pytest.approx(steady)
    # No draft model reads the prompt: only the target's prefill is paid.
    assert row["analytical_speedup"] == pytest.approx(request_speedup(steady, 64, 2.0, 8.0, 0.0))


def test_a_missing_chart_package_is_named_before_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """matplotlib is the `bench` extra: without it the benchmark warns at its start and writes no chart,
    rather than losing a whole run's results at its end."""
    assert report.chart_unavailable() is None  # the dev extra installs it
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import machinery: "not installed"
    reason = report.chart_unavailable()
    assert reason is not None and 'pip install -e ".[bench]"' in reason


def test_with_static_slots_the_static_path_is_a_baseline_and_each_bound_has_its_own_plain_path() -> None:
    """--static-kv-slots: specpipe's workers and plain-static run the static forward (here 40% cheaper), whose
    costs bound them; x plain is against the fastest plain path of all, efficiency against their own."""
    static = dataclasses.replace(
        COSTS, target_ms=6.0, verify_ms=[6.0 + 0.9 * k for k in range(9)], draft_ms=0.42, lean_draft_ms=0.42,
        target_prefill_ms=48.0, draft_prefill_ms=2.4, lean_draft_prefill_ms=2.4,
    )  # fmt: skip
    costs = dataclasses.replace(COSTS, static=static)
    assert costs.for_variant("specpipe", "specpipe-k4") is static
    assert costs.for_variant("plain", "plain-static") is static
    assert costs.for_variant("plain", "plain-1t") is costs and costs.for_variant("hf", "hf-assisted") is costs

    plain = _run("plain-1t", "plain", 1.5, 128, 1.42)
    plain_static = _run("plain-static", "plain", 0.9, 128, 0.852)
    spec = _run("specpipe-k4", "specpipe", 0.45, 32, 0.3, drafted=128, accepted=96)
    hf = _run("hf-assisted", "hf", 1.2, 64, 1.0, drafted=64, accepted=64)
    runs = [plain, plain_static, spec, hf]
    assert report.best_baseline(runs, "greedy") is plain_static  # the faster plain path
    spec_row, hf_row = metrics(spec, runs, costs), metrics(hf, runs, costs)
    assert spec_row["speedup_vs_plain"] == pytest.approx(0.9 / 0.45)
    assert spec_row["efficiency"] == pytest.approx((0.9 / 0.45) / spec_row["analytical_speedup"])
    alpha = solve_alpha(4.0, 4.0)
    steady = analytical_speedup(alpha, 4.0, 0.07, 1.6, pipelined=False)  # static c and v(4), not 0.05 and 1.8
    assert spec_row["steady_state_speedup"] == pytest.approx(steady)
    # Hugging Face runs transformers' forward: x plain against plain-static, its bound against plain-1t.
    assert hf_row["speedup_vs_plain"] == pytest.approx(0.9 / 1.2)
    assert hf_row["efficiency"] == pytest.approx((1.5 / 1.2) / hf_row["analytical_speedup"])
    assert metrics(plain_static, runs, costs)["target_forward_inflation"] == pytest.approx(
        (0.852 - 2 * 0.048) / 126 / 0.006
    )


def _row(variant: str, speedup: float, vs_assisted: float, overhead_ms: float, efficiency: float) -> dict:
    return {
        "variant": variant,
        "family": "specpipe",
        "mode": "greedy",
        "tokens_per_s": 100.0 * speedup,
        "speedup_vs_plain": speedup,
        "speedup_vs_hf_assisted": vs_assisted,
        "overhead_ms_per_round": overhead_ms,
        "efficiency": efficiency,
    }


def test_targets_judge_the_fastest_configuration_and_name_every_one_meeting_all_four() -> None:
    rows = [
        _row("specpipe-adaptive-pipe", 2.95, 2.65, 1.22, 0.91),  # fastest, overhead missed
        _row("specpipe-k6-pipe", 2.47, 2.22, 0.99, 0.98),  # every target
        _row("specpipe-k2", 1.36, 1.22, 0.90, 0.86),  # below 1.6x
        _row("specpipe-k4", 1.77, 0.95, 0.90, 0.90),  # slower than hf-assisted
    ]
    checks = report.check_targets(rows, "greedy")
    assert checks["best_variant"] == "specpipe-adaptive-pipe"
    assert checks["speedup_vs_plain_met"] and checks["efficiency_met"] and not checks["overhead_met"]
    assert checks["variants_meeting_every_target"] == ["specpipe-k6-pipe"]
    line = report.targets_line("greedy", checks)
    assert "overhead 1.22 ms per round (<= 1.0 NOT met)" in line
    assert line.endswith("every target met by: specpipe-k6-pipe")
    assert report.check_targets(rows, "sample") == {}
    without_assisted = [{**row, "speedup_vs_hf_assisted": None} for row in rows]
    checks = report.check_targets(without_assisted, "greedy")
    assert checks["variants_meeting_every_target"] == []
    assert "faster than hf-assisted n/a (no hf-assisted row)" in report.targets_line("greedy", checks)
