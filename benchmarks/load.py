"""Load test of a running coordinator: many concurrent Generate streams, latency percentiles and throughput.

Modelled on vLLM's `benchmark_serving.py`: `--num-requests` requests are sent over one channel, arriving as a
Poisson process at `--request-rate` per second (default: all at once), at most `--concurrency` in flight.
Each stream is timed on the client: time to first token (TTFT), the gaps between the chunks that carry
tokens (inter-token latency, ITL; a speculative round delivers several tokens in one chunk, so ITL is per
chunk), time per output token after the first (TPOT = (end-to-end - TTFT) / (tokens - 1)) and end-to-end
latency. Failed requests are counted by gRPC status code, never raised: a load test reports what the server
did under load, errors included.

    specpipe serve &                      # the embedded stack on 127.0.0.1:50051
    specpipe bench load --num-requests 64 --concurrency 8
    specpipe bench load --address coordinator:50051 --request-rate 4 --num-requests 200 --out load.json
    specpipe bench load --http-url http://127.0.0.1:8000   # the same load through the OpenAI HTTP API

Over HTTP (`--http-url`, streamed /v1/completions with the usage in its last event, as vLLM's benchmark
sends them) each event that carries text counts as a chunk, the token count comes from the usage, failures
are counted by HTTP status (or the gRPC code an error event names), and speculation's figures are not
reported (the OpenAI API does not carry them).

Prompts: code snippets cut from standard-library files (the demo pair's held-out files where the shipped
training record is found), sent as text, so the load tester needs no model or tokenizer files.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import functools
import json
import math
import os
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc

from benchmarks.prompts import default_prompts
from specpipe.client import AsyncCoordinatorClient, build_request
from specpipe.rpc.event_loop import EVENT_LOOPS, resolve, run_event_loop

REPO = Path(__file__).resolve().parent.parent
SHIPPED_RECORD = REPO / "specpipe" / "assets" / "demo-pair" / "training_record.json"
CHARS_PER_TOKEN = 3  # prompts are cut to about 120 tokens at this rate; the server tokenizes them


@dataclass(slots=True)
class RequestRecord:
    """One request as the client saw it; times in seconds from the request's start."""

    prompt_index: int
    status: str = "OK"
    detail: str = ""
    output_tokens: int = 0
    first_token_s: float | None = None
    token_chunk_s: list[float] = field(default_factory=list)  # arrival of each chunk that carried tokens
    end_s: float = 0.0
    # From the final chunk's Usage: what speculation did for this request.
    draft_tokens: int = 0
    accepted_tokens: int = 0
    target_passes: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "OK"

    @property
    def inter_token_s(self) -> list[float]:
        return [b - a for a, b in zip(self.token_chunk_s, self.token_chunk_s[1:], strict=False)]

    @property
    def time_per_output_token_s(self) -> float | None:
        if self.first_token_s is None or self.output_tokens < 2:
            return None
        return (self.end_s - self.first_token_s) / (self.output_tokens - 1)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="specpipe bench load",
        description="Concurrent Generate streams against a running coordinator: TTFT, ITL, TPOT and "
        "end-to-end latency percentiles, throughput, and errors by status code.",
    )
    p.add_argument("--address", default="127.0.0.1:50051", help="the coordinator (default: specpipe serve's)")
    p.add_argument(
        "--http-url", default="",
        help="send the requests to this OpenAI-compatible API instead (e.g. http://127.0.0.1:8000, specpipe "
        "serve's; streamed /v1/completions; env OPENAI_API_KEY, where set, as its bearer token)",
    )  # fmt: skip
    p.add_argument(
        "--chat", action="store_true",
        help="with --http-url: streamed /v1/chat/completions, each prompt as the user's message (the server "
        "needs a chat template: specpipe serve --chat-template)",
    )  # fmt: skip
    p.add_argument("--num-requests", type=int, default=64, help="default: %(default)s")
    p.add_argument("--concurrency", type=int, default=8, help="most requests in flight at once")
    p.add_argument(
        "--request-rate",
        type=float,
        default=math.inf,
        help="Poisson arrivals per second (default: all at once)",
    )
    p.add_argument("--max-new-tokens", type=int, default=128, help="per request (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0, help="arrival times, and request i samples with seed + i")
    p.add_argument("--num-speculative-tokens", type=int, default=None, help="default: the coordinator's")
    p.add_argument(
        "--ignore-eos", action="store_true",
        help="every request generates max_new_tokens, past end-of-sequence tokens (fixed output lengths)",
    )  # fmt: skip
    p.add_argument("--timeout", type=float, default=300.0, help="deadline of each request, seconds")
    p.add_argument("--out", type=Path, help="write the summary and every request as JSON here")
    p.add_argument(
        "--event-loop",
        choices=EVENT_LOOPS,
        default="auto",
        help="the client's loop (auto: uvloop where installed, as the services)",
    )
    args = p.parse_args(argv)
    if args.num_requests < 1 or args.concurrency < 1 or args.max_new_tokens < 1:
        p.error("--num-requests, --concurrency and --max-new-tokens must be >= 1")
    if not args.request_rate > 0:
        p.error("--request-rate must be > 0")
    if args.chat and not args.http_url:
        p.error("--chat is for --http-url (the gRPC API's chat requests are GenerateRequest.messages)")
    return args


def load_prompts(count: int) -> list[str]:
    """`count` distinct-enough prompt texts (fewer snippets are reused round-robin)."""
    record = SHIPPED_RECORD if SHIPPED_RECORD.is_file() else None
    snippets, _ = default_prompts(record, lambda text: [0] * (len(text) // CHARS_PER_TOKEN), min(count, 32))
    return [snippets[i % len(snippets)].text for i in range(count)]


def arrival_offsets(count: int, rate: float, seed: int) -> list[float]:
    """Seconds from the start at which each request is sent: a Poisson process, or all at 0."""
    if math.isinf(rate):
        return [0.0] * count
    rng = random.Random(seed)
    offsets, now = [], 0.0
    for _ in range(count):
        offsets.append(now)
        now += rng.expovariate(rate)
    return offsets


async def one_request(
    client: AsyncCoordinatorClient, args: argparse.Namespace, index: int, prompt: str
) -> RequestRecord:
    record = RequestRecord(index)
    request = build_request(
        prompt, args.max_new_tokens, temperature=args.temperature, seed=args.seed + index,
        num_speculative_tokens=args.num_speculative_tokens, ignore_eos=args.ignore_eos,
    )  # fmt: skip
    started = time.perf_counter()
    try:
        async for chunk in client.stream(request, args.timeout):
            if chunk.token_ids:
                now = time.perf_counter() - started
                if record.first_token_s is None:
                    record.first_token_s = now
                record.token_chunk_s.append(now)
                record.output_tokens += len(chunk.token_ids)
            if chunk.HasField("usage"):  # the final chunk
                usage = chunk.usage
                record.draft_tokens, record.accepted_tokens = usage.draft_tokens, usage.accepted_tokens
                record.target_passes = usage.target_passes
    except grpc.aio.AioRpcError as exc:
        record.status, record.detail = exc.code().name, exc.details() or ""
    record.end_s = time.perf_counter() - started
    return record


async def one_http_request(
    session: aiohttp.ClientSession, args: argparse.Namespace, index: int, prompt: str
) -> RequestRecord:
    """The same request through the OpenAI-compatible API: a streamed /v1/completions, or with --chat a
    streamed /v1/chat/completions of the prompt as the user's message."""
    record = RequestRecord(index)
    body: dict[str, object] = {
        "max_tokens": args.max_new_tokens, "temperature": args.temperature,
        "seed": args.seed + index, "ignore_eos": args.ignore_eos, "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    if args.chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if args.num_speculative_tokens is not None:
        body["num_speculative_tokens"] = args.num_speculative_tokens
    api_key = os.environ.get(
        "OPENAI_API_KEY", ""
    ).strip()  # what OpenAI's clients read; a server with --api-key-file
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    started = time.perf_counter()
    try:
        async with session.post(
            f"{args.http_url.rstrip('/')}/v1/{'chat/completions' if args.chat else 'completions'}",
            json=body,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=args.timeout),
        ) as response:
            if response.status != 200:
                error = (await response.json(content_type=None)).get("error", {})
                record.status, record.detail = f"HTTP {response.status}", str(error.get("message", ""))
            else:
                async for line in response.content:
                    event = line.decode().strip().removeprefix("data: ")
                    if not event or event == "[DONE]":
                        continue
                    payload = json.loads(event)
                    if "error" in payload:
                        record.status = str(payload["error"].get("code") or "ERROR")
                        record.detail = str(payload["error"].get("message", ""))
                    elif payload.get("usage"):
                        record.output_tokens = int(payload["usage"]["completion_tokens"])
                    elif payload["choices"] and shows_output(payload["choices"][0]):
                        now = time.perf_counter() - started
                        if record.first_token_s is None:
                            record.first_token_s = now
                        record.token_chunk_s.append(now)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:  # ValueError: a body that is not JSON
        record.status, record.detail = type(exc).__name__, str(exc)
    record.end_s = time.perf_counter() - started
    return record


def shows_output(choice: dict[str, object]) -> bool:
    """Whether a stream event's choice carries output: a completion's text, or a chat delta's content, its
    thinking (reasoning_content) or a tool call."""
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return bool(delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"))
    return bool(choice.get("text"))


async def run_load(args: argparse.Namespace, prompts: Sequence[str]) -> tuple[list[RequestRecord], float]:
    """Every request's record (in request order) and the wall time of the whole test."""
    offsets = arrival_offsets(len(prompts), args.request_rate, args.seed)
    in_flight = asyncio.Semaphore(args.concurrency)
    async with contextlib.AsyncExitStack() as stack:
        if args.http_url:
            connector = aiohttp.TCPConnector(limit=args.concurrency)
            session = await stack.enter_async_context(aiohttp.ClientSession(connector=connector))
            send = functools.partial(one_http_request, session, args)
        else:
            client = await stack.enter_async_context(AsyncCoordinatorClient(args.address))
            send = functools.partial(one_request, client, args)
        started = time.perf_counter()

        async def scheduled(index: int) -> RequestRecord:
            await asyncio.sleep(max(0.0, offsets[index] - (time.perf_counter() - started)))
            async with in_flight:
                return await send(index, prompts[index])

        records = await asyncio.gather(*(scheduled(i) for i in range(len(prompts))))
        return list(records), time.perf_counter() - started


def percentiles_ms(samples: Sequence[float]) -> dict[str, float] | None:
    """mean, median, p90 and p99 in ms (nearest-rank percentiles), None without samples."""
    if not samples:
        return None
    ordered = sorted(samples)

    def rank(p: float) -> float:
        return ordered[max(0, math.ceil(p / 100.0 * len(ordered)) - 1)]

    return {
        "mean": statistics.fmean(ordered) * 1000.0,
        "median": statistics.median(ordered) * 1000.0,
        "p90": rank(90) * 1000.0,
        "p99": rank(99) * 1000.0,
    }


def summarize(records: Sequence[RequestRecord], duration_s: float) -> dict[str, object]:
    done = [r for r in records if r.ok]
    tokens = sum(r.output_tokens for r in done)
    tpot = [t for r in done if (t := r.time_per_output_token_s) is not None]
    return {
        "requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "failures_by_status": dict(Counter(r.status for r in records if not r.ok)),
        "duration_s": duration_s,
        "request_throughput_per_s": len(done) / duration_s if duration_s > 0 else 0.0,
        "output_tokens": tokens,
        "output_token_throughput_per_s": tokens / duration_s if duration_s > 0 else 0.0,
        "ttft_ms": percentiles_ms([r.first_token_s for r in done if r.first_token_s is not None]),
        "tpot_ms": percentiles_ms(tpot),
        "itl_ms": percentiles_ms([gap for r in done for gap in r.inter_token_s]),
        "e2e_latency_ms": percentiles_ms([r.end_s for r in done]),
        "speculation": speculation(done),
    }


def speculation(done: Sequence[RequestRecord]) -> dict[str, float | int] | None:
    """What speculation did over the completed requests: the share of drafted tokens the target accepted,
    and the tokens each target pass yielded (accepted + its own), from the requests' final Usage. None when
    no target pass was reported."""
    passes = sum(r.target_passes for r in done)
    if not passes:
        return None
    drafted = sum(r.draft_tokens for r in done)
    accepted = sum(r.accepted_tokens for r in done)
    return {
        "target_passes": passes,
        "draft_tokens": drafted,
        "accepted_tokens": accepted,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "tokens_per_target_pass": sum(r.output_tokens for r in done) / passes,
    }


def report(summary: dict[str, object], args: argparse.Namespace) -> str:
    rate = "all at once" if math.isinf(args.request_rate) else f"{args.request_rate:g}/s (Poisson)"
    lines = [
        f"load test of {args.http_url or args.address}: {summary['requests']} requests, arrivals {rate}, "
        f"concurrency {args.concurrency}, {args.max_new_tokens} new tokens, "
        f"temperature {args.temperature:g}, client on {resolve(args.event_loop)}",
        f"completed {summary['completed']}, failed {summary['failed']}"
        + (f" {summary['failures_by_status']}" if summary["failed"] else ""),
        f"duration {summary['duration_s']:.2f} s; {summary['request_throughput_per_s']:.2f} requests/s, "
        f"{summary['output_token_throughput_per_s']:.1f} output tokens/s ({summary['output_tokens']} tokens)",
    ]
    spec = summary["speculation"]
    if isinstance(spec, dict):
        lines.append(
            f"speculation: {spec['tokens_per_target_pass']:.2f} tokens per target pass, "
            f"{spec['acceptance_rate']:.0%} of {spec['draft_tokens']} drafted tokens accepted "
            f"({spec['target_passes']} passes)"
        )
    lines.append(f"{'ms':<16}{'mean':>10}{'median':>10}{'p90':>10}{'p99':>10}")
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL (per chunk)"),
                      ("e2e_latency_ms", "end-to-end")):  # fmt: skip
        stats = summary[key]
        if isinstance(stats, dict):
            lines.append(
                f"{name:<16}" + "".join(f"{stats[s]:>10.1f}" for s in ("mean", "median", "p90", "p99"))
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    prompts = load_prompts(args.num_requests)
    records, duration_s = run_event_loop(run_load(args, prompts), args.event_loop)
    summary = summarize(records, duration_s)
    print(report(summary, args))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["specpipe bench load", *argv]),
            "summary": summary,
            "requests": [
                {
                    "prompt_index": r.prompt_index, "status": r.status, "detail": r.detail,
                    "output_tokens": r.output_tokens, "ttft_s": r.first_token_s, "e2e_s": r.end_s,
                    "token_chunk_s": r.token_chunk_s, "draft_tokens": r.draft_tokens,
                    "accepted_tokens": r.accepted_tokens, "target_passes": r.target_passes,
                }
                for r in records
            ],
        }  # fmt: skip
        args.out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
