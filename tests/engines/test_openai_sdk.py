"""`memact serve` with the official `openai` client: chat, tools, streaming, and bad requests.

The client is what users point at hosted models; here it talks to `memact serve` on loopback.
Non-streamed and streamed replies carry the same message (content and tool calls) and usage;
every malformed request is a 4xx the SDK raises as its own error type with the server's
message; the server is alive after all of them. The streaming and malformed-request tests
print their counts.
"""

import json

import openai
import pytest
from serve_helpers import FixedEngine, Served

from memact.engines.serve import ChatBackend
from memact.models.chatml import call_text

TOOLS = [{"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {
    "query": {"type": "string"}}}}}]
MESSAGES = [{"role": "user", "content": "find the gem of Naeduk"}]


@pytest.fixture(params=["text", "tool_call"])
def served(request, tokenizer):
    text = ("The gem of Naeduk is, I think, jade." if request.param == "text"
            else "Looking.\n" + call_text("search", {"query": "Naeduk gem"}))
    with Served(ChatBackend(FixedEngine(tokenizer, text), tokenizer, "fixed")) as srv:
        yield srv, openai.OpenAI(base_url=srv.url, api_key="none", max_retries=0, timeout=30), request.param


def _joined(stream):
    """Content, tool calls, finish reason and usage put back together from streamed chunks."""
    content, calls, finish, usage, n = "", {}, None, None, 0
    for chunk in stream:
        n += 1
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for tc in choice.delta.tool_calls or []:
                call = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = tc.id or call["id"]
                call["name"] += tc.function.name or ""
                call["arguments"] += tc.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish, usage, n


def test_the_sdk_gets_the_same_message_streamed_or_not(served, capsys):
    srv, client, kind = served
    whole = client.chat.completions.create(model="fixed", messages=MESSAGES, tools=TOOLS)
    message = whole.choices[0].message
    stream = client.chat.completions.create(model="fixed", messages=MESSAGES, tools=TOOLS, stream=True,
                                            stream_options={"include_usage": True})
    content, calls, finish, usage, n = _joined(stream)
    assert content == (message.content or "")
    assert finish == whole.choices[0].finish_reason == ("tool_calls" if kind == "tool_call" else "stop")
    assert usage.prompt_tokens == whole.usage.prompt_tokens and usage.completion_tokens == whole.usage.completion_tokens
    if kind == "tool_call":
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("search", {"query": "Naeduk gem"})]
        assert message.tool_calls[0].function.name == "search" and message.content == "Looking."
    else:
        assert not calls and message.tool_calls is None
    # without include_usage no usage chunk comes
    *_, usage2, _ = _joined(client.chat.completions.create(model="fixed", messages=MESSAGES, stream=True))
    assert usage2 is None
    with capsys.disabled():
        print(f"\n[sdk stream {kind}] {n} chunks, content {len(content)} chars, {len(calls)} tool call(s)")


BAD = [
    ({"model": "gpt-9"}, openai.NotFoundError),
    ({"messages": []}, openai.BadRequestError),
    ({"messages": [{"role": "wizard", "content": "x"}]}, openai.BadRequestError),
    ({"temperature": 5}, openai.BadRequestError),
    ({"max_tokens": 0}, openai.BadRequestError),
    ({"n": 2}, openai.BadRequestError),
    ({"logprobs": True}, openai.BadRequestError),
    ({"tool_choice": "required", "tools": TOOLS}, openai.BadRequestError),
    ({"response_format": {"type": "json_object"}}, openai.BadRequestError),
    ({"seed": 2**63}, openai.BadRequestError),
    ({"stop": [""]}, openai.BadRequestError),
    ({"presence_penalty": 1.0}, openai.BadRequestError),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, openai.BadRequestError),
    ({"extra_body": {"temprature": 0.2}}, openai.BadRequestError),
    ({"tools": [{"type": "function"}]}, openai.BadRequestError),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "search", "arguments": "{oops"}}]}]},
     openai.BadRequestError),
]


def test_every_bad_request_is_a_4xx_the_sdk_names(served, capsys):
    srv, client, _ = served
    if _ != "text":
        pytest.skip("one engine reply is enough for the request checks")
    tried = refused = 0
    for change, error in BAD:
        tried += 1
        kwargs = {"model": "fixed", "messages": MESSAGES, **change}
        if kwargs.get("stream"):
            with pytest.raises(error) as caught:
                list(client.chat.completions.create(**kwargs))
        else:
            with pytest.raises(error) as caught:
                client.chat.completions.create(**kwargs)
        assert 400 <= caught.value.status_code < 500 and caught.value.body["message"], change
        refused += 1
    assert client.chat.completions.create(model="fixed", messages=MESSAGES).choices[0].message.content
    assert client.models.list().data[0].id == "fixed"
    assert srv.thread.is_alive()
    with capsys.disabled():
        print(f"\n[sdk bad requests] tried {tried}, 4xx with a JSON error {refused}, server alive")
