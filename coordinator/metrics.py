"""The coordinator's Prometheus metrics: requests, tokens, speculation and latency, served over HTTP.

Names follow the conventions vLLM and TGI users scrape (`*_total` counters, `*_seconds` histograms). The
acceptance rate is `specpipe_accepted_tokens_total / specpipe_draft_tokens_total`; tokens per target
pass `specpipe_generated_tokens_total / specpipe_target_passes_total`. One registry per coordinator (not
prometheus_client's global one), so tests and embedded servers never share counters.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from coordinator.request import GenerationChunk, Usage
from specpipe.errors import SpecpipeError
from specpipe.rpc.interceptor import status_for

# Seconds: from a fraction of a decoding step on a GPU to a long request on a CPU.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
PER_TOKEN_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)


class CoordinatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter(
            "specpipe_requests",
            "Generate requests by outcome: the finish reason (length, eos, stop), else the gRPC status code "
            "(INVALID_ARGUMENT, UNAVAILABLE, ...) or CANCELLED when the client left.",
            ["outcome"],
            registry=registry,
        )
        self.running = Gauge("specpipe_requests_running", "Generate requests in flight.", registry=registry)
        self.waiting = Gauge(
            "specpipe_requests_waiting",
            "Requests waiting for a slot of the concurrency limit (--max-waiting-requests).",
            registry=registry,
        )
        self.http_requests = Counter(
            "specpipe_http_requests",
            "The OpenAI-compatible HTTP API's requests by route and HTTP status (refusals before any "
            "Generate included; a streamed response counts its status when its stream ends).",
            ["route", "status"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "specpipe_prompt_tokens", "Prompt tokens of finished requests (session history included).",
            registry=registry,
        )  # fmt: skip
        self.generated_tokens = Counter(
            "specpipe_generated_tokens", "Tokens streamed to clients.", registry=registry
        )
        self.draft_tokens = Counter(
            "specpipe_draft_tokens", "Draft tokens proposed for verification (finished requests).",
            registry=registry,
        )  # fmt: skip
        self.accepted_tokens = Counter(
            "specpipe_accepted_tokens", "Draft tokens the target accepted (finished requests).",
            registry=registry,
        )  # fmt: skip
        self.target_passes = Counter(
            "specpipe_target_passes", "Target forward passes (one per round; finished requests).",
            registry=registry,
        )  # fmt: skip
        self.time_to_first_token = Histogram(
            "specpipe_time_to_first_token_seconds", "From the request's arrival to its first token.",
            buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.time_per_output_token = Histogram(
            "specpipe_time_per_output_token_seconds",
            "Per completion (each of a request's n), the time after its first token divided by the tokens "
            "after it.",
            buckets=PER_TOKEN_BUCKETS, registry=registry,
        )  # fmt: skip
        self.request_duration = Histogram(
            "specpipe_request_duration_seconds", "From the request's arrival to its last chunk or failure.",
            buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip

    @contextlib.contextmanager
    def request(self) -> Iterator[RequestObserver]:
        """Observes one Generate call: in flight while inside, its outcome and latencies at the end."""
        observer = RequestObserver(time.perf_counter())
        self.running.inc()
        outcome = "CANCELLED"  # left by the client (the stream closed at a yield) unless set below
        try:
            yield observer
            outcome = observer.finish_reason or "OK"
        except SpecpipeError as exc:
            outcome = status_for(exc).name
            raise
        except Exception:
            outcome = grpc.StatusCode.INTERNAL.name
            raise
        finally:
            self.running.dec()
            self.requests.labels(outcome=outcome).inc()
            self.request_duration.observe(time.perf_counter() - observer.started)
            self._record(observer)

    def _record(self, observer: RequestObserver) -> None:
        for stream in observer.streams.values():  # each completion's own, n interleaved ones apart
            if stream.tokens > 1:
                self.time_per_output_token.observe((stream.last_at - stream.first_at) / (stream.tokens - 1))
        for usage in observer.usages:
            self.prompt_tokens.inc(usage.prompt_tokens)
            self.draft_tokens.inc(usage.draft_tokens)
            self.accepted_tokens.inc(usage.accepted_tokens)
            self.target_passes.inc(usage.target_passes)


@dataclass(slots=True)
class StreamTimes:
    """One completion's tokens and when its first and latest came."""

    first_at: float
    last_at: float
    tokens: int = 0


@dataclass(slots=True)
class RequestObserver:
    started: float
    first_token_at: float | None = None  # the request's, over all its completions
    streams: dict[int, StreamTimes] = field(default_factory=dict)  # by completion index
    finish_reason: str = ""
    usages: list[Usage] = field(default_factory=list)  # each completion's final chunk's

    def chunk(self, chunk: GenerationChunk, metrics: CoordinatorMetrics) -> None:
        """A chunk about to be streamed: its tokens count, the first one stops the time to first token."""
        if chunk.token_ids:
            now = time.perf_counter()
            if self.first_token_at is None:
                self.first_token_at = now
                metrics.time_to_first_token.observe(now - self.started)
            stream = self.streams.setdefault(chunk.index, StreamTimes(now, now))
            stream.last_at = now
            stream.tokens += len(chunk.token_ids)
            metrics.generated_tokens.inc(len(chunk.token_ids))
        if chunk.finish_reason:
            self.finish_reason = chunk.finish_reason
            if chunk.usage is not None:
                self.usages.append(chunk.usage)
