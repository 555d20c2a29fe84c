from specpipe.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProposeRequest(_message.Message):
    __slots__ = ("session_id", "token_ids", "num_tokens", "sampling", "start_position", "first_is_bonus_guess")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    START_POSITION_FIELD_NUMBER: _ClassVar[int]
    FIRST_IS_BONUS_GUESS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    num_tokens: int
    sampling: _common_pb2.SamplingParams
    start_position: int
    first_is_bonus_guess: bool
    def __init__(self, session_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., num_tokens: _Optional[int] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., start_position: _Optional[int] = ..., first_is_bonus_guess: _Optional[bool] = ...) -> None: ...

class ProposeResponse(_message.Message):
    __slots__ = ("token_ids", "draft_probs", "forward_ns", "cached_tokens")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_PROBS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_NS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    draft_probs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenDistribution]
    forward_ns: int
    cached_tokens: int
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., draft_probs: _Optional[_Iterable[_Union[_common_pb2.TokenDistribution, _Mapping]]] = ..., forward_ns: _Optional[int] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class DraftSchedule(_message.Message):
    __slots__ = ("fixed_k", "max_k", "pipelining", "chaining", "costs", "accepted", "rejected", "rounds_since_draft", "heuristic_k")
    FIXED_K_FIELD_NUMBER: _ClassVar[int]
    MAX_K_FIELD_NUMBER: _ClassVar[int]
    PIPELINING_FIELD_NUMBER: _ClassVar[int]
    CHAINING_FIELD_NUMBER: _ClassVar[int]
    COSTS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_SINCE_DRAFT_FIELD_NUMBER: _ClassVar[int]
    HEURISTIC_K_FIELD_NUMBER: _ClassVar[int]
    fixed_k: int
    max_k: int
    pipelining: bool
    chaining: bool
    costs: CostProfile
    accepted: float
    rejected: float
    rounds_since_draft: int
    heuristic_k: int
    def __init__(self, fixed_k: _Optional[int] = ..., max_k: _Optional[int] = ..., pipelining: _Optional[bool] = ..., chaining: _Optional[bool] = ..., costs: _Optional[_Union[CostProfile, _Mapping]] = ..., accepted: _Optional[float] = ..., rejected: _Optional[float] = ..., rounds_since_draft: _Optional[int] = ..., heuristic_k: _Optional[int] = ...) -> None: ...

class CostProfile(_message.Message):
    __slots__ = ("draft_token_s", "verify_base_s", "verify_token_s", "round_overhead_s", "draft_call_s")
    DRAFT_TOKEN_S_FIELD_NUMBER: _ClassVar[int]
    VERIFY_BASE_S_FIELD_NUMBER: _ClassVar[int]
    VERIFY_TOKEN_S_FIELD_NUMBER: _ClassVar[int]
    ROUND_OVERHEAD_S_FIELD_NUMBER: _ClassVar[int]
    DRAFT_CALL_S_FIELD_NUMBER: _ClassVar[int]
    draft_token_s: float
    verify_base_s: float
    verify_token_s: float
    round_overhead_s: float
    draft_call_s: float
    def __init__(self, draft_token_s: _Optional[float] = ..., verify_base_s: _Optional[float] = ..., verify_token_s: _Optional[float] = ..., round_overhead_s: _Optional[float] = ..., draft_call_s: _Optional[float] = ...) -> None: ...

class SpeculateRequest(_message.Message):
    __slots__ = ("session_id", "token_ids", "max_new_tokens", "sampling", "target_address", "schedule", "target_context", "draft_context", "eos_token_ids", "worker_timeout_s", "vocab_size")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    TARGET_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    TARGET_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    DRAFT_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    WORKER_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    max_new_tokens: int
    sampling: _common_pb2.SamplingParams
    target_address: str
    schedule: DraftSchedule
    target_context: int
    draft_context: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    worker_timeout_s: float
    vocab_size: int
    def __init__(self, session_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., max_new_tokens: _Optional[int] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., target_address: _Optional[str] = ..., schedule: _Optional[_Union[DraftSchedule, _Mapping]] = ..., target_context: _Optional[int] = ..., draft_context: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., worker_timeout_s: _Optional[float] = ..., vocab_size: _Optional[int] = ...) -> None: ...

class SpeculationRound(_message.Message):
    __slots__ = ("draft_token_ids", "num_accepted", "next_token_id", "new_token_ids", "finish_reason", "draft_forward_ns", "target_forward_ns", "logprobs", "repetition_penalty", "applied_sampling")
    DRAFT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    NEW_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FORWARD_NS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FORWARD_NS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    APPLIED_SAMPLING_FIELD_NUMBER: _ClassVar[int]
    draft_token_ids: _containers.RepeatedScalarFieldContainer[int]
    num_accepted: int
    next_token_id: int
    new_token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: str
    draft_forward_ns: int
    target_forward_ns: int
    logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprob]
    repetition_penalty: float
    applied_sampling: _common_pb2.SamplingParams
    def __init__(self, draft_token_ids: _Optional[_Iterable[int]] = ..., num_accepted: _Optional[int] = ..., next_token_id: _Optional[int] = ..., new_token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[str] = ..., draft_forward_ns: _Optional[int] = ..., target_forward_ns: _Optional[int] = ..., logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprob, _Mapping]]] = ..., repetition_penalty: _Optional[float] = ..., applied_sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ...) -> None: ...
