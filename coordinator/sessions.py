"""GetSession and DeleteSession: the session as clients see it, and deleting it everywhere."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from coordinator.request import Usage
from specpipe.errors import SpecpipeError
from specpipe.rpc.worker_clients import WorkerClient
from specpipe.store.session_store import SessionState, SessionStore
from specpipe.v1 import coordinator_pb2

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SessionView:
    state: SessionState
    text: str

    def to_pb(self) -> coordinator_pb2.SessionInfo:
        stats = self.state.stats
        usage = Usage(
            prompt_tokens=self.state.prompt_len,
            generated_tokens=stats.generated_tokens,
            draft_tokens=stats.draft_tokens,
            accepted_tokens=stats.accepted_tokens,
            target_passes=stats.target_passes,
        )
        return coordinator_pb2.SessionInfo(
            session_id=self.state.session_id,
            token_ids=self.state.token_ids,
            prompt_tokens=self.state.prompt_len,
            text=self.text,
            usage=usage.to_pb(),
            version=self.state.version,
            created_at=self.state.created_at,
            updated_at=self.state.updated_at,
            ttl_seconds=self.state.ttl_s,
        )


class SessionService:
    def __init__(
        self,
        store: SessionStore,
        tokenizer: PreTrainedTokenizerBase,
        workers: Callable[[], Sequence[WorkerClient]],  # the replicas in rotation now
    ) -> None:
        self.store = store
        self.tokenizer = tokenizer
        self.workers = workers

    async def get(self, session_id: str) -> SessionView:
        state = await self.store.load(session_id)
        text = self.tokenizer.decode(
            list(state.token_ids), skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        return SessionView(state, text)

    async def delete(self, session_id: str) -> bool:
        deleted = await self.store.delete(session_id)
        # Free the workers' caches too (any replica may hold one); an unreachable worker's cache ages out of
        # its LRU anyway.
        workers = list(self.workers())
        results = await asyncio.gather(
            *(worker.release_session(session_id, timeout_s=5.0) for worker in workers),
            return_exceptions=True,
        )
        for worker, result in zip(workers, results, strict=True):
            if isinstance(result, SpecpipeError):
                logger.warning(
                    "could not free %s's cache for session %s: %s", worker.role, session_id, result
                )
        return deleted
