"""An engine over any OpenAI-compatible chat-completions server (evaluation, proposers).

The agent loop speaks token ids, a chat API speaks messages. The seam: :class:`OpenAIEngine`
takes the loop's prompt ids, decodes them with the policy's tokenizer and parses the ChatML
spans back into messages (``parse_chatml``; the tools listed in the system prompt go into the
API's ``tools`` field), sends one request per prompt, and tokenizes the reply: its text plus
each returned tool call re-rendered in hermes format (``<tool_call>\\n{json}\\n</tool_call>``),
closed by ``<|im_end|>``. The agent loop stays unchanged. Log-probs are 0: the server's
tokens are not ours, so its log-probs (if any) cannot be attached to our ids.

Requests run concurrently (a thread pool) through :class:`memact.util.http.OpenAIChatClient`,
the project's one client for these servers (the ``openai`` SDK; retries with exponential backoff on
``RETRY_STATUSES``, timeouts and connection errors); a prompt that still fails gets
``Generation(error=...)`` and the rest of the batch completes. Token counts from the server's
``usage`` are kept on each ``Generation`` and summed in :attr:`OpenAIEngine.usage`.

Environment (read by ``memact.util.http.openai_env``): ``OPENAI_BASE_URL`` (default ``https://api.openai.com/v1``), ``OPENAI_API_KEY``
(sent as a bearer token when set). The model is the ``MODEL`` of an ``openai:MODEL`` policy.
"""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from memact.engines.base import Generation, SamplingParams
from memact.models.chatml import (
    IM_END,
    IM_START,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    TOOL_RESPONSE_CLOSE,
    TOOL_RESPONSE_OPEN,
    call_text,
)
from memact.util.http import ChatClientError, OpenAIChatClient, message_text
from memact.util.safejson import parse_json

_MESSAGE_RE = re.compile(re.escape(IM_START) + r"(\w+)\n(.*?)" + re.escape(IM_END) + r"\n?", re.DOTALL)
TOOL_CALL_RE = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)
_TOOL_RESPONSE_RE = re.compile(re.escape(TOOL_RESPONSE_OPEN) + r"\n(.*?)\n" + re.escape(TOOL_RESPONSE_CLOSE),
                               re.DOTALL)
_TOOLS_OPEN, _TOOLS_CLOSE = "<tools>", "</tools>"
_QWEN_TOOLS_HEADER = "\n\n# Tools\n"


class PromptFormatError(ValueError):
    """A prompt that is not ChatML ending in an open assistant turn."""


# ----------------------------------------------------------------------------- prompt -> messages


def split_tools(system: str) -> tuple[str, list[dict[str, Any]]]:
    """The system text without its tool listing, and the tool schemas listed in it.

    Handles the project's template (``\\n<tools>\\n{json}...\\n</tools>`` appended) and Qwen's
    (a ``# Tools`` section with instructions around the same ``<tools>`` block).
    """
    start, end = system.rfind(_TOOLS_OPEN), system.rfind(_TOOLS_CLOSE)
    if start < 0 or end < start:
        return system, []
    block, tools, pos = system[start + len(_TOOLS_OPEN):end], [], 0
    decoder = json.JSONDecoder()
    while True:
        while pos < len(block) and block[pos].isspace():
            pos += 1
        if pos >= len(block):
            break
        try:
            obj, pos = decoder.raw_decode(block, pos)
        except json.JSONDecodeError as err:
            raise PromptFormatError(f"tool listing in the system prompt is not JSON ({err.msg})") from err
        if isinstance(obj, dict) and obj.get("type") == "function" and isinstance(obj.get("function"), dict):
            obj = obj["function"]
        tools.append(obj)
    header = system.rfind(_QWEN_TOOLS_HEADER, 0, start)
    cut = header if header >= 0 else start
    return system[:cut].rstrip("\n"), tools


def parse_chatml(text: str) -> list[tuple[str, str]]:
    """``(role, content)`` of each ChatML message of a prompt that ends in ``<|im_start|>assistant\\n``."""
    messages, pos = [], 0
    for m in _MESSAGE_RE.finditer(text):
        if m.start() != pos:
            raise PromptFormatError(f"unexpected text between ChatML messages at char {pos}: {text[pos:m.start()][:60]!r}")
        messages.append((m.group(1), m.group(2)))
        pos = m.end()
    tail = text[pos:]
    if tail != f"{IM_START}assistant\n":
        raise PromptFormatError(f"prompt must end with the assistant generation prompt, ends with {tail[-60:]!r}")
    return messages


def prompt_to_messages(text: str, tools_in_prompt: bool = False) -> tuple[list[dict[str, Any]], list[dict]]:
    """Chat-completions ``messages`` and ``tools`` for a decoded ChatML prompt.

    With ``tools_in_prompt`` (servers without a tool parser) the text goes as it is: the tools
    stay described in the system prompt, assistant turns keep their hermes calls and tool
    responses stay ``<tool_response>`` user turns. Otherwise the tools move to the ``tools``
    field, hermes calls become ``tool_calls`` (ids ``call_0``, ``call_1``... in order) and each
    tool response becomes a ``tool`` message answering the oldest unanswered call.
    """
    chat = parse_chatml(text)
    if tools_in_prompt:
        return [{"role": role, "content": content} for role, content in chat], []
    messages: list[dict[str, Any]] = []
    tools: list[dict] = []
    pending: list[str] = []
    n_calls = 0
    for role, content in chat:
        if role == "system":
            content, found = split_tools(content)
            tools.extend(found)
            messages.append({"role": "system", "content": content})
        elif role == "assistant":
            calls = hermes_calls(content)
            if calls is None:
                messages.append({"role": "assistant", "content": content})
                continue
            tool_calls = []
            for name, args in calls:
                cid = f"call_{n_calls}"
                n_calls += 1
                pending.append(cid)
                tool_calls.append({"id": cid, "type": "function",
                                   "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}})
            rest = TOOL_CALL_RE.sub("", content).strip()
            messages.append({"role": "assistant", "content": rest or None, "tool_calls": tool_calls})
        elif role == "user" and _answers_calls(content, len(pending)):
            for body in _TOOL_RESPONSE_RE.findall(content):
                messages.append({"role": "tool", "tool_call_id": pending.pop(0), "content": body})
        else:
            messages.append({"role": role, "content": content})
    return messages, [{"type": "function", "function": t} for t in tools]


def _answers_calls(content: str, n_pending: int) -> bool:
    """A user turn made only of tool responses, no more of them than calls awaiting one."""
    bodies = _TOOL_RESPONSE_RE.findall(content)
    return 0 < len(bodies) <= n_pending and not _TOOL_RESPONSE_RE.sub("", content).strip()


def hermes_calls(text: str) -> list[tuple[str, Any]] | None:
    """``(name, arguments)`` of every hermes call in an assistant turn; None if any is malformed."""
    bodies = TOOL_CALL_RE.findall(text)
    if not bodies:
        return None
    calls = []
    for body in bodies:
        obj, err = parse_json(body)
        if err is not None:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        calls.append((obj["name"], obj.get("arguments", {})))
    return calls


# ----------------------------------------------------------------------------- reply -> text


def reply_text(message: dict[str, Any]) -> str:
    """An API reply message as the assistant text our model would have written (hermes calls)."""
    content = message_text(message)
    parts = [content.strip()] if content.strip() else []
    for call in message.get("tool_calls") or []:
        fn = call.get("function") or {}
        name, raw = fn.get("name", ""), fn.get("arguments", "{}")
        args, err = parse_json(raw) if isinstance(raw, str) else (raw, None)
        text = None
        if err is None:
            try:
                text = call_text(name, args)
            except (TypeError, ValueError, RecursionError):  # arguments json.dumps cannot write
                text = None
        if text is None:  # keep what the model wrote; parse_action reports it
            text = f"{TOOL_CALL_OPEN}\n{{\"name\": {json.dumps(str(name))}, \"arguments\": {raw}}}\n{TOOL_CALL_CLOSE}"
        parts.append(text)
    return "\n".join(parts)


# ----------------------------------------------------------------------------- the engine


class OpenAIEngine:
    """Chat completions as an :class:`~memact.engines.hf.Engine`.

    Args:
        model: the served model name (``MODEL`` of ``openai:MODEL``).
        tokenizer: the policy's tokenizer (decodes the prompts, encodes the replies).
        base_url: API root (default ``$OPENAI_BASE_URL``, else ``https://api.openai.com/v1``).
        api_key: bearer token (default ``$OPENAI_API_KEY``; the placeholder ``EMPTY`` if unset).
        tools_in_prompt: send the prompt text as is, tools described in the system prompt, for
            servers without a tool-call parser.
        concurrency: requests in flight at once.
        timeout_s: per-request timeout in seconds.
        max_retries: retries after the first attempt (``memact.util.http.RETRY_STATUSES``,
            timeouts, connection errors).
        backoff_s: first retry delay in seconds; doubles each retry (with jitter), capped at
            ``max_backoff_s``; a ``Retry-After`` header is honoured up to that cap.
    """

    def __init__(self, model: str, tokenizer: Any, base_url: str | None = None, api_key: str | None = None,
                 tools_in_prompt: bool = False, concurrency: int = 8, timeout_s: float = 120.0,
                 max_retries: int = 4, backoff_s: float = 0.5, max_backoff_s: float = 8.0,
                 end_of_turn: str = IM_END):
        if not model:
            raise ValueError("OpenAIEngine needs a model name (the MODEL of an openai:MODEL policy)")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.model = model
        self.tokenizer = tokenizer
        self.client = OpenAIChatClient.from_env(base_url, api_key, timeout_s=timeout_s, max_retries=max_retries,
                                                backoff_s=backoff_s, max_backoff_s=max_backoff_s)
        self.tools_in_prompt = tools_in_prompt
        self.concurrency = concurrency
        self.end_of_turn = end_of_turn
        self.usage = {"requests": 0, "failed": 0, "prompt_tokens": 0, "completion_tokens": 0}
        self._lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return self.client.base_url.rstrip("/")

    @property
    def api_key(self) -> str | None:
        return self.client.api_key

    @property
    def url(self) -> str:
        return self.client.url

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Generation]:
        if not prompts:
            return []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(prompts))) as pool:
            return list(pool.map(lambda ip: self._one(ip[1], sampling, ip[0]), enumerate(prompts)))

    def _one(self, prompt: list[int], sampling: SamplingParams, index: int) -> Generation:
        try:
            text = self.tokenizer.decode(prompt, skip_special_tokens=False)
            messages, tools = prompt_to_messages(text, self.tools_in_prompt)
        except PromptFormatError as err:
            return self._failed(f"prompt {index} cannot be sent as chat messages: {err}")
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": sampling.max_new_tokens,
                                "temperature": max(sampling.temperature, 0.0), "top_p": sampling.top_p}
        if tools:
            body["tools"] = tools
        if sampling.seed is not None:
            body["seed"] = sampling.seed + index
        try:
            reply, choice = self.client.complete(body)
            text = self._text(choice["message"])
        except ChatClientError as err:
            return self._failed(str(err))
        finish = "length" if choice.get("finish_reason") == "length" else "stop"
        ids = list(self.tokenizer.encode(text + (self.end_of_turn if finish == "stop" else ""),
                                         add_special_tokens=False))
        if len(ids) > sampling.max_new_tokens:
            ids, finish = ids[:sampling.max_new_tokens], "length"
        usage = reply.get("usage") or {}
        gen = Generation(ids, [0.0] * len(ids), finish, prompt_tokens=usage.get("prompt_tokens"),
                         completion_tokens=usage.get("completion_tokens"))
        with self._lock:
            self.usage["requests"] += 1
            self.usage["prompt_tokens"] += gen.prompt_tokens or 0
            self.usage["completion_tokens"] += gen.completion_tokens or 0
        return gen

    def chat(self, messages: list[dict[str, Any]], **params: Any) -> str:
        """One chat completion (with retries) returning the reply text; raises
        :class:`~memact.util.http.ChatClientError` (a RuntimeError) on failure.

        For callers outside the agent loop that speak messages, not ids.
        """
        _, choice = self.client.complete({"model": self.model, "messages": messages, **params})
        return self._text(choice["message"])

    def _text(self, message: dict[str, Any]) -> str:
        try:
            return reply_text(message)
        except (AttributeError, KeyError, TypeError) as err:  # tool_calls of another shape
            raise ChatClientError(self.url, f"unexpected reply shape ({type(err).__name__}: {err})") from None

    def _failed(self, message: str) -> Generation:
        with self._lock:
            self.usage["failed"] += 1
        return Generation([], [], "error", error=message)
