"""Structured output (`GenerateRequest.structured_output`, `SamplingParams.output_regex`): the vocabulary as
bytes, the automaton's masks by hand, then through the real services, where greedy output must equal Hugging
Face's `generate` with a logits processor applying the same automaton, the coupled rule's seeded tokens must
not depend on k, sampled outputs always match, and the first token follows the masked target distribution."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

from coordinator.structured_requests import output_regex
from specpipe.client import CoordinatorClient, build_request
from specpipe.errors import FailedPreconditionError, InvalidArgumentError
from specpipe.sampling.adjustments import adjust_logits
from specpipe.sampling.params import SamplingParams
from specpipe.sampling.structured_output import OutputAutomata
from specpipe.sampling.token_bytes import TokenSpeller, token_bytes_vocabulary
from specpipe.speculation.rounds import Verification
from specpipe.v1 import coordinator_pb2
from tests.conftest import Pipeline
from tests.prompts import PROMPTS
from tests.reference import target_alone
from tests.rounds import refused_round
from tests.sampling_checks import assert_distributed_as, coupled_outputs_for_each_k, first_tokens

PHONE = r"[0-9]{3}-[0-9]{4}"
CHOICES = ["yes", "no", "maybe so"]
SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
        "required": ["color", "ok"],
    }
)
MAX_NEW_TOKENS = 48


@pytest.fixture(scope="module")
def tokenizer(pipeline: Pipeline) -> AutoTokenizer:
    return AutoTokenizer.from_pretrained(pipeline.pair.target_dir)


def test_each_token_stands_for_the_bytes_it_decodes_to(tokenizer: AutoTokenizer) -> None:
    vocabulary = token_bytes_vocabulary(tokenizer)
    checked = 0
    for token_id in range(len(tokenizer)):
        if token_id in tokenizer.all_special_ids:
            continue
        text = tokenizer.decode([token_id])
        if "\ufffd" not in text:  # a whole character or more: its bytes are its UTF-8
            assert token_id in vocabulary.get(text.encode()), (token_id, text)
            checked += 1
    assert checked > len(tokenizer) // 2
    assert vocabulary.get_eos_token_id() == tokenizer.eos_token_id


def test_a_byte_level_tokenizer_with_added_tokens_and_a_sentencepiece_one_spell_their_bytes(
    tokenizer: AutoTokenizer,
) -> None:
    from tests.test_detokenizer import metaspace_tok

    with_added = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    with_added.add_tokens(["    "])  # a run of spaces, as GPT-NeoX adds: literal text, not byte-level
    spaces = with_added.convert_tokens_to_ids("    ")
    vocabulary = token_bytes_vocabulary(with_added)
    assert spaces in vocabulary.get(b"    ")
    assert tokenizer.encode(" def", add_special_tokens=False)[0] in vocabulary.get(b" def")
    sentencepiece = metaspace_tok.__wrapped__()  # type: ignore[attr-defined]
    pieces = token_bytes_vocabulary(sentencepiece)
    spaced = next(t for t, i in sentencepiece.get_vocab().items() if t.startswith("\u2581") and len(t) > 2)
    assert sentencepiece.convert_tokens_to_ids(spaced) in pieces.get((" " + spaced[1:]).encode())


def test_the_token_speller_gives_each_tokens_own_bytes(tokenizer: AutoTokenizer) -> None:
    """Log-probs' token texts (the HTTP API's): joined, a text's tokens spell it, a SentencePiece token keeps
    its space and split characters keep their bytes, where decoding each token alone loses both."""
    from tests.test_detokenizer import metaspace_tok

    sentencepiece = metaspace_tok.__wrapped__()  # type: ignore[attr-defined]
    for tok, text in ((tokenizer, " def héllo(x): return x ✓"), (sentencepiece, " the cat sat")):
        speller = TokenSpeller(tok)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert b"".join(speller.bytes_of(i) for i in ids).decode() == text, tok.convert_ids_to_tokens(ids)
    assert any(tok.decode([i]) != speller.text_of(i) for i in ids)  # a word's space, lost alone
    assert TokenSpeller(tokenizer).text_of(tokenizer.eos_token_id) == tokenizer.eos_token


def test_a_failed_build_leaves_nothing_for_later_requests_to_wait_on() -> None:
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    automata = OutputAutomata(SimpleNamespace(eos_token_id=None))  # type: ignore[arg-type]
    with ThreadPoolExecutor(max_workers=2) as pool:
        for _ in range(2):  # the second would wait forever on a future the first left unresolved
            with pytest.raises(InvalidArgumentError, match="end-of-sequence"):
                pool.submit(automata.automaton, "abc").result(timeout=10)


def test_concurrent_requests_for_one_regex_share_its_build(
    tokenizer: AutoTokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading
    import time

    import specpipe.sampling.structured_output as structured

    builds: list[str] = []
    real_index = structured.Index

    def slow_index(regex: str, vocabulary: object) -> object:
        builds.append(regex)
        time.sleep(0.2)
        return real_index(regex, vocabulary)

    monkeypatch.setattr(structured, "Index", slow_index)
    automata = OutputAutomata(tokenizer)
    found: list[object] = []
    threads = [threading.Thread(target=lambda: found.append(automata.automaton("[0-9]+"))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert builds == ["[0-9]+"] and len(found) == 4 and all(one is found[0] for one in found)
    with pytest.raises(InvalidArgumentError, match="output_regex"):
        automata.automaton("a(")


def test_a_worker_builds_a_requests_automaton_off_its_model_thread(
    tokenizer: AutoTokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio
    import threading
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    import specpipe.sampling.structured_output as structured
    from specpipe.rpc.worker_servicer import WorkerServicerBase

    built_on: list[str] = []
    real_index = structured.Index

    def recording_index(regex: str, vocabulary: object) -> object:
        built_on.append(threading.current_thread().name)
        return real_index(regex, vocabulary)

    monkeypatch.setattr(structured, "Index", recording_index)
    request = SimpleNamespace(sampling=SamplingParams(output_regex="[0-9]{2}"))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="model") as model_thread:
        servicer: WorkerServicerBase[object] = WorkerServicerBase(model_thread)
        servicer._loaded = (SimpleNamespace(automata=OutputAutomata(tokenizer)), None)  # type: ignore[assignment]
        assert servicer.automaton_to_build(request) is not None
        asyncio.run(servicer.prepare(request))
        assert servicer.automaton_to_build(request) is None  # built: the model call finds it
        assert servicer.automaton_to_build(SimpleNamespace(sampling=SamplingParams())) is None
    assert len(built_on) == 1 and threading.current_thread().name not in built_on[0]
    assert not built_on[0].startswith("model")


def test_a_sessions_remembered_walk_gives_the_masks_of_a_walk_from_the_start(
    tokenizer: AutoTokenizer,
) -> None:
    ids = tokenizer.encode("123-4567", add_special_tokens=False)
    other = tokenizer.encode("98-7", add_special_tokens=False)
    sampling = SamplingParams(output_regex=PHONE, output_start=1)
    remembering, fresh = OutputAutomata(tokenizer), OutputAutomata(tokenizer)
    logits = torch.zeros(2, len(tokenizer))
    # Growing, then diverging (a draft's assumed history, a new turn), then shorter, then another regex.
    histories = [[5, *ids[:n]] for n in range(len(ids) + 1)] + [[5, *other], [5, *ids[:2]], [5]]
    for history in histories:
        for regex in (PHONE, "[0-9-]+"):
            asked = SamplingParams(output_regex=regex, output_start=sampling.output_start)
            walked_on = remembering.mask(logits, history, [0], asked, "session")
            assert torch.equal(walked_on, fresh.mask(logits, history, [0], asked)), (history, regex)


def test_rows_are_masked_by_the_state_after_the_tokens_before_them(tokenizer: AutoTokenizer) -> None:
    automata = OutputAutomata(tokenizer)
    ids = tokenizer.encode("123-4567", add_special_tokens=False)
    eos = tokenizer.eos_token_id
    sampling = SamplingParams(output_regex=PHONE, output_start=2)
    logits = torch.zeros(len(ids) + 2, len(tokenizer))  # rows after [5, 6] + ids[:i], then EOS
    masked = automata.mask(logits, [5, 6], [*ids, eos], sampling)
    allowed = [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in masked]
    texts = [{tokenizer.decode([t]) for t in row} for row in allowed]
    assert all(text.isdigit() and len(text) <= 3 for text in texts[0])  # the prompt [5, 6] is not output
    assert allowed[len(ids)] == {eos} and allowed[len(ids) + 1] == {eos}  # complete, then ended
    assert eos not in allowed[0] and all(ids[i] in allowed[i] for i in range(len(ids)))
    # A forbidden draft token: the rows after it are never reached, and left as they were.
    letters = tokenizer.encode("abc", add_special_tokens=False)
    after_bad = automata.mask(logits[:2], [5, 6], letters[:1], sampling)
    assert torch.isinf(after_bad[0]).any() and torch.isfinite(after_bad[1]).all()
    # A history assuming such a token (a block drafted ahead of the verdict): never committed, left unmasked.
    assert torch.isfinite(automata.mask(logits[:2], [5, 6, *letters], [], sampling)).all()
    # Committed output outside the automaton (a resumed session asking for another constraint): refused.
    automata.check_output(PHONE, ids)
    with pytest.raises(InvalidArgumentError, match="output so far leaves it at its token 0"):
        automata.check_output(PHONE, letters)
    with pytest.raises(FailedPreconditionError, match="cannot apply structured output"):
        adjust_logits(logits, [5], [], sampling, lambda rows: rows)  # a worker without automata


def test_the_request_field_compiles_to_a_regex_and_round_trips() -> None:
    assert output_regex(coordinator_pb2.StructuredOutput(regex=PHONE)) == PHONE
    choice = coordinator_pb2.StructuredOutput(choice=coordinator_pb2.Choices(choices=["a.b", "c|d", "e f"]))
    assert output_regex(choice) == r"(a\.b|c\|d|e f)"
    assert output_regex(coordinator_pb2.StructuredOutput(json_schema=SCHEMA)).startswith(r"\{")
    assert output_regex(coordinator_pb2.StructuredOutput(json_object=True)).startswith(r"\{")
    assert output_regex(coordinator_pb2.StructuredOutput()) == ""
    for bad in (
        coordinator_pb2.StructuredOutput(json_schema="{"),
        coordinator_pb2.StructuredOutput(regex=""),
        coordinator_pb2.StructuredOutput(choice=coordinator_pb2.Choices(choices=[])),
    ):
        with pytest.raises(InvalidArgumentError, match="structured_output"):
            output_regex(bad)
    sampling = SamplingParams(output_regex=PHONE)
    assert SamplingParams.from_pb(sampling.to_pb()) == sampling and sampling.needs_applied_echo
    refused = refused_round(sampling, [5, 6], Verification(2, 7, 0, applied_sampling=None))
    assert isinstance(refused, FailedPreconditionError)


class AutomatonMask(LogitsProcessor):
    """The reference, written out plainly: the automaton's allowed tokens after the output so far (what
    follows the prompt, the first call's input); generation stops at EOS, so no state after it is needed."""

    def __init__(self, automata: OutputAutomata, regex: str) -> None:
        self.automaton = automata.automaton(regex)
        self.prompt_len: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1]
        state = self.automaton.get_initial_state()
        for token_id in input_ids[0, self.prompt_len :].tolist():
            state = self.automaton.get_next_state(state, token_id)
        allowed = self.automaton.get_allowed_tokens(state)
        masked = torch.full_like(scores, float("-inf"))
        masked[:, allowed] = scores[:, allowed]
        return masked  # type: ignore[return-value]


def expected_outputs(
    pipeline: Pipeline, tokenizer: AutoTokenizer, prompts: Sequence[str], regex: str
) -> dict:
    automata = OutputAutomata(tokenizer)
    return {
        prompt: target_alone(
            pipeline.pair.target_dir, [prompt], MAX_NEW_TOKENS,
            logits_processor=LogitsProcessorList([AutomatonMask(automata, regex)]),
        )[prompt]
        for prompt in prompts
    }  # fmt: skip


def test_greedy_structured_output_equals_generate_with_the_automaton(
    pipeline: Pipeline, tokenizer: AutoTokenizer, coordinator_address: str
) -> None:
    prompts = PROMPTS[:2]
    cases: list[tuple[dict[str, object], str]] = [
        ({"regex": PHONE}, PHONE),
        ({"choice": CHOICES}, output_regex(build_request("", 1, choice=CHOICES).structured_output)),
        ({"json_schema": SCHEMA}, output_regex(build_request("", 1, json_schema=SCHEMA).structured_output)),
    ]
    with CoordinatorClient(coordinator_address) as client:
        for fields, regex in cases:
            expected = expected_outputs(pipeline, tokenizer, prompts, regex)
            for prompt in prompts:
                for k in (None, 0, 3):
                    request = build_request(prompt, MAX_NEW_TOKENS, num_speculative_tokens=k, **fields)
                    result = client.generate(request, 60)
                    assert result.token_ids == expected[prompt], (fields, prompt, k)
                    assert result.finish_reason == "eos", (fields, prompt, k)
                    if "regex" in fields:
                        assert re.fullmatch(PHONE, result.text), result.text
                    elif "choice" in fields:
                        assert result.text in CHOICES
                    else:
                        value = json.loads(result.text)
                        assert value["color"] in ("red", "green", "blue") and isinstance(value["ok"], bool)


def test_sampled_outputs_always_match_and_coupled_tokens_do_not_depend_on_k(pipeline: Pipeline) -> None:
    with CoordinatorClient(pipeline.coordinator_addr) as client:
        for seed in range(6):
            for k in (None, 3):
                request = build_request(
                    PROMPTS[seed % 4], MAX_NEW_TOKENS, temperature=1.0, seed=seed, regex=PHONE,
                    num_speculative_tokens=k,
                )  # fmt: skip
                result = client.generate(request, 60)
                assert result.finish_reason == "eos" and re.fullmatch(PHONE, result.text), result.text
    outputs = coupled_outputs_for_each_k(
        pipeline.coordinator_addr, PROMPTS[0], 3, (0, 2, 5, None), temperature=1.0, json_schema=SCHEMA
    )
    assert all(output == outputs[0] for output in outputs)


def test_first_token_follows_the_masked_target_distribution(
    pipeline: Pipeline, tokenizer: AutoTokenizer
) -> None:
    """Through the draft and the Leviathan rule (q and p both masked): the masked p's frequencies."""
    from specpipe.sampling.processing import sampling_probs
    from tests.test_pipeline_sampling import PROMPT

    model = AutoModelForCausalLM.from_pretrained(pipeline.pair.target_dir, dtype=torch.float32).eval()
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    with torch.inference_mode():
        logits = model(torch.tensor([prompt_ids])).logits[0, -1:]  # [1, vocab]
    choices = ["yes", "no", "maybe", "True", "False", "None"]
    regex = output_regex(build_request("", 1, choice=choices).structured_output)
    sampling = SamplingParams(temperature=1.0, output_regex=regex, output_start=len(prompt_ids))
    automata = OutputAutomata(tokenizer)
    p = sampling_probs(
        adjust_logits(logits, prompt_ids, (), sampling, lambda rows: rows, automata).logits, sampling
    )[0]
    assert torch.count_nonzero(p) >= 3
    counts = first_tokens(pipeline.coordinator_addr, prompt_ids, 300, temperature=1.0, choice=choices)
    assert_distributed_as(counts, p)


def test_bad_constraints_are_invalid_argument_and_lose_nothing(pipeline: Pipeline, tmp_path: Path) -> None:
    with CoordinatorClient(pipeline.coordinator_addr) as client:
        digits = client.generate(build_request(PROMPTS[0], MAX_NEW_TOKENS, regex="[0-9]{3}"), 60)
        assert re.fullmatch("[0-9]{3}", digits.text)
        both = build_request("x", 4, regex=PHONE)
        both.sampling.output_regex = PHONE
        cases: list[tuple[coordinator_pb2.GenerateRequest, str]] = [
            (build_request("x", 4, regex="a("), "output_regex"),
            (build_request("x", 4, json_schema='{"type": 3'), "structured_output.json_schema"),
            (both, "set only one"),
            # A resume asking for another constraint than the one its output so far was made under.
            (build_request("", 4, session_id=digits.session_id, regex="[a-z]+"), "output so far leaves it"),
        ]
        for request, message in cases:
            with pytest.raises(grpc.RpcError) as caught:
                client.generate(request, 30)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, message
            assert message in caught.value.details(), caught.value.details()
        session = client.get_session(digits.session_id)
        assert list(session.token_ids)[-len(digits.token_ids) :] == digits.token_ids
