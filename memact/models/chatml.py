"""The chat format: ChatML markup, the system prompts, the chat template, hermes tool calls.

Turns are ``<|im_start|>{role}\n...<|im_end|>`` as in Qwen2.5/Qwen3 (and the tiny tokenizer's
template, ``CHAT_TEMPLATE``); a tool call is ``<tool_call>{json}</tool_call>`` in an assistant
turn and a tool result is ``<tool_response>...</tool_response>`` in a user turn.
:func:`parse_action` reads a generated turn into an action; how prompts are assembled from
token spans is :mod:`memact.agent.chat`.
"""

from __future__ import annotations

import json
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


# Qwen2.5's hermes tools block, for chat templates that drop the ``tools`` argument (SmolLM2's).
TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_POSTAMBLE = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call>"
)
# A ChatML chat template that renders tools, tool calls and tool results the way memact's
# prompts do (Qwen2.5's tools block, hermes calls, <tool_response> user turns), for a checkpoint
# whose own template drops them: `memact import-model` writes it, so that transformers, vLLM
# (`vllm serve --tool-call-parser hermes`) and memact all show the model its tools.
HERMES_CHAT_TEMPLATE = (
    "{%- set preamble = " + json.dumps(TOOLS_PREAMBLE) + " %}"
    "{%- set postamble = " + json.dumps(TOOLS_POSTAMBLE) + " %}"
    "{%- if messages and messages[0].role == 'system' %}{%- set ns = namespace(sys=messages[0].content or '') %}"
    "{%- set rest = messages[1:] %}{%- else %}{%- set ns = namespace(sys=DEFAULT_SYSTEM) %}{%- set rest = messages %}"
    "{%- endif %}"
    "{%- if tools %}{%- set ns.sys = (ns.sys + '\n\n' if ns.sys else '') + preamble %}"
    "{%- for t in tools %}{%- set ns.sys = ns.sys + '\n' + (t | tojson) %}{%- endfor %}"
    "{%- set ns.sys = ns.sys + postamble %}{%- endif %}"
    "{%- if ns.sys %}{{- '<|im_start|>system\n' + ns.sys + '<|im_end|>\n' }}{%- endif %}"
    "{%- for m in rest %}"
    "{%- if m.role == 'tool' %}"
    "{{- '<|im_start|>user\n<tool_response>\n' + (m.content or '') + '\n</tool_response><|im_end|>\n' }}"
    "{%- elif m.role == 'assistant' and m.tool_calls %}{{- '<|im_start|>assistant\n' }}"
    "{%- if m.content %}{{- m.content + '\n' }}{%- endif %}"
    "{%- for tc in m.tool_calls %}{%- set f = tc.function if tc.function is defined else tc %}"
    "{%- if not loop.first %}{{- '\n' }}{%- endif %}"
    "{%- if f.arguments is string %}"
    "{{- '<tool_call>\n{\"name\": ' + (f.name | tojson) + ', \"arguments\": ' + f.arguments + '}\n</tool_call>' }}"
    "{%- else %}{{- '<tool_call>\n' + ({'name': f.name, 'arguments': f.arguments} | tojson) + '\n</tool_call>' }}"
    "{%- endif %}{%- endfor %}{{- '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\n' + (m.content or '') + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)


def hermes_chat_template(default_system: str = "") -> str:
    """:data:`HERMES_CHAT_TEMPLATE` with the system prompt used when a conversation has none."""
    return "{%- set DEFAULT_SYSTEM = " + json.dumps(default_system) + " %}" + HERMES_CHAT_TEMPLATE


_PROBE_TOOL = {"name": "memact_probe_tool_3f9c", "description": "probe", "parameters": {"type": "object"}}
_RENDERS_TOOLS: dict[str, bool] = {}


def template_renders_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template puts the ``tools`` argument into the prompt.

    Found by rendering a probe tool once per template: SmolLM2's template, for one, ignores
    ``tools`` silently, and a model that is not shown its tools answers in prose.
    """
    template = getattr(tokenizer, "chat_template", None) or ""
    if template not in _RENDERS_TOOLS:
        try:
            text = tokenizer.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                                                 tools=[_PROBE_TOOL], tokenize=False)
            _RENDERS_TOOLS[template] = _PROBE_TOOL["name"] in text
        except Exception:  # a template that fails on tools does not render them
            _RENDERS_TOOLS[template] = False
    return _RENDERS_TOOLS[template]


def tools_block(tools: list[dict[str, Any]]) -> str:
    """The hermes tools block of a system message, as Qwen2.5's template writes it."""
    return TOOLS_PREAMBLE + "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools) + TOOLS_POSTAMBLE


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                add_generation_prompt: bool = False) -> str:
    """The chat template's text for ``messages`` and ``tools``; never drops the tools.

    With a template that renders ``tools`` this is ``apply_chat_template``. With one that drops
    them, memact writes the hermes tools block into the system message itself (Qwen2.5's
    wording) and ``tool`` messages become the ``<tool_response>`` user turns memact's records
    use, so the model sees the same prompt it would under a hermes template.
    """
    if not template_renders_tools(tokenizer):
        messages = [dict(m) for m in messages]
        for m in messages:
            if m.get("role") == "tool":
                m["role"] = "user"
                m["content"] = f"{TOOL_RESPONSE_OPEN}\n{m.get('content') or ''}\n{TOOL_RESPONSE_CLOSE}"
        if tools:
            block = tools_block(tools)
            if messages and messages[0].get("role") == "system":
                system = messages[0].get("content") or ""
                messages[0]["content"] = f"{system}\n\n{block}" if system else block
            else:
                messages.insert(0, {"role": "system", "content": block})
            tools = None
    return tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=add_generation_prompt,
                                         tokenize=False)


_TOOL_CALL_RE = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)


def strip_turn_end(text: str) -> str:
    """A turn's text without the end-of-turn markup the engine emitted (``<|im_end|>``, ``<|endoftext|>``)."""
    return text.replace(IM_END, "").replace(ENDOFTEXT, "")


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
    text = strip_turn_end(text)
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
