"""Forwards over static KV slots (specpipe/runtime/graphed_forward.py): the function a CUDA graph captures,
run eagerly on the CPU, gives the lean forward's numbers on every path a session takes; slots are shared
LRU and a session that lost its slot is rebuilt, never read; on a GPU the graphs replay those numbers."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from specpipe.client import CoordinatorClient, build_request
from specpipe.config import WorkerConfig
from specpipe.launcher import PipelineConfig, target_worker_args
from specpipe.runtime import graphed_forward
from specpipe.runtime.graphed_forward import GRAPH_MAX_TOKENS, WARMUP_RUNS, GraphedForward, SlotPool
from specpipe.runtime.lean_gpt2 import LeanGPT2
from specpipe.runtime.lean_llama import LeanLlama
from specpipe.runtime.model_runner import CausalLMRunner
from specpipe.store.redis_server import RedisServerProcess
from tests.conftest import ModelPair, start_pipeline, stop_pipeline
from tests.prompts import PROMPTS
from tests.reference import target_alone
from tests.test_lean_forward import tiny_llama
from tests.test_metrics import scrape, value

pytestmark = pytest.mark.usefixtures("single_torch_thread")

TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    return GPT2LMHeadModel(config).eval()


def lean_of(model: torch.nn.Module) -> LeanGPT2 | LeanLlama:
    return LeanGPT2(model) if isinstance(model, GPT2LMHeadModel) else LeanLlama(model)


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_static_forward_matches_the_lean_forward_across_buckets(make_model) -> None:
    """Prefill, steps, verify blocks and rollbacks, the context crossing two buckets of 8 positions."""
    lean = lean_of(make_model())
    graphed = GraphedForward(lean, slots=1, max_context=48, context_bucket=8)
    reference, static = lean.new_cache(), graphed.new_cache()
    history = [(7 * i + 3) % 96 for i in range(6)]

    def both(new_ids: list[int], rows: int) -> None:
        torch.testing.assert_close(
            graphed.forward(new_ids, static, rows), lean.forward(new_ids, reference, rows), **TOLERANCE
        )
        assert static.get_seq_length() == reference.get_seq_length()

    both(history, 2)  # a prefill: key_len 8 for 6 positions
    both([11], 1)
    both([21, 22, 23, 24], 4)  # crosses into the second bucket
    static.crop(-3)
    reference.crop(-3)
    both([30, 31, 32, 33, 34, 35, 36], 7)  # and the third
    for token in range(40, 44):
        both([token], 1)
    assert graphed.key_length(static.length) == 24 and graphed.key_length(17) == 24


class ReplayByRerun:
    """A CUDA graph's stand-in on the CPU: a replay runs the captured function again and writes its result
    into the captured output, so whatever the function reads is read again at each replay, as a graph
    rereads its static buffers' addresses."""

    def __init__(self, run, output: torch.Tensor) -> None:
        self.run, self.output, self.replays = run, output, 0

    def replay(self) -> None:
        self.output.copy_(self.run())
        self.replays += 1


def capture_on_the_cpu(run, side: object, memory_pool: object) -> tuple[ReplayByRerun, torch.Tensor]:
    for _ in range(WARMUP_RUNS):
        run()
    output = run()
    return ReplayByRerun(run, output), output


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_graph_mode_replays_what_the_eager_path_computes(make_model, monkeypatch: pytest.MonkeyPatch) -> None:
    """The graph-mode control flow on the CPU, with replays standing in for CUDA graphs: the static input
    buffer is refilled before each replay, one graph per (slot, tokens, bucket), prefills eager, slots
    shared; every call gives the eager path's logits."""
    monkeypatch.setattr(graphed_forward, "capture_graph", capture_on_the_cpu)
    lean = lean_of(make_model())
    graphed = GraphedForward(lean, slots=2, max_context=48, context_bucket=8)
    graphed.cuda_graphs = True  # the CPU: graph mode through the stand-in
    eager = GraphedForward(lean, slots=2, max_context=48, context_bucket=8)
    sessions = [(graphed.new_cache(), eager.new_cache()) for _ in range(2)]
    blocks = [list(range(3, 4 + GRAPH_MAX_TOKENS)), [8], [9, 10, 11], [12], [1, 2]]  # a prefill, then blocks
    for block in [*blocks, *blocks]:
        for g, e in sessions:
            got = graphed.forward(block, g, len(block)).clone()  # the next replay overwrites it
            torch.testing.assert_close(got, eager.forward(block, e, len(block)))
            g.crop(-1)
            e.crop(-1)
    keys = set(graphed._graphs)
    assert all(count <= GRAPH_MAX_TOKENS for _, count, _ in keys)  # the longer prefill ran eagerly
    assert {slot for slot, _, _ in keys} == {0, 1} and len(keys) == graphed.captured
    assert sum(graph.replays for graph, _ in graphed._graphs.values()) == 2 * 2 * (len(blocks) - 1)


def test_the_first_bucket_is_captured_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(graphed_forward, "capture_graph", capture_on_the_cpu)
    graphed = GraphedForward(lean_of(tiny_llama()), slots=2, max_context=48)
    assert graphed.capture_first_bucket() == 0  # the CPU: no graphs
    graphed.cuda_graphs = True
    assert graphed.capture_first_bucket() == 2 * GRAPH_MAX_TOKENS == graphed.captured
    assert graphed.pool.owner(0) is None and graphed.pool.owner(1) is None and graphed.pool.takeovers == 0
    cache = graphed.new_cache()
    graphed.forward([1, 2, 3], cache, 3)
    assert graphed.captured == 2 * GRAPH_MAX_TOKENS  # replayed, not captured again


def test_a_forward_past_the_slots_context_is_refused() -> None:
    lean = lean_of(tiny_llama())
    graphed = GraphedForward(lean, slots=1, max_context=16)
    cache = graphed.new_cache()
    graphed.forward(list(range(14)), cache, 1)
    with pytest.raises(ValueError, match="exceed the static KV slots' context of 16"):
        graphed.forward([1, 2, 3], cache, 1)
    assert cache.length == 14  # nothing written


def test_slots_go_to_the_least_recently_used_session() -> None:
    pool = SlotPool(2, (1, 1, 4), capacity=8, like=torch.zeros(1))
    a, b = pool.acquire(), pool.acquire()
    assert {a.slot, b.slot} == {0, 1} and pool.takeovers == 0
    a.length, b.length = 5, 3
    pool.touch(a.slot)  # a used last: b's slot goes next
    c = pool.acquire()
    assert c.slot == b.slot and pool.takeovers == 1
    assert b.get_seq_length() == 0 and not b.owned  # b reads as empty from now on
    assert a.get_seq_length() == 5 and c.get_seq_length() == 0
    a.crop(-2)
    assert a.length == 3
    pool.free_all()
    assert pool.owner(a.slot) is None and a.get_seq_length() == 0
    with pytest.raises(ValueError, match="slots must be >= 1"):
        SlotPool(0, (1, 1, 4), capacity=8, like=torch.zeros(1))


def test_a_released_or_evicted_session_frees_its_slot_and_a_new_history_keeps_it() -> None:
    """Slots follow the runner's cache store: a session released (or evicted over max_cached_sessions) frees
    its slot, which the next session takes before any other (no takeover); a session whose history starts
    over keeps its slot."""
    runner = CausalLMRunner(tiny_llama(), tokenizer=None, model_name="tiny", max_context=64,  # type: ignore[arg-type]
                            max_cached_sessions=2, static_kv_slots=2)  # fmt: skip
    assert isinstance(runner.lean, GraphedForward)
    pool = runner.lean.pool
    runner.forward("a", [1, 2, 3], 1)
    runner.forward("b", [4, 5, 6], 1)
    slot_of = {s: runner.caches._sessions[s].past.slot for s in ("a", "b")}
    runner.caches.release("a")
    assert pool.owner(slot_of["a"]) is None
    runner.forward("c", [7, 8], 1)  # takes a's free slot, not b's least recently used one
    assert runner.caches._sessions["c"].past.slot == slot_of["a"] and pool.takeovers == 0
    runner.forward("d", [9], 1)  # evicts b (max_cached_sessions 2), which frees its slot for d
    assert "b" not in runner.caches and runner.caches._sessions["d"].past.slot == slot_of["b"]
    assert pool.takeovers == 0
    again = runner.forward("d", [5, 5, 5], 1)  # a new history: recomputed in the same slot
    assert again.cached_tokens == 0 and runner.caches._sessions["d"].past.slot == slot_of["b"]
    assert pool.takeovers == 0


def test_runner_over_slots_equals_transformers_and_rebuilds_a_session_that_lost_its_slot() -> None:
    """Three sessions on two slots: every call's logits equal transformers' forward of the same history; the
    session whose slot was taken is recomputed from its history (cached_tokens 0), never read stale."""
    model = tiny_llama()
    slots = CausalLMRunner(model, tokenizer=None, model_name="tiny", max_context=64,  # type: ignore[arg-type]
                           max_cached_sessions=8, static_kv_slots=2)  # fmt: skip
    plain = CausalLMRunner(model, tokenizer=None, model_name="tiny", max_context=64,  # type: ignore[arg-type]
                           max_cached_sessions=8)  # fmt: skip
    assert isinstance(slots.lean, GraphedForward) and not slots.packs_sessions
    assert slots.capture_graphs() == 0  # the CPU: no graphs, the static forward runs eagerly
    histories = {"a": [1, 2, 3, 4, 5], "b": [9, 8, 7], "c": [4, 4, 4, 4]}
    for session, ids in histories.items():  # c takes a's slot
        torch.testing.assert_close(
            slots.forward(session, ids, 2).logits, plain.forward(session, ids, 2).logits, **TOLERANCE
        )
    assert slots.lean.pool.takeovers == 1
    b_step = slots.forward("b", [*histories["b"], 6], 1)
    assert b_step.cached_tokens == 3  # b kept its slot
    a_step = slots.forward("a", [*histories["a"], 6, 7], 3)  # a lost its slot to c: rebuilt in full
    assert a_step.cached_tokens == 0
    a_plain = plain.forward("a", [*histories["a"], 6, 7], 3)
    torch.testing.assert_close(a_step.logits, a_plain.logits, **TOLERANCE)
    c_step = slots.forward("c", [*histories["c"], 1], 1)  # and a took c's (least recently used) back
    assert c_step.cached_tokens == 0
    torch.testing.assert_close(c_step.logits, plain.forward("c", [*histories["c"], 1], 1).logits, **TOLERANCE)


def test_greedy_decoding_over_slots_equals_decoding_without_them() -> None:
    """Token by token and in verify-shaped blocks with rollback: the same argmax as transformers' forward."""
    model = tiny_gpt2()
    runners = [
        CausalLMRunner(
            model,
            tokenizer=None,
            model_name="tiny",
            max_context=64,  # type: ignore[arg-type]
            max_cached_sessions=4,
            static_kv_slots=slots,
        )  # fmt: skip
        for slots in (0, 1)
    ]
    outputs = []
    for runner in runners:
        ids = [5, 17, 33]
        while len(ids) < 40:
            block = [*ids, (ids[-1] * 7) % 96, (ids[-1] * 11) % 96]  # a guessed block of two
            verdict = runner.forward("s", block, 3).logits.argmax(-1).tolist()
            ids.append(verdict[0])  # accept only the first row's token: the guesses are rolled back
        outputs.append(ids)
    assert outputs[0] == outputs[1]


def test_static_slots_need_a_lean_forward_and_refuse_batching() -> None:
    with pytest.raises(ValueError, match="need a lean forward"):
        CausalLMRunner(tiny_llama(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
                       tokenizer=None, model_name="x", max_context=64, max_cached_sessions=1,  # type: ignore[arg-type]
                       static_kv_slots=1)  # fmt: skip
    with pytest.raises(ValueError, match="do not batch sessions"):
        WorkerConfig(role="target", model_path="m", static_kv_slots=2, max_batch_sessions=4)
    with pytest.raises(ValueError, match="no KV cache to keep in slots"):
        WorkerConfig(role="draft", model_path="m", static_kv_slots=2, drafter="prompt-lookup")
    with pytest.raises(ValueError, match="static_kv_slots must be >= 0"):
        WorkerConfig(role="target", model_path="m", static_kv_slots=-1)
    with pytest.raises(ValueError, match="do not batch sessions"):
        PipelineConfig(target_model="t", draft_model="d", static_kv_slots=2, max_batch_sessions=2)
    args = target_worker_args(PipelineConfig("t", "d", static_kv_slots=3, cuda_graphs=False), 1234)
    assert args[args.index("--static-kv-slots") + 1] == "3" and "--no-cuda-graphs" in args


def test_concurrent_greedy_requests_through_workers_on_two_slots_equal_the_target_alone(
    model_pair: ModelPair, redis_server: RedisServerProcess, tmp_path: Path
) -> None:
    """Both workers keep two sessions' caches in slots while three requests run: sessions take each other's
    slots and are rebuilt from their histories, and every output is still the target's own."""
    slots = ["--static-kv-slots", "2"]
    pipeline = start_pipeline(model_pair, redis_server, tmp_path, draft_extra=slots, target_extra=slots)
    try:
        prompts = PROMPTS[:3]
        expected = target_alone(model_pair.target_dir, prompts, 20)

        def generate(prompt: str) -> list[int]:
            with CoordinatorClient(pipeline.coordinator_addr) as client:
                return client.generate(build_request(prompt, 20), timeout_s=120).token_ids

        with ThreadPoolExecutor(len(prompts)) as clients:
            assert dict(zip(prompts, clients.map(generate, prompts), strict=True)) == expected
        for role in ("draft", "target"):
            scraped = scrape(pipeline, role)
            assert value(scraped, "specpipe_worker_kv_slot_takeovers_total", role=role) > 0, role
            assert value(scraped, "specpipe_worker_cuda_graphs", role=role) == 0  # the CPU: none
    finally:
        stop_pipeline(pipeline)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_cuda_graph_replays_equal_the_eager_static_forward(make_model) -> None:
    """Captured per (slot, tokens, bucket) on first use and replayed after: the eager forward's numbers."""
    lean = lean_of(make_model().cuda())
    graphed = GraphedForward(lean, slots=2, max_context=48, context_bucket=8)
    eager = GraphedForward(lean, slots=2, max_context=48, context_bucket=8, cuda_graphs=False)
    assert graphed.cuda_graphs and not eager.cuda_graphs
    for _ in range(2):  # one session per slot
        g, e = graphed.new_cache(), eager.new_cache()
        blocks = [[3, 4, 5, 6, 7], [8], [9, 10, 11], [12], [13, 14, 15, 16]]
        for block in [*blocks, *blocks]:
            # cuBLAS may pick another algorithm under capture: rounding, not the stale inputs this looks for.
            torch.testing.assert_close(
                graphed.forward(block, g, len(block)).cpu(),
                eager.forward(block, e, len(block)).cpu(),
                **TOLERANCE,
            )
            g.crop(-1)
            e.crop(-1)
    assert 0 < graphed.captured <= 2 * GRAPH_MAX_TOKENS * 6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_first_bucket_is_captured_before_serving_and_the_slots_left_free() -> None:
    graphed = GraphedForward(lean_of(tiny_llama().cuda()), slots=2, max_context=48)
    assert graphed.capture_first_bucket() == 2 * GRAPH_MAX_TOKENS == graphed.captured
    assert graphed.pool.owner(0) is None and graphed.pool.owner(1) is None and graphed.pool.takeovers == 0
    cache = graphed.new_cache()
    graphed.forward([1, 2, 3], cache, 3)
    assert graphed.captured == 2 * GRAPH_MAX_TOKENS  # replayed, not captured again


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphs_captured_on_one_thread_replay_on_others() -> None:
    """The target captures its first buckets on the model thread at start-up and replays them (and captures
    new ones) on each direct stream's own thread, one at a time under the model lock."""
    lean = lean_of(tiny_llama().cuda())
    graphed = GraphedForward(lean, slots=2, max_context=48, context_bucket=8)
    eager = GraphedForward(lean, slots=2, max_context=48, context_bucket=8, cuda_graphs=False)
    with ThreadPoolExecutor(max_workers=1) as start_up:
        start_up.submit(graphed.capture_first_bucket).result()
    blocks = [[3, 4, 5], [6], [7, 8, 9, 10], [11], [12, 13]]

    def run_session() -> None:
        g, e = graphed.new_cache(), eager.new_cache()
        for block in blocks:
            replayed = graphed.forward(block, g, len(block)).cpu()
            torch.testing.assert_close(replayed, eager.forward(block, e, len(block)).cpu(), **TOLERANCE)

    for _ in range(2):  # each time on a new thread, as each stream has its own
        with ThreadPoolExecutor(max_workers=1) as stream_thread:
            stream_thread.submit(run_session).result()
    assert graphed.captured > 2 * GRAPH_MAX_TOKENS  # the second bucket: captured off the start-up thread
