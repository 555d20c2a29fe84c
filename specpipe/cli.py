"""The `specpipe` command: serve the pipeline (or one component) and generate from the terminal."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import grpc

from coordinator.config import ADAPTIVE_K_RULES
from coordinator.openai_api.reasoning import REASONING_PARSERS
from coordinator.openai_api.tools import TOOL_CALL_PARSERS
from specpipe.rpc.event_loop import EVENT_LOOPS, run_event_loop
from specpipe.rpc.event_loop import resolve as resolve_event_loop

if TYPE_CHECKING:
    from specpipe.client import GenerationResult
    from specpipe.v1 import common_pb2

COMPONENTS = ("all", "coordinator", "draft", "target")

T = TypeVar("T")


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


class FlagError(Exception):
    """Flags a component cannot run with (a config's ValueError): one line and exit status 2, no traceback."""


def checked(build: Callable[[], T]) -> T:
    """build(), a config from the command line; its ValueError becomes a FlagError naming the problem."""
    try:
        return build()
    except ValueError as exc:
        raise FlagError(str(exc)) from exc


def add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="run the whole pipeline (default) or one component",
        description="With no component, starts the session store, a draft worker, a target worker and the "
        "coordinator on this machine. With a component, starts only that one (multi-machine setups).",
    )
    serve.add_argument(
        "component", nargs="?", choices=COMPONENTS, default="all", help="what to start (default: all)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all)")
    serve.add_argument(
        "--port", type=int, default=None, help="port (coordinator 50051, draft 50061, target 50062)"
    )
    serve.add_argument("--model", help="draft/target: local Hugging Face model directory")
    serve.add_argument("--target-model", help="all: target model directory (default: a small local pair)")
    serve.add_argument("--draft-model", help="all: draft model directory (default: a small local pair)")
    serve.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    serve.add_argument(
        "--draft-device", default="",
        help="all: the draft worker's device (default: --device), e.g. cuda:1 for a GPU of its own",
    )  # fmt: skip
    serve.add_argument(
        "--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
        help="the models' weights and compute (default: float32, where greedy outputs match exactly)",
    )  # fmt: skip
    serve.add_argument(
        "--max-cached-sessions", type=int, default=64, help="draft/target: KV caches kept (LRU)"
    )
    serve.add_argument(
        "--kv-cache-budget-mb", type=float, default=0.0,
        help="draft/target: KV cache memory kept across sessions, LRU-evicted (0 = unlimited)",
    )  # fmt: skip
    serve.add_argument("--max-context", type=int, default=0, help="draft/target: 0 = the model's context")
    serve.add_argument(
        "--threads", type=int, default=0,
        help="draft/target: torch threads per worker (0: with no component, half the machine's cores each, "
        "as the two model workers share it; for one component, torch's default, every core)",
    )  # fmt: skip
    serve.add_argument(
        "--lean-forward", action=argparse.BooleanOptionalAction, default=None,
        help="draft/target: the lean GPT-2/Llama forward instead of transformers' (default: on for a draft "
        "and for a batching target, off for a target that does not batch)",
    )  # fmt: skip
    serve.add_argument(
        "--static-kv-slots", type=int, default=0,
        help="all/draft/target: keep the KV caches of this many sessions in preallocated slots and run "
        "forwards with static shapes over them; on a GPU a forward of up to 18 new tokens replays a CUDA "
        "graph captured per slot, token count and 512-position context bucket (0 = off; GPT-2 and Llama)",
    )  # fmt: skip
    serve.add_argument(
        "--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
        help="all/draft/target with --static-kv-slots on a GPU: replay CUDA graphs (--no-cuda-graphs: run "
        "the same static forward eagerly, to compare)",
    )  # fmt: skip
    serve.add_argument(
        "--max-batch-sessions", type=int, default=1,
        help="all/draft/target: serve up to this many sessions in one forward pass (cross-session batching; "
        "1 = none). GPT-2 and Llama models pack them through the lean forward, others run them one by one",
    )  # fmt: skip
    serve.add_argument(
        "--prefix-sharing", action=argparse.BooleanOptionalAction, default=True,
        help="all/draft/target: a new history starts from the longest prefix another session's KV cache "
        "holds (a shared system prompt, n completions of one prompt) instead of computing it again",
    )  # fmt: skip
    serve.add_argument(
        "--max-batch-tokens", type=int, default=512,
        help="draft/target: the most new tokens one batched pass takes (a longer request runs alone)",
    )  # fmt: skip
    serve.add_argument(
        "--drafter", choices=("model", "prompt-lookup"), default="model",
        help="draft: propose with the --model LM, or by prompt lookup (n-gram matches in the session's own "
        "history; --model then only names the tokenizer, e.g. the target's directory)",
    )  # fmt: skip
    serve.add_argument(
        "--direct-stream-port", type=int, default=-1,
        help="target: also serve VerifyStream over plain TCP on this port (0 = a free port, -1 = not), which "
        "draft workers then use for delegated rounds: fewer thread hand-offs per message than gRPC",
    )  # fmt: skip
    serve.add_argument(
        "--direct-streams", action=argparse.BooleanOptionalAction, default=True,
        help="all: the target serves direct streams (see --direct-stream-port) to the draft worker",
    )  # fmt: skip
    serve.add_argument(
        "--controlled-acceptance", type=float, default=None, metavar="A",
        help="draft, cost profiling: greedy drafts propose the target's token (from --reference-file) with "
        "probability A per position, another token otherwise; the draft model's forwards still run",
    )  # fmt: skip
    serve.add_argument(
        "--reference-file", default="",
        help="draft, with --controlled-acceptance: JSON list of token id lists, each a prompt and the "
        "target's greedy continuation",
    )  # fmt: skip
    serve.add_argument("--max-ngram", type=int, default=3, help="draft, prompt lookup: longest n-gram")
    serve.add_argument("--min-ngram", type=int, default=1, help="draft, prompt lookup: shortest n-gram")
    serve.add_argument("--draft-addr", help="coordinator: draft worker host:port (comma-separated replicas)")
    serve.add_argument(
        "--target-addr", help="coordinator: target worker host:port (comma-separated replicas)"
    )
    serve.add_argument(
        "--cluster-config", default=os.environ.get("SPECPIPE_CLUSTER_CONFIG", ""),
        help="coordinator: YAML file of pools, discovery and routing (replaces --draft-addr/--target-addr; "
        "env SPECPIPE_CLUSTER_CONFIG; see docs/deploy.md)",
    )  # fmt: skip
    serve.add_argument(
        "--redis-url", default=os.environ.get("SPECPIPE_REDIS_URL", ""),
        help="session store URL, redis:// or rediss:// (env SPECPIPE_REDIS_URL; all: default is embedded)",
    )  # fmt: skip
    serve.add_argument(
        "--redis-username", default=os.environ.get("SPECPIPE_REDIS_USERNAME", ""),
        help="store user, for ACLs (env SPECPIPE_REDIS_USERNAME)",
    )  # fmt: skip
    serve.add_argument(
        "--redis-password-file", default="",
        help="file holding the store password (else env SPECPIPE_REDIS_PASSWORD); never logged",
    )  # fmt: skip
    serve.add_argument("--redis-ca-file", default="", help="CA bundle for a rediss:// (TLS) store")
    serve.add_argument(
        "--session-key-prefix", default="specpipe:session:", help="store keys' prefix (default: %(default)s)"
    )
    serve.add_argument(
        "--chat-template", default="",
        help="all/coordinator: a Jinja chat template for chat requests (GenerateRequest.messages, the HTTP "
        "API's /v1/chat/completions), as a file or the template itself; default: the tokenizer's own",
    )  # fmt: skip
    serve.add_argument("--num-speculative-tokens", type=int, default=4, help="k when --no-adaptive-k")
    serve.add_argument(
        "--adaptive-k", action=argparse.BooleanOptionalAction, default=True,
        help="choose k per round from acceptance and measured costs (requests may still fix k)",
    )  # fmt: skip
    serve.add_argument(
        "--adaptive-k-rule", choices=ADAPTIVE_K_RULES, default="cost",
        help="how adaptive k chooses: cost = the most expected tokens per unit time from the acceptance "
        "rate and the measured costs; hf-heuristic = Hugging Face's +2/-1 schedule (5 to start, +2 after a "
        "block accepted whole, -1 otherwise), to compare (default: %(default)s)",
    )  # fmt: skip
    serve.add_argument(
        "--pipelining", action=argparse.BooleanOptionalAction, default=True,
        help="draft the next block while the target verifies the current one",
    )  # fmt: skip
    serve.add_argument(
        "--chaining", action=argparse.BooleanOptionalAction, default=True,
        help="with pipelining: queue the next block on the target before the verdict (no round trip between "
        "verifies whose assumption held)",
    )  # fmt: skip
    serve.add_argument(
        "--delegation", action=argparse.BooleanOptionalAction, default=True,
        help="run each request's rounds on its draft worker, which sends blocks to the target directly "
        "(the coordinator commits and streams them)",
    )  # fmt: skip
    serve.add_argument("--max-speculative-tokens", type=int, default=16, help="largest k a request may ask")
    serve.add_argument(
        "--max-new-tokens-limit", type=int, default=4096, help="largest max_new_tokens a request may ask"
    )
    serve.add_argument(
        "--max-concurrent-requests", type=int, default=256,
        help="Generate calls served at once; more get RESOURCE_EXHAUSTED at once (default: %(default)s), "
        "unless --max-waiting-requests lets them wait",
    )  # fmt: skip
    serve.add_argument(
        "--max-waiting-requests", type=int, default=0,
        help="all/coordinator: requests that may wait for a slot once --max-concurrent-requests are running "
        "(by their priority, lower first, then first come first served; each until its deadline); more are "
        "refused (default: 0, refused at once)",
    )  # fmt: skip
    serve.add_argument("--worker-timeout", type=float, default=30.0, help="seconds per worker RPC")
    serve.add_argument(
        "--startup-timeout", type=float, default=300.0,
        help="coordinator: seconds to wait for a draft and a target in rotation and for the store",
    )  # fmt: skip
    serve.add_argument("--session-ttl", type=int, default=24 * 3600, help="seconds a session is kept")
    serve.add_argument(
        "--metrics-port", type=int, default=-1,
        help="serve Prometheus metrics at http://HOST:PORT/metrics (0 = a free port, -1 = not); with no "
        "component, the coordinator's on PORT, the draft's on PORT+1 and the target's on PORT+2",
    )  # fmt: skip
    serve.add_argument(
        "--http-port", type=int, default=None,
        help="all/coordinator: serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
        "/v1/models) on this port (0 = a free port, -1 = not; default: 8000 with no component, else -1)",
    )  # fmt: skip
    serve.add_argument(
        "--api-key-file", default="",
        help="all/coordinator: file holding the key the HTTP API asks for as `Authorization: Bearer <key>` "
        "(else env SPECPIPE_API_KEY; neither: none asked); never logged",
    )  # fmt: skip
    serve.add_argument(
        "--served-model-name", default="",
        help="all/coordinator: the model's name in the HTTP API (default: the target model's path)",
    )  # fmt: skip
    serve.add_argument(
        "--tool-call-parser", choices=TOOL_CALL_PARSERS, default="",
        help="all/coordinator: how the model writes tool calls, for chat requests with tool_choice \"auto\" "
        "(hermes: <tool_call>{...}</tool_call>, Qwen 2.5+ and Hermes models; llama3_json: Llama 3.1+'s JSON "
        "calls); without it \"auto\" is refused "
        "(\"required\" and a named function need none)",
    )  # fmt: skip
    serve.add_argument(
        "--reasoning-parser", choices=REASONING_PARSERS, default="",
        help="all/coordinator: return a reasoning model's <think>...</think> as the chat message's "
        "reasoning_content, apart from its content (deepseek_r1: the output starts inside the thinking; "
        "qwen3: where it starts with <think>)",
    )  # fmt: skip
    serve.add_argument(
        "--event-loop", choices=EVENT_LOOPS, default="auto",
        help="the services' event loop: uvloop (auto: where installed) or asyncio's own",
    )  # fmt: skip
    serve.add_argument("--log-dir", default="", help="all: where component logs go (default: a temp dir)")
    serve.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")


def add_info_parser(subparsers: argparse._SubParsersAction) -> None:
    info = subparsers.add_parser(
        "info", help="print what a running coordinator serves: its models, their limits, the request limits"
    )
    info.add_argument("--addr", default="127.0.0.1:50051", help="coordinator address (default: %(default)s)")
    info.add_argument("--timeout", type=float, default=10.0, help="deadline in seconds")


def server_info(args: argparse.Namespace) -> int:
    """`specpipe info`: the coordinator's GetServerInfo, as JSON."""
    import json

    from google.protobuf.json_format import MessageToDict

    from specpipe.client import CoordinatorClient

    with CoordinatorClient(args.addr) as client:
        try:
            info = client.server_info(args.timeout)
        except grpc.RpcError as exc:
            print(f"specpipe info: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(json.dumps(MessageToDict(info, always_print_fields_with_no_presence=True), indent=2))
    return 0


def add_generate_parser(subparsers: argparse._SubParsersAction) -> None:
    generate = subparsers.add_parser(
        "generate",
        help="stream a completion from a running coordinator",
        description="Prints PROMPT and streams its completion from a running coordinator to stdout, then "
        "prints the session id and what speculation did (target passes, drafted and accepted tokens) to "
        "stderr.",
    )
    generate.add_argument("prompt", help="the prompt text (empty with --session-id: continue that session)")
    generate.add_argument("--addr", default="127.0.0.1:50051", help="the coordinator (default: %(default)s)")
    generate.add_argument("--max-new-tokens", type=int, default=64, help="default: %(default)s")
    generate.add_argument(
        "--temperature", type=float, default=0.0, help="0 = greedy, the target's own argmax (default)"
    )
    generate.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (0 = all)")
    generate.add_argument(
        "--top-p", type=float, default=1.0, help="sample from the smallest set holding this much probability"
    )
    generate.add_argument(
        "--min-p", type=float, default=0.0,
        help="drop tokens less likely than this times the most likely one (0 = off, e.g. 0.05)",
    )  # fmt: skip
    generate.add_argument(
        "--seed",
        type=int,
        default=None,
        help="sampled tokens are a function of the seed (default: a random one per request)",
    )
    generate.add_argument(
        "--acceptance", choices=("leviathan", "coupled"), default="leviathan",
        help="acceptance rule for sampled tokens (coupled: the tokens of plain seeded sampling, any k)",
    )  # fmt: skip
    generate.add_argument(
        "--stop", action="append", default=[], help="end the completion at this string (repeatable)"
    )
    generate.add_argument("--session-id", default="", help="continue this session (multi-turn, or resume)")
    generate.add_argument(
        "--num-speculative-tokens", type=int, default=None,
        help="a fixed k for this request (0 = plain decoding; default: the coordinator's choice)",
    )  # fmt: skip
    generate.add_argument(
        "--repetition-penalty", type=float, default=1.0,
        help="divide (or, when negative, multiply) the logit of every token already in the sequence by this "
        "(Hugging Face's repetition_penalty; 1 = off, e.g. 1.2 against loops)",
    )  # fmt: skip
    generate.add_argument(
        "--presence-penalty", type=float, default=0.0,
        help="subtract this from the logit of every token already generated (OpenAI's; -2..2, 0 = off)",
    )  # fmt: skip
    generate.add_argument(
        "--frequency-penalty", type=float, default=0.0,
        help="subtract this times its count from the logit of every token already generated "
        "(OpenAI's; -2..2, 0 = off)",
    )  # fmt: skip
    generate.add_argument(
        "--logit-bias", action="append", default=[], metavar="ID=BIAS", type=logit_bias_entry,
        help="add BIAS (-100..100) to the logit of token ID before sampling (repeatable; -100 bans it)",
    )  # fmt: skip
    generate.add_argument(
        "--allowed-token-id", type=int, action="append", default=[], metavar="ID",
        help="choose only among these tokens (repeatable; vLLM's allowed_token_ids)",
    )  # fmt: skip
    generate.add_argument(
        "--bad-word", action="append", default=[], metavar="WORD",
        help="never generate this word, at the start of the text or after a space (repeatable)",
    )  # fmt: skip
    generate.add_argument(
        "-n", "--n", type=int, default=1,
        help="generate this many completions (1..16; completion i samples with --seed + i), each a session",
    )  # fmt: skip
    structured = generate.add_mutually_exclusive_group()
    structured.add_argument(
        "--json-schema", metavar="SCHEMA",
        help="make the output a JSON value this JSON Schema accepts (JSON text, or @FILE to read it)",
    )  # fmt: skip
    structured.add_argument(
        "--json-object", action="store_true", help="make the output a JSON object",
    )  # fmt: skip
    structured.add_argument(
        "--regex", help="make the output match this regular expression (Rust's syntax)",
    )  # fmt: skip
    structured.add_argument(
        "--choice", action="append", metavar="TEXT",
        help="make the output exactly one of these strings (repeatable)",
    )  # fmt: skip
    generate.add_argument(
        "--include-stop-str", action="store_true",
        help="end the text with the stop string that ended it rather than before it",
    )  # fmt: skip
    generate.add_argument(
        "--keep-special-tokens", action="store_true",
        help="print special tokens' text (end-of-sequence...) rather than leave it out",
    )  # fmt: skip
    generate.add_argument(
        "--stop-token-id", type=int, action="append", default=[], metavar="ID",
        help="end the completion after this token, kept, as after end-of-sequence (repeatable)",
    )  # fmt: skip
    generate.add_argument(
        "--min-tokens", type=int, default=0,
        help="never end (end-of-sequence, --stop-token-id, --stop) before this many tokens",
    )  # fmt: skip
    generate.add_argument(
        "--ignore-eos", action="store_true",
        help="generate past end-of-sequence tokens, up to --max-new-tokens (fixed output lengths)",
    )  # fmt: skip
    generate.add_argument(
        "--logprobs", type=int, default=None, metavar="N",
        help="after the text, print each token's log-probability under the target and the N most likely "
        "tokens at its position (0-20)",
    )  # fmt: skip
    generate.add_argument(
        "--prompt-logprobs", type=int, default=None, metavar="N",
        help="after the text, print each prompt token's log-probability under the target given the tokens "
        "before it, and the N most likely tokens at its position (0-20)",
    )  # fmt: skip
    generate.add_argument(
        "--timeout", type=float, default=300.0, help="deadline in seconds (default: %(default)s)"
    )


BENCHMARKS = {
    "latency": "benchmarks.latency",
    "floor": "benchmarks.forward_floor",
    "load": "benchmarks.load",
    "batching": "benchmarks.batching",
    "prefix-sharing": "benchmarks.prefix_sharing",
    "random-pair": "benchmarks.random_pair",
}


def add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser(
        "bench",
        help="run a benchmark (latency, floor, load, batching, prefix-sharing; random-pair makes a pair to "
        "profile)",
        add_help=False,
    )  # fmt: skip
    bench.add_argument("benchmark", choices=sorted(BENCHMARKS))
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="the benchmark's options (see --help)")


def bench(args: argparse.Namespace) -> int:
    import importlib

    module = BENCHMARKS[args.benchmark]
    try:
        benchmark = importlib.import_module(module)
    except ImportError:  # benchmarks/ lives next to specpipe/ in a source checkout, not in the wheel
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        benchmark = importlib.import_module(module)
    return int(benchmark.main(args.bench_args))


def embedded_worker_threads(cores: int | None = None) -> int:
    """torch threads for each model worker of `specpipe serve` with no component: half the cores, as the
    target and the draft share the machine. Every core for each (torch's default) oversubscribes it: on 2
    cores the main job served 22-25% fewer tokens/s that way (docs/benchmarks.md, run 29)."""
    cores = cores or os.cpu_count() or 2
    return max(1, cores // 2)


def api_key(args: argparse.Namespace) -> str:
    """The HTTP API's key: --api-key-file's content, else env SPECPIPE_API_KEY (never a flag's value)."""
    if args.api_key_file:
        try:
            key = Path(args.api_key_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise FlagError(f"--api-key-file: cannot read {args.api_key_file!r}: {exc.strerror}") from None
        if not key:  # a key was asked for: an empty one must not leave the APIs open
            raise FlagError(f"--api-key-file: {args.api_key_file!r} is empty")
        return key
    key = os.environ.get("SPECPIPE_API_KEY")
    if key is not None and not key.strip():
        raise FlagError("SPECPIPE_API_KEY is set but empty: unset it for no key, or give one")
    return (key or "").strip()


def redis_password(args: argparse.Namespace) -> str:
    if args.redis_password_file:
        with open(args.redis_password_file, encoding="utf-8") as handle:
            return handle.read().strip()
    return os.environ.get("SPECPIPE_REDIS_PASSWORD", "")


def default_lean_forward(args: argparse.Namespace) -> bool:
    """A draft's forward is lean; so is a batching target's, whose packed passes need it (a target alone keeps
    transformers' forward)."""
    return args.component == "draft" or (args.component == "target" and args.max_batch_sessions > 1)


def serve_component(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    if args.component in ("draft", "target"):
        from specpipe.config import WorkerConfig

        if not args.model:
            print(f"specpipe serve {args.component}: --model is required", file=sys.stderr)
            return 2
        config = checked(
            lambda: WorkerConfig(
                role=args.component,
                model_path=args.model,
                host=args.host,
                port=args.port if args.port is not None else (50061 if args.component == "draft" else 50062),
                device=args.device,
                dtype=args.dtype,
                max_cached_sessions=args.max_cached_sessions,
                max_cache_bytes=int(args.kv_cache_budget_mb * 2**20),
                max_context=args.max_context,
                # +1: a pipelined round asks for the bonus-token guess plus the next block.
                max_draft_tokens=args.max_speculative_tokens + 1,
                torch_threads=args.threads,
                lean_forward=default_lean_forward(args) if args.lean_forward is None else args.lean_forward,
                static_kv_slots=args.static_kv_slots,
                cuda_graphs=args.cuda_graphs,
                drafter=args.drafter if args.component == "draft" else "model",
                max_ngram=args.max_ngram,
                min_ngram=args.min_ngram,
                direct_stream_port=args.direct_stream_port if args.component == "target" else -1,
                metrics_port=args.metrics_port,
                max_batch_sessions=args.max_batch_sessions,
                max_batch_tokens=args.max_batch_tokens,
                prefix_sharing=args.prefix_sharing,
                controlled_acceptance=args.controlled_acceptance if args.component == "draft" else None,
                reference_file=args.reference_file if args.component == "draft" else "",
            )
        )
        if config.reference_file:  # read once here too, so a bad file is one line, not a worker's traceback
            from draft_service.controlled import ReferenceContinuations

            checked(lambda: ReferenceContinuations.from_file(config.reference_file))
        if args.component == "draft":
            from draft_service.server import run_draft_worker

            run_event_loop(run_draft_worker(config), args.event_loop)
        else:
            from target_service.server import run_target_worker

            run_event_loop(run_target_worker(config), args.event_loop)
        return 0
    from coordinator.cluster_config import ClusterConfig, ClusterConfigError
    from coordinator.config import CoordinatorConfig
    from coordinator.server import run_coordinator

    needed = ("redis-url",) if args.cluster_config else ("draft-addr", "target-addr", "redis-url")
    missing = [f"--{n}" for n in needed if not getattr(args, n.replace("-", "_"))]
    if missing:
        print(
            f"specpipe serve coordinator: {', '.join(missing)} required (or --cluster-config for replicas)",
            file=sys.stderr,
        )
        return 2
    try:
        if args.cluster_config:
            cluster = ClusterConfig.load(args.cluster_config)
        else:
            cluster = ClusterConfig.single(args.draft_addr, args.target_addr)
    except (OSError, ClusterConfigError) as exc:
        print(f"specpipe serve coordinator: {exc}", file=sys.stderr)
        return 2
    config = checked(
        lambda: CoordinatorConfig(
            cluster=cluster,
            redis_url=args.redis_url,
            host=args.host,
            port=args.port if args.port is not None else 50051,
            num_speculative_tokens=args.num_speculative_tokens,
            max_speculative_tokens=args.max_speculative_tokens,
            adaptive_k=args.adaptive_k,
            adaptive_k_rule=args.adaptive_k_rule,
            pipelining=args.pipelining,
            chaining=args.chaining,
            delegation=args.delegation,
            max_new_tokens_limit=args.max_new_tokens_limit,
            max_concurrent_requests=args.max_concurrent_requests,
            max_waiting_requests=args.max_waiting_requests,
            worker_timeout_s=args.worker_timeout,
            startup_timeout_s=args.startup_timeout,
            session_ttl_s=args.session_ttl,
            session_key_prefix=args.session_key_prefix,
            redis_username=args.redis_username,
            redis_password=redis_password(args),
            redis_ca_file=args.redis_ca_file,
            metrics_port=args.metrics_port,
            chat_template=chat_template(args.chat_template),
            http_port=-1 if args.http_port is None else args.http_port,
            served_model_name=args.served_model_name,
            tool_call_parser=args.tool_call_parser,
            reasoning_parser=args.reasoning_parser,
            api_key=api_key(args),
        )
    )
    try:
        run_event_loop(run_coordinator(config), args.event_loop)
    except Exception as exc:  # noqa: BLE001 - start-up failures end the process with their message
        logging.getLogger("specpipe").error("coordinator failed: %s", exc)
        return 1
    return 0


def serve_all(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    from specpipe.launcher import PipelineConfig, run_pipeline

    target_model, draft_model = args.target_model, args.draft_model
    if not target_model or not draft_model:
        from specpipe.default_models import default_model_dirs

        default_target, default_draft = default_model_dirs()
        target_model = target_model or str(default_target)
        draft_model = draft_model or str(default_draft)
    config = checked(
        lambda: PipelineConfig(
            target_model=target_model,
            draft_model=draft_model,
            host=args.host,
            port=args.port if args.port is not None else 50051,
            redis_url=args.redis_url,
            device=args.device,
            draft_device=args.draft_device,
            dtype=args.dtype,
            num_speculative_tokens=args.num_speculative_tokens,
            torch_threads=args.threads or embedded_worker_threads(),
            drafter=args.drafter,
            log_dir=args.log_dir,
            direct_streams=args.direct_streams,
            metrics_port=args.metrics_port,
            max_batch_sessions=args.max_batch_sessions,
            static_kv_slots=args.static_kv_slots,
            cuda_graphs=args.cuda_graphs,
            event_loop=args.event_loop,
            http_port=8000 if args.http_port is None else args.http_port,
            prefix_sharing=args.prefix_sharing,
        )
    )
    extra = [
        "--max-speculative-tokens",
        str(args.max_speculative_tokens),
        "--max-new-tokens-limit",
        str(args.max_new_tokens_limit),
        "--max-concurrent-requests",
        str(args.max_concurrent_requests),
        "--max-waiting-requests",
        str(args.max_waiting_requests),
        "--worker-timeout",
        str(args.worker_timeout),
        "--session-ttl",
        str(args.session_ttl),
        "--adaptive-k" if args.adaptive_k else "--no-adaptive-k",
        "--adaptive-k-rule",
        args.adaptive_k_rule,
        "--pipelining" if args.pipelining else "--no-pipelining",
        "--chaining" if args.chaining else "--no-chaining",
        "--delegation" if args.delegation else "--no-delegation",
    ]
    if args.served_model_name:
        extra += ["--served-model-name", args.served_model_name]
    if args.tool_call_parser:
        extra += ["--tool-call-parser", args.tool_call_parser]
    if args.reasoning_parser:
        extra += ["--reasoning-parser", args.reasoning_parser]
    api_key(args)  # an unreadable or empty key is refused here, before anything starts
    if args.api_key_file:  # (env SPECPIPE_API_KEY reaches the coordinator as it is)
        extra += ["--api-key-file", str(Path(args.api_key_file).resolve())]
    if args.chat_template:  # read here: a missing file is refused before anything starts
        extra += ["--chat-template", chat_template(args.chat_template)]
    return run_pipeline(config, extra)


def chat_template(value: str) -> str:
    """--chat-template: the file's content, or the value itself where it is a template (as vLLM's)."""
    if not value or "{{" in value or "{%" in value:
        return value
    try:
        return Path(value).read_text()
    except OSError as exc:
        raise FlagError(f"--chat-template: cannot read {value!r}: {exc.strerror}") from None


def read_argument(value: str | None) -> str | None:
    """An option's value, or the content of the file it names as @FILE."""
    if value is not None and value.startswith("@"):
        return Path(value[1:]).read_text()
    return value


def logit_bias_entry(text: str) -> tuple[int, float]:
    """`--logit-bias ID=BIAS`."""
    token_id, separator, bias = text.partition("=")
    try:
        if not separator:
            raise ValueError
        return int(token_id), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ID=BIAS (e.g. 198=-100), got {text!r}") from None


def print_logprobs(title: str, logprobs: Sequence[common_pb2.TokenLogprob]) -> None:
    """A title, then one line per token: its id and log-probability, then the likeliest tokens (ids)."""
    print(title)
    for position, token in enumerate(logprobs):
        top = " ".join(f"{t}:{lp:.3f}" for t, lp in zip(token.top_token_ids, token.top_logprobs, strict=True))
        print(f"{position:>4} token {token.token_id:>6} logprob {token.logprob:8.4f}  {top}".rstrip())


def generate(args: argparse.Namespace) -> int:
    from specpipe.client import Completions, CoordinatorClient, build_request

    try:
        request = build_request(
            args.prompt,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            seed=args.seed,
            stop=args.stop,
            session_id=args.session_id,
            num_speculative_tokens=args.num_speculative_tokens,
            acceptance=args.acceptance,
            logprobs=args.logprobs,
            prompt_logprobs=args.prompt_logprobs,
            repetition_penalty=args.repetition_penalty,
            presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty,
            logit_bias=dict(args.logit_bias),
            min_tokens=args.min_tokens,
            ignore_eos=args.ignore_eos,
            stop_token_ids=args.stop_token_id,
            allowed_token_ids=args.allowed_token_id,
            bad_words=args.bad_word,
            include_stop_str_in_output=args.include_stop_str,
            skip_special_tokens=False if args.keep_special_tokens else None,
            n=args.n,
            json_schema=read_argument(args.json_schema),
            json_object=args.json_object,
            regex=args.regex,
            choice=args.choice,
        )
    except (ValueError, OSError) as exc:  # a negative number for an unsigned field, an unreadable @FILE
        print(f"specpipe generate: {exc}", file=sys.stderr)
        return 2
    completions = Completions()
    started = time.perf_counter()
    streamed = args.n == 1  # n completions arrive interleaved: each is printed whole at the end
    with CoordinatorClient(args.addr) as client:
        try:
            if streamed:
                sys.stdout.write(args.prompt)
            for chunk in client.stream(request, timeout_s=args.timeout):
                completions.add(chunk)
                if streamed:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
        except grpc.RpcError as exc:
            print(f"\nspecpipe generate: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    elapsed = time.perf_counter() - started
    for index, result in enumerate(completions.by_index()):
        if streamed:
            sys.stdout.write("\n")
        else:
            print(f"--- completion {index} ---\n{args.prompt}{result.text}")
        print_result(args, result, elapsed, with_prompt_logprobs=index == 0)
    return 0


def print_result(
    args: argparse.Namespace, result: GenerationResult, elapsed: float, with_prompt_logprobs: bool
) -> None:
    """A completion's log-probs where asked (stdout), and its session and usage (stderr)."""
    if args.prompt_logprobs is not None and with_prompt_logprobs:
        # A new session's first token has nothing before it, so it has none.
        print_logprobs("prompt log-probs:", result.prompt_logprobs)
    if args.logprobs is not None:
        print_logprobs("generated tokens' log-probs:", result.logprobs)
    usage = result.usage
    if usage is not None:
        rate = usage.accepted_tokens / usage.draft_tokens if usage.draft_tokens else 0.0
        per_pass = usage.generated_tokens / usage.target_passes if usage.target_passes else 0.0
        print(
            f"[session {result.session_id}] finish={result.finish_reason} "
            f"tokens={usage.generated_tokens} in {elapsed:.2f}s "
            f"({usage.generated_tokens / elapsed:.1f} tok/s); "
            f"target passes={usage.target_passes} ({per_pass:.2f} tokens/pass); "
            f"draft tokens={usage.draft_tokens} accepted={usage.accepted_tokens} ({rate:.1%})",
            file=sys.stderr,
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specpipe", description="Distributed speculative decoding.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(subparsers)
    add_generate_parser(subparsers)
    add_info_parser(subparsers)
    add_bench_parser(subparsers)
    args = parser.parse_args(argv)
    # Idle OpenMP threads otherwise spin for a while after each op, stealing the cores of the other worker
    # processes on the same machine (measured: a 2 ms verify took 290 ms beside a spinning neighbour).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.command == "serve":
        try:
            checked(lambda: resolve_event_loop(args.event_loop))  # uvloop asked for where it is not installed
            return serve_all(args) if args.component == "all" else serve_component(args)
        except FlagError as exc:
            command = "specpipe serve" if args.component == "all" else f"specpipe serve {args.component}"
            print(f"{command}: {exc}", file=sys.stderr)
            return 2
    if args.command == "bench":
        return bench(args)
    if args.command == "info":
        return server_info(args)
    return generate(args)
