"""What a coordinator serves and allows (Coordinator.GetServerInfo), as clients see it."""

from __future__ import annotations

from dataclasses import dataclass

from coordinator.request import MAX_COMPLETIONS, RequestLimits
from specpipe import __version__
from specpipe.speculation.limits import ModelLimits
from specpipe.v1 import coordinator_pb2


@dataclass(frozen=True, slots=True)
class ServerInfo:
    target_model: str
    draft_model: str
    models: ModelLimits
    requests: RequestLimits
    max_concurrent_requests: int
    chat_template: bool = False  # GenerateRequest.messages accepted

    def to_pb(self, requests_running: int) -> coordinator_pb2.ServerInfo:
        default_k = self.requests.default_speculative_tokens
        return coordinator_pb2.ServerInfo(
            version=__version__,
            target_model=self.target_model,
            draft_model=self.draft_model,
            max_context=self.models.target_context,
            vocab_size=self.models.vocab_size,
            eos_token_ids=sorted(self.models.eos_token_ids),
            max_new_tokens=self.requests.max_new_tokens,
            max_speculative_tokens=self.requests.max_speculative_tokens,
            adaptive_k=default_k is None and self.requests.max_speculative_tokens > 0,
            default_speculative_tokens=default_k or 0,
            max_concurrent_requests=self.max_concurrent_requests,
            requests_running=requests_running,
            max_completions=min(MAX_COMPLETIONS, self.max_concurrent_requests),
            chat_template=self.chat_template,
        )
