"""Token-exact chat rendering and hermes tool-call parsing.

Prompts are built from token spans, never by re-applying the chat template to the
history: the head (system prompt with tools + the user task) is rendered once by the
tokenizer's own chat template; every record's ids are the generation prompt, the ids the
engine produced, the closing markup and the tokenized tool-response fragment. A deletion
removes spans; nothing is ever re-tokenized (see design brief, section 3).

The markup pieces are ChatML as used by Qwen2.5/Qwen3 (and by the tiny tokenizer's
template), so the same renderer serves a real checkpoint on a local path.
"""

from __future__ import annotations

import json
import re
from typing import Any

from memact.env.memory import Record
from memact.env.task import FINAL_ANSWER
from memact.env.tools import Action, tool_call_json

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"

SYSTEM_PROMPT = (
    "You are a search agent with a working memory. Each tool response begins with its record id. "
    "Call one tool per turn: <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>. "
    "Delete records you no longer need with prune_context; its memory note keeps what matters. "
    f"When you know every answer, reply {FINAL_ANSWER} {{\"Q1\": ..., \"Q2\": ...}}"
)
SYSTEM_PROMPT_NO_MEMORY = (
    "You are a search agent. Each tool response begins with its record id. "
    "Call one tool per turn: <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>. "
    f"When you know every answer, reply {FINAL_ANSWER} {{\"Q1\": ..., \"Q2\": ...}}"
)

# ChatML with hermes tools, compact; a real checkpoint brings its own template.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(sys='', rest=messages) %}"
    "{%- if messages[0].role == 'system' %}{%- set ns.sys = messages[0].content %}"
    "{%- set ns.rest = messages[1:] %}{%- endif %}"
    "{%- if tools %}{%- set ns.sys = ns.sys + '\\n<tools>' %}"
    "{%- for t in tools %}{%- set ns.sys = ns.sys + '\\n' + (t | tojson) %}{%- endfor %}"
    "{%- set ns.sys = ns.sys + '\\n</tools>' %}{%- endif %}"
    "{%- if ns.sys %}{{- '<|im_start|>system\\n' + ns.sys + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in ns.rest %}"
    "{%- if m.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + m.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


class ChatRenderer:
    """Builds prompt token ids from spans.

    Args:
        tokenizer: a Hugging Face tokenizer with a ChatML chat template.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.im_end_id = tokenizer.convert_tokens_to_ids(IM_END)
        if self.im_end_id is None or self.im_end_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {IM_END!r} token: a ChatML tokenizer is required")
        self.generation_prompt_ids = self.encode(f"{IM_START}assistant\n")
        self._newline_ids = self.encode("\n")
        self._close_ids = self.encode(f"{IM_END}\n")

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def head_ids(self, system: str, user: str, tools: list[dict[str, Any]] | None) -> list[int]:
        """System prompt with tools and the user task, rendered once by the chat template."""
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        text = self.tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False)
        return self.encode(text)

    def closing_ids(self, output_ids: list[int]) -> list[int]:
        """Markup after an assistant turn: a truncated turn is closed for the model."""
        if output_ids and output_ids[-1] == self.im_end_id:
            return list(self._newline_ids)
        return list(self._close_ids)

    def tool_fragment_ids(self, response_text: str) -> list[int]:
        return self.encode(tool_response_text(response_text))

    def record_ids(self, output_ids: list[int], response_text: str) -> list[int]:
        """All ids of a record: generation prompt + generated ids + closing + tool response."""
        return (
            self.generation_prompt_ids + list(output_ids) + self.closing_ids(output_ids)
            + self.tool_fragment_ids(response_text)
        )

    def prompt_ids(self, head_ids: list[int], records: list[Record]) -> list[int]:
        ids = list(head_ids)
        for r in records:
            if r.ids is None:
                raise ValueError(f"record {r.record_id} has no token ids")
            ids.extend(r.ids)
        ids.extend(self.generation_prompt_ids)
        return ids


_TOOL_CALL_RE = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)


def tool_response_text(response_text: str) -> str:
    """A tool response as the model sees it: a ChatML user turn wrapping ``<tool_response>``."""
    return f"{IM_START}user\n{TOOL_RESPONSE_OPEN}\n{response_text}\n{TOOL_RESPONSE_CLOSE}{IM_END}\n"


def call_text(name: str, arguments: dict[str, Any]) -> str:
    """An assistant tool call in hermes markup (what ``parse_action`` reads back)."""
    return f"{TOOL_CALL_OPEN}\n{tool_call_json(name, arguments)}\n{TOOL_CALL_CLOSE}"


def parse_action(text: str) -> Action:
    """Parse an assistant turn (hermes format) into an :class:`Action`.

    One tool call per turn; a final answer is a turn with ``FINAL_ANSWER:`` and no call.
    Every malformed turn becomes ``Action("invalid", error=...)`` with a message for the agent.
    """
    text = text.replace(IM_END, "").replace(ENDOFTEXT, "")
    calls = _TOOL_CALL_RE.findall(text)
    if not calls:
        if TOOL_CALL_OPEN in text:
            return Action("invalid", error=f"unterminated tool call: {TOOL_CALL_OPEN} without {TOOL_CALL_CLOSE}")
        if FINAL_ANSWER in text:
            return Action("final")
        return Action("invalid", error=f"no tool call and no {FINAL_ANSWER} found in the turn")
    if len(calls) > 1:
        return Action("invalid", error=f"one tool call per turn, got {len(calls)}")
    body = calls[0].strip()
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as err:
        return Action("invalid", error=f"malformed tool-call JSON ({err.msg} at char {err.pos})")
    if not isinstance(obj, dict):
        return Action("invalid", error="tool call must be a JSON object with 'name' and 'arguments'")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return Action("invalid", error="tool call is missing 'name'")
    args = obj.get("arguments", {})
    if isinstance(args, str):  # some models emit arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return Action("invalid", error="tool call 'arguments' is a string that is not JSON")
    if not isinstance(args, dict):
        return Action("invalid", error="tool call 'arguments' must be a JSON object")
    return Action("tool", name=name, arguments=args)
