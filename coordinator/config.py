"""Configuration of the coordinator, built once by the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field

from coordinator.cluster_config import ClusterConfig
from coordinator.openai_api.reasoning import REASONING_PARSERS
from coordinator.openai_api.tools import TOOL_CALL_PARSERS

ADAPTIVE_K_RULES = ("cost", "hf-heuristic")


@dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    # Where the draft and target replicas are and how sessions are routed to them.
    cluster: ClusterConfig
    redis_url: str
    host: str = "127.0.0.1"
    port: int = 50051
    # Draft length k for requests that do not set one (0 = no speculation); ignored when adaptive_k is on.
    num_speculative_tokens: int = 4
    # The largest k a request may ask for, and the bound of the adaptive policy.
    max_speculative_tokens: int = 16
    # Choose k per round from the session's acceptance rate and the measured costs.
    adaptive_k: bool = True
    # How adaptive k chooses: "cost" (the expected tokens per unit time from acceptance and costs) or
    # "hf-heuristic" (Hugging Face's +2/-1 schedule, to compare the two in one system).
    adaptive_k_rule: str = "cost"
    # Draft the next block while the target verifies the current one.
    pipelining: bool = True
    # With pipelining: queue the next block on the target before the verdict (target_service/chain.py).
    chaining: bool = True
    # Run each request's rounds on its draft replica, which exchanges blocks and verdicts with the target
    # directly (specpipe/speculation/delegation.py); the coordinator commits and streams them.
    delegation: bool = True
    max_new_tokens_limit: int = 4096
    # Generate calls served at once; one more gets RESOURCE_EXHAUSTED at once rather than queueing behind
    # them (as TGI's --max-concurrent-requests): clients retry, or a load balancer moves them elsewhere.
    max_concurrent_requests: int = 256
    # Requests that may wait for a slot once the limit is full (by priority, then first come first served;
    # 0: refused at once).
    max_waiting_requests: int = 0
    # Upper bound on one worker RPC; the client's own deadline is applied when shorter.
    worker_timeout_s: float = 30.0
    # How long start-up waits for the workers and the session store to answer.
    startup_timeout_s: float = 300.0
    session_ttl_s: int = 24 * 3600
    session_key_prefix: str = "specpipe:session:"
    # Credentials and TLS for the store, kept out of redis_url so no command line shows them.
    redis_username: str = ""
    redis_password: str = field(default="", repr=False)
    redis_ca_file: str = ""
    shutdown_grace_s: float = 10.0
    # Prometheus metrics over HTTP on `host` (coordinator/metrics.py): 0 = a free port, -1 = none.
    metrics_port: int = -1
    # A Jinja chat template for GenerateRequest.messages, replacing the tokenizer's own ("" = that one).
    chat_template: str = ""
    # The OpenAI-compatible HTTP API on `host` (coordinator/openai_api): 0 = a free port, -1 = none.
    http_port: int = -1
    # The model's name in the HTTP API ("" = the target's name as the worker reports it).
    served_model_name: str = ""
    # The HTTP API's bearer token ("" = none asked), kept out of the command line and the logs.
    api_key: str = field(default="", repr=False)
    # How a chat output's tool calls are written, for tool_choice "auto" ("" = none: "auto" is refused).
    tool_call_parser: str = ""
    # How a reasoning model's thinking is split from its answer in chat responses ("" = not split).
    reasoning_parser: str = ""

    def __post_init__(self) -> None:
        if not self.redis_url:
            raise ValueError("redis_url is required")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_speculative_tokens < 0:
            raise ValueError(f"max_speculative_tokens must be >= 0, got {self.max_speculative_tokens}")
        if not 0 <= self.num_speculative_tokens <= self.max_speculative_tokens:
            raise ValueError(
                f"num_speculative_tokens must be in [0, {self.max_speculative_tokens}] "
                "(max_speculative_tokens), "
                f"got {self.num_speculative_tokens}"
            )
        if self.adaptive_k_rule not in ADAPTIVE_K_RULES:
            raise ValueError(
                f"adaptive_k_rule must be one of {ADAPTIVE_K_RULES}, got {self.adaptive_k_rule!r}"
            )
        if self.max_concurrent_requests < 1:
            raise ValueError(f"max_concurrent_requests must be >= 1, got {self.max_concurrent_requests}")
        if self.max_waiting_requests < 0:
            raise ValueError(f"max_waiting_requests must be >= 0, got {self.max_waiting_requests}")
        if self.max_new_tokens_limit < 1:
            raise ValueError(f"max_new_tokens_limit must be >= 1, got {self.max_new_tokens_limit}")
        for name in ("worker_timeout_s", "startup_timeout_s", "shutdown_grace_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("metrics_port", "http_port"):
            if not -1 <= getattr(self, name) < 65536:
                raise ValueError(f"{name} must be in [-1, 65535], got {getattr(self, name)}")
        if self.tool_call_parser and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(
                f"tool_call_parser must be one of {TOOL_CALL_PARSERS} (or empty), "
                f"got {self.tool_call_parser!r}"
            )
        if self.reasoning_parser and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(
                f"reasoning_parser must be one of {REASONING_PARSERS} (or empty), "
                f"got {self.reasoning_parser!r}"
            )
        if self.session_ttl_s < 1:
            raise ValueError(f"session_ttl_s must be >= 1, got {self.session_ttl_s}")
