"""In-process baselines (plain KV-cache decoding, Hugging Face generate) and forward-cost measurement.

Every model call is counted and timed by forward hooks (`ForwardMeter`), so the in-process variants report
target passes, draft forwards and the time spent outside the models just like specpipe's Usage does.

On a GPU (`specpipe bench latency --device cuda`) the models run there and every timed forward is bracketed
by a device synchronisation, so its time is the kernels' and not only their launch, as the workers' runner
measures it (its logits' copy to the host waits for them).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedTokenizerBase

from benchmarks import cpu
from benchmarks.prompts import Prompt
from benchmarks.results import Mode, VariantRun
from specpipe.runtime import lean_gpt2, lean_llama
from specpipe.runtime.model_runner import DTYPES, CausalLMRunner, cache_argument, lean_forward_for
from specpipe.sampling.params import SamplingParams
from specpipe.sampling.processing import greedy_token_ids, sampling_probs
from specpipe.sampling.randomness import RandomStream, keyed_uniform, sample_from_probs

WARMUP_TOKENS = 8
LeanForward = lean_gpt2.LeanGPT2 | lean_llama.LeanLlama
PROMPT_LOOKUP_TOKENS = 10


@dataclass(frozen=True, slots=True)
class ModelPair:
    target: torch.nn.Module
    draft: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    eos_ids: frozenset[int]
    device: torch.device = torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued kernels (a no-op on the CPU, whose forwards return when done)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_pair(target_dir: Path, draft_dir: Path, device: str = "cpu", dtype: str = "float32") -> ModelPair:
    """Both models on `device` in `dtype` (as the workers are started) and the target's tokenizer."""
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=DTYPES[dtype]).to(device).eval()
    draft = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=DTYPES[dtype]).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    eos = target.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = frozenset() if eos is None else frozenset(eos if isinstance(eos, list | tuple) else [eos])
    return ModelPair(target, draft, tokenizer, frozenset(int(e) for e in eos_ids), torch.device(device))


class ForwardMeter:
    """Counts and times a model's top-level forward calls through hooks."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.device = next(model.parameters()).device
        self.calls = 0
        self.seconds = 0.0
        self._started = 0.0
        self._handles = [
            model.register_forward_pre_hook(self._before),
            model.register_forward_hook(self._after),
        ]

    def _before(self, module: torch.nn.Module, args: object) -> None:
        synchronize(self.device)
        self._started = time.perf_counter()

    def _after(self, module: torch.nn.Module, args: object, output: object) -> None:
        synchronize(self.device)
        self.seconds += time.perf_counter() - self._started
        self.calls += 1

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


@contextmanager
def metered(*models: torch.nn.Module) -> Iterator[list[ForwardMeter]]:
    meters = [ForwardMeter(m) for m in models]
    try:
        yield meters
    finally:
        for meter in meters:
            meter.close()


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def sampling_params(mode: Mode, prompt_index: int) -> SamplingParams:
    return SamplingParams(temperature=mode.temperature, top_p=mode.top_p, seed=mode.seed(prompt_index))


def plain_token(logits: torch.Tensor, params: SamplingParams, position: int) -> int:  # logits [1, vocab_size]
    """The token plain decoding takes at `position`, as specpipe's k = 0 does: the argmax (greedy), else
    `sampling_probs` and an inverse-CDF draw with the keyed uniform (seed, position, TARGET_SAMPLE)."""
    if params.is_greedy:
        return greedy_token_ids(logits)[0]  # as specpipe's workers take it
    u = keyed_uniform(params.seed, position, RandomStream.TARGET_SAMPLE)
    return sample_from_probs(sampling_probs(logits, params)[0], u)


@torch.inference_mode()
def plain_decode(
    model: torch.nn.Module, prompt: Sequence[int], max_new: int, params: SamplingParams, eos: frozenset[int]
) -> list[int]:
    """One target forward per token on a DynamicCache, each token chosen by `plain_token`."""
    cache = DynamicCache(config=model.config)
    with_cache = {cache_argument(model): cache}  # looked up once: not inside the timed loop
    device = model.device
    feed = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    out: list[int] = []
    for _ in range(max_new):
        logits = model(input_ids=feed, use_cache=True, logits_to_keep=1, **with_cache).logits[0, -1:]
        logits = logits.float().cpu()  # as the workers decide: float32 on the host (no-ops on a float32 CPU)
        token = plain_token(logits, params, len(prompt) + len(out))
        out.append(token)
        if token in eos:
            break
        feed = torch.tensor([[token]], dtype=torch.long, device=device)
    return out


def static_runner(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, slots: int = 1
) -> CausalLMRunner:
    """`model` over `slots` static KV slots, as a worker started with `--static-kv-slots` runs it (the lean
    forward; CUDA graphs on a GPU, captured here before any timing; eagerly on the CPU)."""
    context = int(getattr(model.config, "n_positions", 0) or model.config.max_position_embeddings)
    runner = CausalLMRunner(
        model, tokenizer, "static", context, max_cached_sessions=slots, static_kv_slots=slots
    )
    runner.capture_graphs()
    return runner


@dataclass(slots=True)
class RunnerDecode:
    """What a decode through a runner did: its tokens, and its forwards' count and time (the runner's own
    timing, as the workers report it: no hooks fire inside the lean forward)."""

    tokens: list[int]
    passes: int = 0
    forward_s: float = 0.0


@torch.inference_mode()
def runner_decode(
    runner: CausalLMRunner,
    session_id: str,
    prompt: Sequence[int],
    max_new: int,
    params: SamplingParams,
    eos: frozenset[int],
) -> RunnerDecode:
    """`plain_decode` through a worker's runner: one forward per token on the session's slot, the same
    choice of each token. The session is released at the end (its slot is free for the next prompt)."""
    history = list(prompt)
    done = RunnerDecode([])
    try:
        for _ in range(max_new):
            result = runner.forward(session_id, history, 1)
            done.passes += 1
            done.forward_s += result.forward_ns / 1e9
            token = plain_token(result.logits, params, len(history))
            done.tokens.append(token)
            history.append(token)
            if token in eos:
                break
    finally:
        runner.caches.release(session_id)
    return done


def hf_kwargs(kind: str, pair: ModelPair, mode: Mode) -> dict[str, object]:
    """generate() arguments: plain, with the draft as assistant (HF's default schedule), or prompt lookup."""
    kwargs: dict[str, object] = {"do_sample": not mode.greedy}
    if not mode.greedy:
        kwargs.update(temperature=mode.temperature, top_k=0, top_p=mode.top_p)
    if kind == "assisted":
        kwargs["assistant_model"] = pair.draft
    elif kind == "lookup":
        kwargs["prompt_lookup_num_tokens"] = PROMPT_LOOKUP_TOKENS
    return kwargs


@torch.inference_mode()
def hf_decode(
    pair: ModelPair, prompt: Sequence[int], max_new: int, kind: str, mode: Mode, seed: int
) -> list[int]:
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=pair.device)
    if not mode.greedy:
        torch.manual_seed(seed)
    out = pair.target.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new,
        pad_token_id=pair.target.generation_config.pad_token_id,
        **hf_kwargs(kind, pair, mode),
    )
    return out[0, ids.shape[1] :].tolist()


VARIANT_KINDS = {
    "hf-generate": ("generate", "HF model.generate(), plain"),
    "hf-assisted": ("assisted", "HF model.generate(assistant_model=draft), HF's default schedule"),
    "hf-prompt-lookup": ("lookup", f"HF model.generate(prompt_lookup_num_tokens={PROMPT_LOOKUP_TOKENS})"),
}


class InProcessVariant:
    """One in-process variant, run prompt by prompt; forwards are counted and timed by hooks per call (by the
    runner for `plain-static`)."""

    def __init__(
        self, variant: str, pair: ModelPair, prompts: Sequence[Prompt], max_new: int, static_kv_slots: int = 0
    ) -> None:
        self.variant = variant
        self.pair = pair
        self.prompts = prompts
        self.max_new = max_new
        self.threads = 2 if variant == "plain-2t" else 1
        self.runner: CausalLMRunner | None = None
        if variant == "plain-static":
            if static_kv_slots < 1:
                raise ValueError(
                    "plain-static runs the workers' static-KV-slot forward: give --static-kv-slots"
                )
            self.family, self.kind = "plain", ""
            self.runner = static_runner(pair.target, pair.tokenizer)  # one session at a time: one slot
            graphs = "CUDA graphs" if pair.device.type == "cuda" else "eager"
            self.description = (
                f"target alone through the workers' static-KV-slot forward ({graphs}), 1 thread"
            )
        elif variant.startswith("plain"):
            self.family, self.kind = "plain", ""
            self.description = f"target alone, KV cache, {self.threads} thread(s)"
        else:
            self.family = "hf"
            self.kind, self.description = VARIANT_KINDS[variant]

    def new_run(self, mode: Mode) -> VariantRun:
        return VariantRun(self.variant, mode.name, self.family, self.description, threads=self.threads)

    def _decode(self, i: int, n: int, mode: Mode) -> list[int]:
        prompt = self.prompts[i].token_ids
        if self.runner is not None:
            return self._decode_static(i, n, mode).tokens
        with torch_threads(self.threads):
            if not self.kind:
                return plain_decode(self.pair.target, prompt, n, sampling_params(mode, i), self.pair.eos_ids)
            return hf_decode(self.pair, prompt, n, self.kind, mode, mode.seed(i))

    def _decode_static(self, i: int, n: int, mode: Mode) -> RunnerDecode:
        assert self.runner is not None
        prompt, params = self.prompts[i].token_ids, sampling_params(mode, i)
        with torch_threads(self.threads):
            return runner_decode(self.runner, f"plain-{i}", prompt, n, params, self.pair.eos_ids)

    def warmup(self, mode: Mode) -> str:
        """One short request; returns the error of an unsupported combination ("" when it works)."""
        try:
            self._decode(0, WARMUP_TOKENS, mode)
        except Exception as exc:  # noqa: BLE001 - an unsupported combination is reported, not fatal
            return f"failed: {type(exc).__name__}: {exc}"
        return ""

    def run_prompt(self, i: int, mode: Mode, run: VariantRun) -> None:
        if self.runner is not None:
            done = cpu.timed(run, lambda: self._decode_static(i, self.max_new, mode))
            run.outputs.append(done.tokens)
            run.target_passes += done.passes
            run.target_forward_s += done.forward_s
            return
        with metered(self.pair.target, self.pair.draft) as (target_meter, draft_meter):
            out = cpu.timed(run, lambda: self._decode(i, self.max_new, mode))
        run.outputs.append(out)
        run.target_passes += target_meter.calls
        run.target_forward_s += target_meter.seconds
        run.draft_forward_s += draft_meter.seconds
        if self.variant == "hf-assisted":
            # The assistant generates one candidate token per forward call.
            run.drafted = (run.drafted or 0) + draft_meter.calls
            run.accepted = (run.accepted or 0) + len(out) - target_meter.calls

    def close(self) -> None:
        pass


@dataclass(frozen=True, slots=True)
class Costs:
    """Median forward times (ms) at one context length, with the KV cache holding the rest."""

    context: int
    runs: int
    target_ms: float  # one new token
    draft_ms: float  # one new token, transformers' forward (what Hugging Face assisted generation runs)
    verify_ms: list[float]  # index k: k + 1 new tokens through the target
    # One new token through the lean forward specpipe's draft workers run (None: no lean path for the draft).
    lean_draft_ms: float | None = None
    # Prefill of a prompt of `prefill_tokens` (the prompts' mean length) into an empty cache: the target, the
    # draft through transformers and through the lean forward. Every variant pays the target's once per
    # request, speculative ones the draft's too (0: not measured).
    prefill_tokens: int = 0
    target_prefill_ms: float = 0.0
    draft_prefill_ms: float = 0.0
    lean_draft_prefill_ms: float | None = None
    # With --static-kv-slots: the same figures through the workers' static-KV-slot forwards (lean, CUDA graphs
    # on a GPU), which the specpipe variants and plain-static run (`for_variant`); None otherwise.
    static: Costs | None = None

    def for_variant(self, family: str, variant: str) -> Costs:
        """The costs of the forwards a variant runs: the static ones for specpipe and plain-static."""
        if self.static is not None and (family == "specpipe" or variant == "plain-static"):
            return self.static
        return self

    @property
    def c(self) -> float:
        return self.draft_ms / self.target_ms

    def c_of(self, family: str) -> float:
        """c of a variant family: specpipe drafts with the lean forward where the draft has one."""
        if family == "specpipe" and self.lean_draft_ms is not None:
            return self.lean_draft_ms / self.target_ms
        return self.c

    def prefill_steps(self, family: str) -> tuple[float, float]:
        """(target prefill, draft prefill) in target steps (one new token's forward), the draft's through the
        forward the variant family runs (as `c_of`)."""
        draft_ms = self.draft_prefill_ms
        if family == "specpipe" and self.lean_draft_prefill_ms is not None:
            draft_ms = self.lean_draft_prefill_ms
        return self.target_prefill_ms / self.target_ms, draft_ms / self.target_ms

    def v(self, k: float) -> float:
        """Verify cost of k + 1 tokens over one token's, linearly interpolated for a fractional (mean) k."""
        k = min(max(k, 0.0), len(self.verify_ms) - 1.0)
        lo = int(k)
        hi = min(lo + 1, len(self.verify_ms) - 1)
        ms = self.verify_ms[lo] + (k - lo) * (self.verify_ms[hi] - self.verify_ms[lo])
        return ms / self.target_ms

    def to_dict(self) -> dict[str, object]:
        return {
            "context_tokens": self.context,
            "runs": self.runs,
            "target_ms": round(self.target_ms, 4),
            "draft_ms": round(self.draft_ms, 4),
            "c": round(self.c, 4),
            "lean_draft_ms": None if self.lean_draft_ms is None else round(self.lean_draft_ms, 4),
            "c_specpipe": round(self.c_of("specpipe"), 4),
            "verify_ms": [round(v, 4) for v in self.verify_ms],
            "v_k": [round(v / self.target_ms, 4) for v in self.verify_ms],
            "prefill_tokens": self.prefill_tokens,
            "target_prefill_ms": round(self.target_prefill_ms, 4),
            "draft_prefill_ms": round(self.draft_prefill_ms, 4),
            "lean_draft_prefill_ms": (
                None if self.lean_draft_prefill_ms is None else round(self.lean_draft_prefill_ms, 4)
            ),
            "static": None if self.static is None else self.static.to_dict(),
        }


def _timed_forward(model: torch.nn.Module, cache: DynamicCache, ids: torch.Tensor) -> float:
    with_cache = {cache_argument(model): cache}
    synchronize(ids.device)
    started = time.perf_counter()
    model(input_ids=ids, use_cache=True, **with_cache)
    synchronize(ids.device)
    elapsed = time.perf_counter() - started
    cache.crop(-ids.shape[1])  # negative: drop the tokens just appended
    return elapsed * 1000.0


def _timed_prefill(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """A prompt into an empty cache, logits for its last position only (as plain decoding prefills)."""
    synchronize(ids.device)
    started = time.perf_counter()
    model(input_ids=ids, use_cache=True, logits_to_keep=1)
    synchronize(ids.device)
    return (time.perf_counter() - started) * 1000.0


@torch.inference_mode()
def measure_prefills(
    pair: ModelPair, lean: LeanForward | None, prompt_ids: Sequence[int], runs: int
) -> tuple[float, float, float | None]:
    """Median ms of prefilling `prompt_ids` through the target, the draft and (where the draft has one) the
    draft's lean forward, timed in alternation like `measure_costs`."""
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=pair.device)
    target: list[float] = []
    draft: list[float] = []
    lean_draft: list[float] = []
    for run in range(runs + 1):  # the first run warms up
        t, d = _timed_prefill(pair.target, ids), _timed_prefill(pair.draft, ids)
        if lean is not None:
            cache = lean.new_cache()
            started = time.perf_counter()
            lean.forward(list(prompt_ids), cache, 1)
            synchronize(pair.device)
            lean_ms = (time.perf_counter() - started) * 1000.0
        if run:
            target.append(t)
            draft.append(d)
            if lean is not None:
                lean_draft.append(lean_ms)
    lean_median = statistics.median(lean_draft) if lean_draft else None
    return statistics.median(target), statistics.median(draft), lean_median


def _runner_ms(runner: CausalLMRunner, session_id: str, token_ids: Sequence[int], num_rows: int) -> float:
    return runner.forward(session_id, token_ids, num_rows).forward_ns / 1e6


@torch.inference_mode()
def measure_static_costs(
    pair: ModelPair, seed_ids: Sequence[int], context: int, max_k: int, runs: int, prefill_tokens: int = 0
) -> Costs:
    """`measure_costs` through the workers' static-KV-slot forwards (`--static-kv-slots`), timed by the runner
    as the workers time them: the target's verify of k + 1 tokens and a draft step after `context` cached
    tokens, and both prefills. The draft's step is both `draft_ms` and `lean_draft_ms` (no transformers'
    forward runs on this path)."""
    target, draft = static_runner(pair.target, pair.tokenizer), static_runner(pair.draft, pair.tokenizer)
    ids = (list(seed_ids) * (context // max(1, len(seed_ids)) + 2))[: context + max_k + 1]
    history, block = ids[:context], ids[context:]
    # Two blocks that differ in their first token, used in turn: each call then shares exactly `context`
    # tokens with the cache, which the runner crops back to them before the timed forward.
    blocks = (block, [(block[0] + 1) % target.vocab_size, *block[1:]])
    target.forward("cost", history, 1)
    draft.forward("cost", history, 1)
    verify: list[list[float]] = [[] for _ in range(max_k + 1)]
    steps: list[float] = []
    warmup = 3
    for run in range(runs + warmup):
        times = [
            _runner_ms(target, "cost", history + blocks[k % 2][: k + 1], k + 1) for k in range(max_k + 1)
        ]
        step = _runner_ms(draft, "cost", history + blocks[run % 2][:1], 1)
        if run >= warmup:
            for k, t in enumerate(times):
                verify[k].append(t)
            steps.append(step)
    verify_ms = [statistics.median(v) for v in verify]
    draft_ms = statistics.median(steps)
    target_prefill = draft_prefill = 0.0
    if prefill_tokens > 0:
        prompt = (list(seed_ids) * (prefill_tokens // max(1, len(seed_ids)) + 1))[:prefill_tokens]
        fills: tuple[list[float], list[float]] = ([], [])
        for run in range(max(3, runs // 3) + 1):  # the first run warms up
            for runner, times in zip((target, draft), fills, strict=True):
                ms = _runner_ms(runner, f"prefill-{run}", prompt, 1)
                runner.caches.release(f"prefill-{run}")
                if run:
                    times.append(ms)
        target_prefill, draft_prefill = statistics.median(fills[0]), statistics.median(fills[1])
    return Costs(
        context, runs, verify_ms[0], draft_ms, verify_ms, draft_ms, prefill_tokens, target_prefill,
        draft_prefill, draft_prefill,
    )  # fmt: skip


@torch.inference_mode()
def measure_costs(
    pair: ModelPair,
    seed_ids: Sequence[int],
    context: int,
    max_k: int,
    runs: int,
    prefill_tokens: int = 0,
) -> Costs:
    """Target 1-token and (k+1)-token forwards and draft 1-token forwards (transformers' and, where the draft
    has one, the lean forward specpipe's draft workers run) after `context` cached tokens, and (when
    `prefill_tokens` > 0) the prefill of a prompt that long.

    The forwards are timed in alternation (one of each per run), so load from other processes hits all of
    them alike and their ratios (c, v_k) hold up better than the absolute milliseconds.
    """
    ids = (list(seed_ids) * (context // max(1, len(seed_ids)) + 2))[: context + max_k + 1]
    history = torch.tensor([ids[:context]], dtype=torch.long, device=pair.device)
    block = torch.tensor([ids[context:]], dtype=torch.long, device=pair.device)  # [1, max_k + 1]
    caches = [m(input_ids=history, use_cache=True).past_key_values for m in (pair.target, pair.draft)]
    lean = lean_forward_for(pair.draft)  # the draft workers' forward: GPT-2's or Llama's lean path
    lean_cache = lean.new_cache() if lean is not None else None
    if lean is not None:
        lean.forward(ids[:context], lean_cache, 1)
    verify: list[list[float]] = [[] for _ in range(max_k + 1)]
    draft: list[float] = []
    lean_draft: list[float] = []
    warmup = 3
    for run in range(runs + warmup):
        times = [_timed_forward(pair.target, caches[0], block[:, : k + 1]) for k in range(max_k + 1)]
        d = _timed_forward(pair.draft, caches[1], block[:, :1])
        if lean is not None:
            started = time.perf_counter()
            lean.forward(ids[context : context + 1], lean_cache, 1)
            synchronize(pair.device)
            lean_draft.append((time.perf_counter() - started) * 1000.0)
            lean_cache.crop(-1)
        if run >= warmup:
            for k, t in enumerate(times):
                verify[k].append(t)
            draft.append(d)
    verify_ms = [statistics.median(v) for v in verify]
    lean_ms = statistics.median(lean_draft[warmup:]) if lean_draft else None
    prefills: tuple[float, float, float | None] = (0.0, 0.0, None)
    if prefill_tokens > 0:
        # A prefill costs ~8 target steps: a third of the runs pins its median down well enough.
        prompt = (list(seed_ids) * (prefill_tokens // max(1, len(seed_ids)) + 1))[:prefill_tokens]
        prefills = measure_prefills(pair, lean, prompt, max(3, runs // 3))
    return Costs(
        context, runs, verify_ms[0], statistics.median(draft), verify_ms, lean_ms, prefill_tokens, *prefills
    )
