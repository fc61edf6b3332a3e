"""The chat format: ChatML markup, the system prompts, the chat template, hermes tool calls.

Turns are ``<|im_start|>{role}\n...<|im_end|>`` as in Qwen2.5/Qwen3 (and the tiny tokenizer's
template, ``CHAT_TEMPLATE``); a tool call is ``<tool_call>{json}</tool_call>`` in an assistant
turn and a tool result is ``<tool_response>...</tool_response>`` in a user turn.
:func:`parse_action` reads a generated turn into an action; how prompts are assembled from
token spans is :mod:`memact.agent.chat`.
"""

from __future__ import annotations

import re
from typing import Any

from memact.env.task import FINAL_ANSWER
from memact.env.tools import Action, tool_call_json
from memact.util.safejson import parse_json

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
    obj, err = parse_json(calls[0].strip(), what="tool-call JSON")
    if err is not None:
        return Action("invalid", error=err)
    if not isinstance(obj, dict):
        return Action("invalid", error="tool call must be a JSON object with 'name' and 'arguments'")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return Action("invalid", error="tool call is missing 'name'")
    args = obj.get("arguments", {})
    if isinstance(args, str):  # some models emit arguments as a JSON string
        args, err = parse_json(args)
        if err is not None:
            return Action("invalid", error=f"tool call 'arguments' is a string that is not JSON ({err})")
    if not isinstance(args, dict):
        return Action("invalid", error="tool call 'arguments' must be a JSON object")
    return Action("tool", name=name, arguments=args)
