"""`memact serve` streams token by token (issue 22, item 4).

The first content chunk reaches an `openai` client while the engine is still generating (the
engine waits for the client to see it, so a server that sent the turn whole fails the test);
for any turn text (tool calls, stop strings, whitespace, end-of-turn markers, partial
characters) the joined stream is the message of the non-streamed reply, content deltas never
change what was sent, and the HF engine's ``on_token`` hears exactly the ids it returns, in
order, on both of its decoding paths.
"""

import threading
import time

import openai
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_helpers import Served

from memact.engines.base import Generation, SamplingParams, streams_tokens
from memact.engines.serve import ChatBackend, settled_content
from memact.models.chatml import ENDOFTEXT, IM_END, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, call_text

MESSAGES = [{"role": "user", "content": "find the gem of Naeduk"}]


class StreamingFixed:
    """Answers with fixed ids, reporting each through ``on_token``; ``gate(i)`` runs before token i."""

    streams_tokens = True

    def __init__(self, ids, gate=None):
        self.ids, self.gate = list(ids), gate

    def generate(self, prompts, sampling, on_token=None):
        for i, tok in enumerate(self.ids):
            if self.gate is not None:
                self.gate(i)
            for row in range(len(prompts)):
                if on_token is not None:
                    on_token(row, tok)
        return [Generation(list(self.ids), [0.0] * len(self.ids)) for _ in prompts]


def _ids(tok, text):
    return list(tok.encode(text, add_special_tokens=False)) + [tok.convert_tokens_to_ids(IM_END)]


def test_the_first_chunk_arrives_while_the_engine_is_still_generating(tokenizer, capsys):
    text = "The gem of Naeduk is jade, as the second search said."
    seen_first = threading.Event()
    waited = {}

    def gate(i):
        if i == 4:  # the engine holds its 5th token until the client has the first content chunk
            start = time.monotonic()
            waited["ok"] = seen_first.wait(timeout=10)
            waited["s"] = time.monotonic() - start

    backend = ChatBackend(StreamingFixed(_ids(tokenizer, text), gate), tokenizer, "fixed")
    assert backend.streams_tokens
    with Served(backend) as srv:
        client = openai.OpenAI(base_url=srv.url, api_key="none", max_retries=0, timeout=30)
        content, n_content = "", 0
        for chunk in client.chat.completions.create(model="fixed", messages=MESSAGES, stream=True):
            for choice in chunk.choices:
                if choice.delta.content:
                    n_content += 1
                    content += choice.delta.content
                    seen_first.set()
        whole = client.chat.completions.create(model="fixed", messages=MESSAGES).choices[0].message.content
    with capsys.disabled():
        print(f"\n[stream] {n_content} content chunks for {len(_ids(tokenizer, text))} tokens; the engine waited "
              f"{waited['s'] * 1000:.0f} ms for the client's first chunk")
    assert waited["ok"], "the client saw no content before the engine finished: the turn was sent whole"
    assert content == whole == text
    assert n_content > 4


PIECES = st.sampled_from([" ", "  ", "\n", "word", "é", "日本", "Looking.", TOOL_CALL_OPEN, TOOL_CALL_CLOSE, "<tool",
                          "_call>", IM_END, ENDOFTEXT, "<|im", "STOP", "ST", "\ufffd", "{", "}",
                          call_text("search", {"query": "Naeduk gem"}), call_text("prune_context", {"memory": "m"})])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(PIECES, max_size=12), st.sampled_from([(), ("STOP",), ("\n\n", "gem")]),
       st.sampled_from(["auto", "none"]))
def test_the_joined_stream_is_the_whole_reply(tokenizer, pieces, stop, tool_choice):
    text = "".join(pieces)
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    if not ids:
        return
    body = {"model": "fixed", "messages": MESSAGES, "tool_choice": tool_choice, "stream": True,
            "stream_options": {"include_usage": True}, **({"stop": list(stop)} if stop else {})}
    backend = ChatBackend(StreamingFixed(ids), tokenizer, "fixed")
    try:
        req = backend.parse(body)
        whole = backend.answer(req)
        chunks = list(backend.stream(req))
    finally:
        backend.close()
    message = whole["choices"][0]["message"]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content") or "" for d in deltas) == (message["content"] or "")
    calls = [tc["function"] for d in deltas for tc in d.get("tool_calls", [])]
    assert calls == [tc["function"] for tc in message.get("tool_calls", [])]
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == whole["usage"]


@given(st.lists(PIECES, max_size=10), st.sampled_from([(), ("STOP",)]), st.sampled_from(["auto", "none"]))
def test_settled_content_only_grows(pieces, stop, tool_choice):
    text = "".join(pieces)
    cut = min((text.find(s) for s in stop if s in text), default=None)
    if cut is not None:
        text = text[:cut]
    before = ""
    for n in range(len(text) + 1):
        now = settled_content(text[:n], stop, tool_choice)
        assert now.startswith(before), (text[:n], before, now)
        before = now


def test_an_engine_that_does_not_stream_sends_the_turn_when_it_is_done(tokenizer):
    class Whole:
        def generate(self, prompts, sampling):
            return [Generation(_ids(tokenizer, "Jade, I think."), [0.0] * 6) for _ in prompts]

    backend = ChatBackend(Whole(), tokenizer, "fixed")
    try:
        assert not streams_tokens(Whole()) and not backend.streams_tokens
        req = backend.parse({"model": "fixed", "messages": MESSAGES, "stream": True})
        chunks = list(backend.stream(req))
    finally:
        backend.close()
    assert [c["choices"][0]["delta"].get("content") for c in chunks] == ["", "Jade, I think.", None]


@pytest.mark.parametrize("continuous", [False, True])
def test_the_hf_engine_reports_each_token_as_it_samples_it(tiny_model_dir, continuous):
    from transformers import AutoModelForCausalLM

    from memact.engines.hf import HFEngine
    from memact.models.model import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tok = load_tokenizer(tiny_model_dir)
    engine = HFEngine(model, eos_token_id=tok.convert_tokens_to_ids(IM_END), pad_token_id=tok.pad_token_id or 0,
                      max_batch_size=2, continuous_batching=continuous, prefix_cache_tokens=0)
    prompts = [list(tok.encode(p, add_special_tokens=False)) for p in ("a b", "the gem of", "c", "Naeduk is")]
    heard: dict[int, list[int]] = {}
    sampling = SamplingParams(temperature=1.0, max_new_tokens=12, seed=3)
    gens = engine.generate(prompts, sampling, on_token=lambda i, t: heard.setdefault(i, []).append(t))
    assert [heard[i] for i in range(len(prompts))] == [g.output_ids for g in gens]
    again = engine.generate(prompts, sampling)
    assert [g.output_ids for g in again] == [g.output_ids for g in gens]  # listening changes nothing
