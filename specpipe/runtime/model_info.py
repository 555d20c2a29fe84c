"""What a worker serves, as the coordinator sees it (the info RPC's domain type)."""

from __future__ import annotations

from dataclasses import dataclass, field

from specpipe.runtime.model_runner import CausalLMRunner
from specpipe.runtime.tokenizer_files import tokenizer_fingerprint, tokenizer_to_files
from specpipe.v1 import common_pb2


@dataclass(frozen=True, slots=True)
class WorkerModelInfo:
    role: str
    model_name: str
    vocab_size: int
    tokenizer_fingerprint: str
    max_context: int
    dtype: str
    device: str
    eos_token_ids: tuple[int, ...]
    drafter: str = ""
    direct_stream_port: int = 0  # targets: the direct-stream listener's port (0 = none)
    tokenizer_files: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def from_runner(
        cls, runner: CausalLMRunner, role: str, drafter: str = "", direct_stream_port: int = 0
    ) -> WorkerModelInfo:
        return cls(
            role=role,
            model_name=runner.model_name,
            vocab_size=runner.vocab_size,
            tokenizer_fingerprint=tokenizer_fingerprint(runner.tokenizer),
            max_context=runner.max_context,
            dtype=str(runner.dtype).removeprefix("torch."),
            device=str(runner.device),
            eos_token_ids=tuple(runner.eos_token_ids()),
            drafter=drafter,
            direct_stream_port=direct_stream_port,
            tokenizer_files=tokenizer_to_files(runner.tokenizer),
        )

    @classmethod
    def from_pb(cls, pb: common_pb2.ModelInfo) -> WorkerModelInfo:
        return cls(
            role=pb.role,
            model_name=pb.model_name,
            vocab_size=pb.vocab_size,
            tokenizer_fingerprint=pb.tokenizer_fingerprint,
            max_context=pb.max_context,
            dtype=pb.dtype,
            device=pb.device,
            eos_token_ids=tuple(pb.eos_token_ids),
            drafter=pb.drafter,
            direct_stream_port=pb.direct_stream_port,
            tokenizer_files=dict(pb.tokenizer_files),
        )

    def to_pb(self, include_tokenizer_files: bool) -> common_pb2.ModelInfo:
        return common_pb2.ModelInfo(
            role=self.role,
            model_name=self.model_name,
            vocab_size=self.vocab_size,
            tokenizer_fingerprint=self.tokenizer_fingerprint,
            max_context=self.max_context,
            dtype=self.dtype,
            device=self.device,
            eos_token_ids=list(self.eos_token_ids),
            drafter=self.drafter,
            direct_stream_port=self.direct_stream_port,
            tokenizer_files=self.tokenizer_files if include_tokenizer_files else {},
        )
