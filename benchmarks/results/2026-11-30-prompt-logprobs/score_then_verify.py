"""The target worker of a `specpipe serve` stack, directly: ScorePrompt of each held-out prompt, then a verify
of a 3-token block after it (which reuses the scored cache), against a cold verify (prefill + block in one
forward). Usage: python benchmarks/results/2026-11-30-prompt-logprobs/score_then_verify.py TARGET_ADDR"""

import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from transformers import AutoTokenizer

from benchmarks.load import load_prompts
from specpipe.rpc.worker_clients import TargetClient
from specpipe.speculation.prompt_scores import PromptScoring
from specpipe.v1 import common_pb2, target_pb2

tokenizer = AutoTokenizer.from_pretrained(
    Path(__file__).resolve().parents[3] / "specpipe/assets/demo-pair/target"
)
prompts = load_prompts(12)


def verify_request(session_id: str, ids: list[int]) -> target_pb2.VerifyRequest:
    return target_pb2.VerifyRequest(
        session_id=session_id, token_ids=ids, draft_token_ids=[5, 6, 7], sampling=common_pb2.SamplingParams()
    )


async def main(address: str) -> None:
    client = TargetClient(address)
    for top in (0, 5):
        score_ms, after_ms, cold_ms, forward_ms = [], [], [], []
        for i, prompt in enumerate(prompts):
            ids = tokenizer(prompt)["input_ids"]
            session_id = f"probe-{top}-{i}"
            started = time.perf_counter()
            scores = await client.score_prompt(PromptScoring(session_id, tuple(ids), 1, top), 30)
            scored = time.perf_counter()
            after = await client.stub.Verify(verify_request(session_id, ids), timeout=30)
            verified = time.perf_counter()
            await client.stub.Verify(verify_request(session_id + "-cold", ids), timeout=30)
            cold = time.perf_counter()
            assert after.cached_tokens == len(ids) - 1, (after.cached_tokens, len(ids))
            score_ms.append((scored - started) * 1e3)
            after_ms.append((verified - scored) * 1e3)
            cold_ms.append((cold - verified) * 1e3)
            forward_ms.append(scores.forward_ns / 1e6)
            for name in (session_id, session_id + "-cold"):
                await client.release_session(name, 5)
        print(
            f"top={top}: ScorePrompt {statistics.median(score_ms):.2f} ms "
            f"(its forwards {statistics.median(forward_ms):.2f} ms), the verify after it "
            f"{statistics.median(after_ms):.2f} ms, a cold verify {statistics.median(cold_ms):.2f} ms "
            "(medians)"
        )
    await client.close()


asyncio.run(main(sys.argv[1]))
