"""Derived metrics (speedups, acceptance, alpha, overhead, analytical speedup, efficiency), the table, the
JSON and the PNG chart. Definitions: docs/benchmarks.md."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

from benchmarks.inprocess import Costs
from benchmarks.results import VariantRun
from specpipe.speculation.adaptive_k import pipelined_model_time

BASELINE_VARIANTS = ("plain-1t", "plain-2t", "plain-static")
HF_ASSISTED = "hf-assisted"
TARGETS = {"speedup_vs_plain": 1.6, "overhead_ms": 1.0, "efficiency": 0.85}


def expected_tokens(alpha: float, k: float) -> float:
    """E(alpha, k) = (1 - alpha^(k+1)) / (1 - alpha): tokens per round with k drafted (Leviathan et al.)."""
    if alpha >= 1.0:
        return k + 1.0
    return (1.0 - alpha ** (k + 1.0)) / (1.0 - alpha)


def solve_alpha(mean_tokens: float, k: float) -> float:
    """The per-token acceptance alpha with E(alpha, k) = mean_tokens (bisection; E rises with alpha)."""
    if k <= 0 or mean_tokens <= 1.0:
        return 0.0
    if mean_tokens >= k + 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if expected_tokens(mid, k) < mean_tokens:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def analytical_speedup(alpha: float, k: float, c: float, v: float, pipelined: bool) -> float:
    """Tokens per target-forward time of ideal speculation (no overhead) over plain decoding's 1.

    Sequential: a round drafts k tokens, then verifies them: E / (k c + v). Pipelined (specpipe's scheme):
    E / the expected pipelined round time, the same model the adaptive-k policy uses
    (`specpipe.speculation.adaptive_k.pipelined_model_time`).
    """
    tokens = expected_tokens(alpha, k)
    if not pipelined:
        return tokens / (k * c + v)
    return tokens / pipelined_model_time(k, alpha, c, v)


def request_speedup(
    steady: float, new_tokens: float, first_round_tokens: float, target_prefill: float, draft_prefill: float
) -> float:
    """The analytical speedup of a whole request of `new_tokens` (`steady` is the per-token speedup of
    `analytical_speedup`), times in target steps (one new token's target forward).

    Plain decoding: the prompt's prefill, which yields the first token, then a step per token:
    target_prefill + new_tokens - 1. Ideal speculation: both prefills (the draft has to read the prompt before
    the first block; the target's prefill also verifies that block, at no extra cost here, and yields
    `first_round_tokens`), then the remaining tokens at `steady` tokens per step. Both pay the same target
    prefill, so the bound sits below `steady` by more the shorter the request.
    """
    plain = target_prefill + max(new_tokens - 1.0, 0.0)
    speculative = draft_prefill + target_prefill + max(new_tokens - first_round_tokens, 0.0) / steady
    return plain / speculative if speculative > 0 else steady


def best_baseline(
    runs: Sequence[VariantRun], mode: str, variants: Sequence[str] = BASELINE_VARIANTS
) -> VariantRun | None:
    """The fastest plain in-process run of a mode among `variants`: the honest baseline."""
    plain = [r for r in runs if r.mode == mode and r.variant in variants and not r.error and r.wall_s]
    return max(plain, key=lambda r: r.tokens / r.wall_s, default=None)


def reference(runs: Sequence[VariantRun], mode: str) -> VariantRun | None:
    """plain-1t of a mode: the outputs every other variant is compared with."""
    return next((r for r in runs if r.mode == mode and r.variant == "plain-1t" and not r.error), None)


def _rate(run: VariantRun | None) -> float | None:
    if run is None or run.error or not run.wall_s:
        return None
    return run.tokens / run.wall_s


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def metrics(run: VariantRun, runs: Sequence[VariantRun], costs: Costs) -> dict[str, object]:
    """Every reported column of one run (None where it does not apply)."""
    row: dict[str, object] = {
        "variant": run.variant,
        "mode": run.mode,
        "family": run.family,
        "description": run.description,
        "threads": run.threads,
        "prompts": len(run.outputs),
        "error": run.error or None,
    }
    rate = _rate(run)
    if rate is None:
        return row
    # With static KV slots, the costs of the forwards this variant runs, and plain decoding through them: its
    # analytical bound is relative to that plain path, so its efficiency is too (x plain stays relative to the
    # fastest plain path of all).
    own_costs = costs.for_variant(run.family, run.variant)
    same_forward = ("plain-static",) if own_costs is not costs else ("plain-1t", "plain-2t")
    own_base = best_baseline(runs, run.mode, same_forward) if costs.static is not None else None
    costs = own_costs
    base = best_baseline(runs, run.mode)
    assisted = next((r for r in runs if r.mode == run.mode and r.variant == HF_ASSISTED), None)
    passes = max(run.target_passes, 1)
    mean_tokens = run.tokens / passes
    mean_k = (run.drafted or 0) / passes
    alpha = solve_alpha(mean_tokens, mean_k) if run.drafted else None
    prompts = max(len(run.outputs), 1)
    target_prefill, draft_prefill = costs.prefill_steps(run.family)
    c = costs.c_of(run.family)
    if not run.drafted or run.drafter == "prompt-lookup":
        draft_prefill = 0.0  # no draft model read the prompt
    if run.drafter == "prompt-lookup":
        c = 0.0  # a lookup costs microseconds: the bound of a free draft
    steady = analytical = None
    if run.drafted is not None or run.family == "plain" or run.variant in ("hf-generate", "specpipe-k0"):
        steady = analytical_speedup(alpha or 0.0, mean_k, c, costs.v(mean_k), run.pipelined)
        analytical = request_speedup(steady, run.tokens / prompts, mean_tokens, target_prefill, draft_prefill)
    speedup = _ratio(rate, _rate(base))
    overhead_s = run.wall_s - run.target_forward_s - run.draft_forward_s
    # Target forward time per pass after the prompt's (one per prompt, taken out at its measured cost), over
    # what the cost measurement predicts for it: v(k̄) target steps.
    steady_passes, steady_forward_s = passes, run.target_forward_s
    if passes > prompts:
        steady_passes -= prompts
        steady_forward_s -= prompts * costs.target_prefill_ms / 1000.0
    predicted_pass_s = costs.v(mean_k) * costs.target_ms / 1000.0
    row.update(
        tokens=run.tokens,
        wall_s=run.wall_s,
        tokens_per_s=rate,
        speedup_vs_plain=speedup,
        speedup_vs_hf_assisted=_ratio(rate, _rate(assisted)),
        target_passes=run.target_passes,
        drafted=run.drafted,
        accepted=run.accepted,
        acceptance_rate=_ratio(run.accepted, run.drafted) if run.drafted else None,
        mean_accepted_length=mean_tokens,
        mean_k=mean_k,
        alpha=alpha,
        target_forward_s=run.target_forward_s,
        draft_forward_s=run.draft_forward_s,
        overhead_ms_per_round=overhead_s / passes * 1000.0,
        target_forward_inflation=steady_forward_s / steady_passes / predicted_pass_s,
        steady_state_speedup=steady,
        analytical_speedup=analytical,
        efficiency=_ratio(speedup if own_base is None else _ratio(rate, _rate(own_base)), analytical),
        background_other_cores=None if (bg := run.background_cores()) is None else bg[0],
        background_steal_cores=None if bg is None else bg[1],
    )
    ref = reference(runs, run.mode)
    if ref is not None and len(ref.outputs) == len(run.outputs):
        same = sum(a == b for a, b in zip(ref.outputs, run.outputs, strict=True))
        row["match_vs_plain"] = f"{same}/{len(run.outputs)}"
        row["identical_to_plain"] = same == len(run.outputs)
    return row


def _fmt(value: object, spec: str, suffix: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:{spec}}{suffix}"


COLUMNS = (
    ("variant", 22), ("tok/s", 8), ("x plain", 8), ("x HF-asst", 9), ("accept", 7), ("E", 5), ("mean k", 6),
    ("alpha", 5), ("ovh ms", 6), ("tfwd x", 6), ("S", 5), ("eff", 5), ("match", 7), ("bg", 4),
)  # fmt: skip


def _background(row: dict[str, object]) -> float | None:
    other, steal = row.get("background_other_cores"), row.get("background_steal_cores")
    if other is None or steal is None:
        return None
    return float(other) + float(steal)  # type: ignore[arg-type]


def table(rows: Sequence[dict[str, object]], mode: str) -> str:
    """A fixed-width table of one mode's rows."""
    lines = [
        "  ".join(f"{name:>{width}}" if i else f"{name:<{width}}" for i, (name, width) in enumerate(COLUMNS))
    ]
    for row in (r for r in rows if r["mode"] == mode):
        if row.get("error"):
            lines.append(f"{row['variant']:<22}  {row['error']}")
            continue
        cells = [
            row["variant"],
            _fmt(row["tokens_per_s"], ".1f"),
            _fmt(row["speedup_vs_plain"], ".2f", "x"),
            _fmt(row["speedup_vs_hf_assisted"], ".2f", "x"),
            _fmt(row["acceptance_rate"], ".0%"),
            _fmt(row["mean_accepted_length"], ".2f"),
            _fmt(row["mean_k"], ".1f"),
            _fmt(row["alpha"], ".2f"),
            _fmt(row["overhead_ms_per_round"], ".2f"),
            _fmt(row["target_forward_inflation"], ".2f"),
            _fmt(row["analytical_speedup"], ".2f"),
            _fmt(row["efficiency"], ".0%"),
            str(row.get("match_vs_plain", "-")),
            _fmt(_background(row), ".2f"),
        ]
        lines.append(
            "  ".join(
                f"{c:>{w}}" if i else f"{c:<{w}}"
                for i, (c, (_, w)) in enumerate(zip(cells, COLUMNS, strict=True))
            )
        )
    return "\n".join(lines)


def check_targets(rows: Sequence[dict[str, object]], mode: str) -> dict[str, object]:
    """The issue's targets for the fastest specpipe configuration of a mode, and which configurations meet
    all four at once (the fastest may trade overhead per round for longer blocks, and another meet them)."""
    spec = [r for r in rows if r["mode"] == mode and r["family"] == "specpipe" and r.get("tokens_per_s")]
    if not spec:
        return {}
    best = max(spec, key=lambda r: r["tokens_per_s"])  # type: ignore[arg-type, return-value]
    checks = {"best_variant": best["variant"], **_target_checks(best)}
    checks["variants_meeting_every_target"] = [
        r["variant"] for r in spec if _meets_every_target(_target_checks(r))
    ]
    return checks


def _target_checks(row: dict[str, object]) -> dict[str, object]:
    speedup = float(row["speedup_vs_plain"] or 0)  # type: ignore[arg-type]
    assisted = row.get("speedup_vs_hf_assisted")
    overhead = row.get("overhead_ms_per_round")
    efficiency = row.get("efficiency")
    return {
        "speedup_vs_plain": row["speedup_vs_plain"],
        "speedup_vs_plain_met": speedup >= TARGETS["speedup_vs_plain"],
        "faster_than_hf_assisted": None if assisted is None else float(assisted) > 1.0,  # type: ignore[arg-type]
        "overhead_ms_per_round": overhead,
        "overhead_met": overhead is not None and float(overhead) <= TARGETS["overhead_ms"],  # type: ignore[arg-type]
        "efficiency": efficiency,
        "efficiency_met": float(efficiency or 0) >= TARGETS["efficiency"],  # type: ignore[arg-type]
    }


def _meets_every_target(checks: dict[str, object]) -> bool:
    return all(checks[key] for key in _TARGET_KEYS)


_TARGET_KEYS = ("speedup_vs_plain_met", "faster_than_hf_assisted", "overhead_met", "efficiency_met")


def targets_line(mode: str, checks: dict[str, object]) -> str:
    """The printed form of `check_targets`' result."""
    verdict = {
        key: "n/a (no hf-assisted row)" if checks.get(key) is None else "met" if checks[key] else "NOT met"
        for key in _TARGET_KEYS
    }
    meeting = ", ".join(checks.get("variants_meeting_every_target") or []) or "none"  # type: ignore[arg-type]
    return (
        f"targets ({mode}), fastest {checks['best_variant']}: "
        f"{_fmt(checks['speedup_vs_plain'], '.2f', 'x')} plain (>= {TARGETS['speedup_vs_plain']}x "
        f"{verdict['speedup_vs_plain_met']}), faster than hf-assisted {verdict['faster_than_hf_assisted']}, "
        f"overhead {_fmt(checks['overhead_ms_per_round'], '.2f')} ms per round (<= {TARGETS['overhead_ms']} "
        f"{verdict['overhead_met']}), efficiency {_fmt(checks['efficiency'], '.0%')} "
        f"(>= {TARGETS['efficiency']:.0%} {verdict['efficiency_met']}); every target met by: {meeting}"
    )


def _round(value: object) -> object:
    if isinstance(value, float):
        return round(value, 5)
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


def write_json(path: Path, payload: dict[str, object]) -> None:
    path.write_text(json.dumps(_round(payload), indent=2) + "\n", encoding="utf-8")


def chart_unavailable() -> str | None:
    """Why no chart can be drawn (matplotlib is the `bench` extra, not a dependency), or None if it can.

    Asked before a run starts, so a missing package costs a warning, not a run's results at its end."""
    if importlib.util.find_spec("matplotlib") is None:
        return (
            'matplotlib is not installed (pip install -e ".[bench]"): no latency.png, only the JSON and text'
        )
    return None


def write_chart(path: Path, rows: Sequence[dict[str, object]], modes: Sequence[str], title: str) -> None:
    """Horizontal bars of tokens/s per variant, one panel per mode; the baseline's rate is a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"plain": "#7f7f7f", "hf": "#ff7f0e", "specpipe": "#1f77b4"}
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 0.42 * 14 + 1.8), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        done = [r for r in rows if r["mode"] == mode and r.get("tokens_per_s")]
        names = [str(r["variant"]) for r in done]
        rates = [float(r["tokens_per_s"]) for r in done]  # type: ignore[arg-type]
        bars = ax.barh(names, rates, color=[colors[str(r["family"])] for r in done])
        base = next((r for r in done if r.get("speedup_vs_plain") == 1.0 and r["family"] == "plain"), None)
        if base is not None:
            bars[done.index(base)].set_hatch("//")
            ax.axvline(
                float(base["tokens_per_s"]),
                color="black",
                linestyle="--",
                linewidth=1,  # type: ignore[arg-type]
                label=f"baseline {base['variant']}",
            )
            ax.legend(loc="lower right")
        for bar, row in zip(bars, done, strict=True):
            ax.text(
                bar.get_width(),
                bar.get_y() + bar.get_height() / 2,
                f" {bar.get_width():.0f} ({row['speedup_vs_plain']:.2f}x)",
                va="center",
                fontsize=8,
            )
        ax.invert_yaxis()
        ax.set_xlabel("tokens/s (higher is better)")
        ax.set_title(mode)
        ax.set_xlim(0, max(rates, default=1.0) * 1.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
