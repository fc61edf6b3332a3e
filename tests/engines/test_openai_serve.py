"""`memact serve` and the OpenAI engine on loopback, and HFEngine's continuous batching.

Servers run in threads on 127.0.0.1 with a free port, are stopped at the end of each test, and
every request loop is bounded (a few episodes, at most 2 attempts per request where a failure
is expected).
"""

import json
import threading
import urllib.error
import urllib.request

import pytest
import torch
from serve_helpers import Served, _post, _scripted_backend

from memact.agent.chat import ChatRenderer
from memact.agent.loop import run_episodes
from memact.agent.rollout import make_policy
from memact.engines.base import SamplingParams
from memact.engines.hf import HFEngine
from memact.engines.openai import OpenAIEngine, prompt_to_messages, reply_text, split_tools
from memact.engines.serve import RequestError
from memact.env.memory import DEFAULT_CONTEXT_BUDGET, DEFAULT_MAX_STEPS, Budget
from memact.env.task import make_tasks
from memact.models.chatml import call_text
from memact.models.model import load_policy
from memact.trajectory import to_json

BUDGET = Budget(DEFAULT_CONTEXT_BUDGET, DEFAULT_MAX_STEPS)


# ----------------------------------------------------------------------------- rollouts over HTTP


def test_scripted_rollout_over_http_equals_in_process(tokenizer):
    seed, tasks = 1, make_tasks(4, 3, 1)
    local = make_policy("scripted", tasks, seed=seed)
    renderer = ChatRenderer(tokenizer)
    expected = run_episodes(local.engine, tasks, renderer, SamplingParams(), budget=BUDGET, seed=seed, progress=False)

    backend, served_engine = _scripted_backend(tasks, tokenizer, seed)
    with Served(backend) as srv:
        engine = OpenAIEngine("scripted", tokenizer, base_url=srv.url, concurrency=3)
        got = run_episodes(engine, tasks, renderer, SamplingParams(), budget=BUDGET, seed=seed, progress=False)
    assert [to_json(t) for t in got] == [to_json(t) for t in expected]
    assert all(t.error is None and t.reward == 1.0 for t in got)
    assert sum(t.metrics["memory_actions"] for t in got) >= 4  # prune_context went through tool_calls
    # The server re-rendered each conversation from messages into the very text the loop built.
    sent = sorted(tokenizer.decode(c.prompt_ids, skip_special_tokens=False) for t in got for c in t.calls)
    seen = sorted(tokenizer.decode(p, skip_special_tokens=False) for p in served_engine.prompts)
    assert sent == seen
    n_calls = sum(len(t.calls) for t in got)
    assert engine.usage["requests"] == n_calls and engine.usage["failed"] == 0
    assert engine.usage["prompt_tokens"] == sum(len(p) for p in served_engine.prompts)
    assert engine.usage["completion_tokens"] > 0


def test_killed_server_fails_its_episodes_and_the_rest_complete(tokenizer):
    """A one-objective episode ends before the server dies; the longer ones fail with a clear error."""
    seed = 3
    tasks = make_tasks(1, 1, 7) + make_tasks(2, 3, 8)
    renderer = ChatRenderer(tokenizer)
    local = make_policy("scripted", tasks, seed=seed)
    expected = run_episodes(local.engine, tasks, renderer, SamplingParams(), budget=BUDGET, seed=seed, progress=False)
    short_steps = len(expected[0].calls)
    assert all(len(t.calls) > short_steps + 1 for t in expected[1:])
    kill_after = short_steps * len(tasks)  # every episode called once per step until the short one ended

    box = {}

    def after(n_prompts):
        if n_prompts >= kill_after:
            threading.Thread(target=box["srv"].stop, daemon=True).start()

    backend, _ = _scripted_backend(tasks, tokenizer, seed, after)
    with Served(backend) as srv:
        box["srv"] = srv
        engine = OpenAIEngine("scripted", tokenizer, base_url=srv.url, max_retries=1, backoff_s=0.01, timeout_s=10)
        got = run_episodes(engine, tasks, renderer, SamplingParams(), budget=BUDGET, seed=seed, progress=False)
    assert len(got) == len(tasks)
    assert got[0].error is None and to_json(got[0]) == to_json(expected[0])
    for t, exp in zip(got[1:], expected[1:]):
        assert t.error is not None and "after 2 attempt(s)" in t.error, t.error
        assert "cannot reach the server" in t.error or "connection failed" in t.error, t.error
        assert t.reward <= 0 and [c.output_ids for c in t.calls] == [c.output_ids for c in exp.calls[:len(t.calls)]]
    assert engine.usage["failed"] == 2


def test_retries_on_503_then_succeeds_or_reports_the_status(tokenizer):
    tasks = make_tasks(1, 1, 2)
    backend, _ = _scripted_backend(tasks, tokenizer, 0)
    answer, failures = backend.answer, {"left": 2}

    def flaky(req):
        if failures["left"] > 0:
            failures["left"] -= 1
            raise RequestError(503, "warming up", "server_error")
        return answer(req)

    backend.answer = flaky
    renderer = ChatRenderer(tokenizer)
    ep_prompt = renderer.prompt_ids(renderer.head_ids("sys", "[id: x]\n" + tasks[0].prompt_text(), None), [])
    with Served(backend) as srv:
        gave_up = OpenAIEngine("scripted", tokenizer, base_url=srv.url, max_retries=1, backoff_s=0.01)
        g = gave_up.generate([ep_prompt], SamplingParams())[0]
        assert g.error and "HTTP 503: warming up" in g.error and "after 2 attempt(s)" in g.error
        failures["left"] = 2
        patient = OpenAIEngine("scripted", tokenizer, base_url=srv.url, max_retries=2, backoff_s=0.01)
        g = patient.generate([ep_prompt], SamplingParams())[0]
    assert g.error is None and g.completion_tokens == len(g.output_ids) and g.prompt_tokens > 0


def test_malformed_requests_get_4xx_and_the_server_goes_on(tokenizer):
    backend, _ = _scripted_backend(make_tasks(1, 1, 0), tokenizer, 0)
    ok = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}]}
    bad = [
        (None, b"{not json", 400),
        ([1, 2], None, 400),
        ({"messages": ok["messages"]}, None, 400),
        ({**ok, "model": "gpt-9"}, None, 404),
        ({**ok, "messages": []}, None, 400),
        ({**ok, "messages": [{"role": "wizard", "content": "x"}]}, None, 400),
        ({**ok, "messages": [{"role": "user", "content": 5}]}, None, 400),
        ({**ok, "temperature": "hot"}, None, 400),
        ({**ok, "max_tokens": 0}, None, 400),
        ({**ok, "stream_options": {"include_usage": True}}, None, 400),  # without stream
        ({**ok, "stream": True, "stream_options": {"include_usage": 1}}, None, 400),
        ({**ok, "n": 2}, None, 400),
        ({**ok, "tools": [{"type": "function"}]}, None, 400),
        ({**ok, "messages": [{"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "search", "arguments": "{oops"}}]}]}, None, 400),
        # Issue 21, item 1: nested bodies and arguments were a 500 (RecursionError), a huge integer too.
        (None, b"[" * 5000 + b"]" * 5000, 400),
        (None, b'{"model": "scripted", "messages": [], "n": ' + b"9" * 5000 + b"}", 400),
        ({**ok, "messages": [{"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "search", "arguments": "[" * 5000 + "]" * 5000}}]}]}, None, 400),
    ]
    with Served(backend) as srv:
        for body, raw, status in bad:
            code, reply = _post(srv.url, body, raw)
            assert code == status, (body, reply)
            assert isinstance(reply["error"]["message"], str) and reply["error"]["message"], reply
        req = urllib.request.Request(f"{srv.url}/nowhere", data=b"{}", headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.code == 404
        with urllib.request.urlopen(f"{srv.url}/models", timeout=10) as resp:
            assert json.loads(resp.read())["data"][0]["id"] == "scripted"
        # A prompt the expert does not know is the engine's failure: a 500 with its message, then life goes on.
        code, reply = _post(srv.url, ok)
        assert code == 500 and "generation failed" in reply["error"]["message"]
        assert srv.thread.is_alive()


def test_serve_cli_tiny_model_renders_tools_and_counts_usage(tiny_model_dir, tokenizer):
    import argparse

    from memact.agent.cli_serve import add_parser, build_server

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", str(tiny_model_dir), "--port", "0", "--served-model-name", "tiny"])
    server = build_server(args)
    backend = server.backend
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    tools = [{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "system", "content": "You search."},
        {"role": "user", "content": "Q1: the color of Alde?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "search", "arguments": '{"query": "Alde"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "[id: ab]\n1. Alde likes teal."},
    ]
    try:
        body = {"model": "tiny", "messages": messages, "tools": tools, "temperature": 0, "max_tokens": 12}
        code, reply = _post(url, body)
        code2, reply2 = _post(url, body)
    finally:
        server.shutdown()
        server.server_close()
        backend.close()
    assert code == code2 == 200, reply
    assert reply["choices"][0]["message"] == reply2["choices"][0]["message"]  # greedy
    tmpl = [messages[0], messages[1], {"role": "assistant", "content": call_text("search", {"query": "Alde"})},
            messages[3]]
    text = backend.tokenizer.apply_chat_template(tmpl, tools=[tools[0]["function"]], add_generation_prompt=True,
                                                 tokenize=False)
    assert "<tool_call>" in text and "<tools>" in text and "<tool_response>" in text
    usage = reply["usage"]
    assert usage["prompt_tokens"] == len(backend.tokenizer.encode(text, add_special_tokens=False))
    assert 1 <= usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


# ----------------------------------------------------------------------------- the seam


def test_prompt_to_messages_and_back(tokenizer):
    r = ChatRenderer(tokenizer)
    from memact.env.tools import PRUNE_SCHEMA, SEARCH_SCHEMA

    head = r.head_ids("Be brief.", "[id: u1]\nQ1?", [SEARCH_SCHEMA, PRUNE_SCHEMA])
    turn = call_text("search", {"query": "Alde", "topk": 2})
    rec = r.record_ids(r.encode(turn) + [r.im_end_id], "[id: r1]\n1. Alde likes teal.")
    bad = r.record_ids(r.encode("<tool_call>{oops</tool_call>"), "[id: r2]\nError: malformed")
    text = tokenizer.decode(head + rec + bad + r.generation_prompt_ids, skip_special_tokens=False)
    messages, tools = prompt_to_messages(text)
    assert [t["function"]["name"] for t in tools] == ["search", "prune_context"]
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[2]["tool_calls"][0]["function"] == {"name": "search",
                                                         "arguments": '{"query": "Alde", "topk": 2}'}
    assert messages[3] == {"role": "tool", "tool_call_id": "call_0", "content": "[id: r1]\n1. Alde likes teal."}
    assert messages[4]["role"] == "assistant" and "tool_calls" not in messages[4]  # malformed: sent as text
    assert messages[5]["role"] == "user" and messages[5]["content"].startswith("<tool_response>")
    as_text, no_tools = prompt_to_messages(text, tools_in_prompt=True)
    assert no_tools == [] and "<tools>" in as_text[0]["content"] and len(as_text) == 6
    assert reply_text(messages[2]) == turn
    assert reply_text({"content": "Let me look.", "tool_calls": messages[2]["tool_calls"]}) == "Let me look.\n" + turn


def test_split_tools_qwen_style():
    system = ("You are helpful.\n\n# Tools\n\nYou may call functions.\n<tools>\n"
              '{"type": "function", "function": {"name": "search", "parameters": {}}}\n</tools>\n\n'
              "For each function call, return <tool_call></tool_call>.")
    text, tools = split_tools(system)
    assert text == "You are helpful." and tools == [{"name": "search", "parameters": {}}]


def test_openai_policy_spec(tokenizer, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1/")
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    handle = make_policy("openai:some-model", [])
    assert isinstance(handle.engine, OpenAIEngine) and handle.memory_tool
    assert handle.engine.model == "some-model" and handle.engine.url == "http://127.0.0.1:9/v1/chat/completions"
    assert handle.engine.api_key == "k"


# ----------------------------------------------------------------------------- continuous batching


def _stop_at_position(model, eos: int, position: int):
    """Force the end of turn once a row reaches ``position``: mixed output lengths from a random model."""

    def hook(module, args, kwargs, out):
        last = kwargs["position_ids"][:, -1]
        out.logits[:, -1, eos] = torch.where(last >= position - 1, torch.tensor(1e4), out.logits[:, -1, eos])
        return out

    return model.register_forward_hook(hook, with_kwargs=True)


def test_continuous_batching_equals_fixed_batches(tiny_model_dir):
    model, tok = load_policy(tiny_model_dir)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    hook = _stop_at_position(model, eos, 70)
    try:
        g = torch.Generator().manual_seed(0)
        lengths = torch.randint(3, 66, (11,), generator=g).tolist()
        prompts = [torch.randint(5, len(tok) - 1, (n,), generator=g).tolist() for n in lengths]
        sp = SamplingParams(temperature=0.0, max_new_tokens=40)
        fixed = HFEngine(model, eos, tok.pad_token_id, max_batch_size=3, continuous_batching=False).generate(prompts, sp)
        cont = HFEngine(model, eos, tok.pad_token_id, max_batch_size=3).generate(prompts, sp)
        assert len({len(f.output_ids) for f in fixed}) >= 5  # lengths differ, so slots turn over
        assert {f.finish_reason for f in fixed} == {"stop", "length"}
        for f, c in zip(fixed, cont):
            assert c.output_ids == f.output_ids and c.finish_reason == f.finish_reason
            assert torch.allclose(torch.tensor(c.logprobs), torch.tensor(f.logprobs), atol=1e-5)
    finally:
        hook.remove()
    # Sampled, stopping at a frequent token: log-probs are those of a plain forward over prompt + output.
    sp = SamplingParams(temperature=1.5, max_new_tokens=20, seed=1, stop_token_ids=tuple(range(5, 200)))
    sampled = HFEngine(model, eos, tok.pad_token_id, max_batch_size=3).generate(prompts, sp)
    assert len({len(s.output_ids) for s in sampled}) >= 3
    for p, s in zip(prompts, sampled):
        with torch.no_grad():
            logits = model(torch.tensor([p + s.output_ids])).logits[0, len(p) - 1:-1].float()
        ref = torch.log_softmax(logits / 1.5, -1).gather(-1, torch.tensor(s.output_ids)[:, None]).squeeze(-1)
        assert torch.allclose(ref, torch.tensor(s.logprobs), atol=1e-4)


def test_hf_sync_weights_copies_and_skips_shared(tiny_model_dir):
    model, tok = load_policy(tiny_model_dir)
    other, _ = load_policy(tiny_model_dir)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    engine = HFEngine(model, tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id)
    engine.sync_weights(model.named_parameters())  # shared with the trainer: nothing to copy
    engine.sync_weights(list(other.named_parameters()) + [("lm_head.weight", other.lm_head.weight)])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    with pytest.raises(KeyError, match="not a tensor"):
        engine.sync_weights([("model.nope.weight", torch.zeros(1))])
